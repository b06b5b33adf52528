"""Learning and cost on the embedded testbed: methods x seeds with the plain driver (no Prefect), side by side.

For each (method, seed): baseline accuracy, test accuracy after each iteration, seconds per iteration (stage
compute only), and for analysed methods the regime shares and the classifier's precision/recall against the
testbed's ground-truth token roles. Methods run interleaved per seed, each in a fresh storage root, so
nothing is shared or cached between them and the timings are comparable.

    python -m bench testbed --methods opd topd --seeds 0 1 2 --iterations 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import save
from opd_tasks.config_files import load_config

console = Console(width=160)


def run_one(method: str, seed: int, iterations: int, root: Path, sets: list[str]) -> dict:
    from opd_tasks.pipeline import run_plain
    from storage.store import ArtifactStore

    cfg = load_config(None, [f"method={method}", f"seed={seed}", f"iterations={iterations}", f"root={root}",
                             f"name={method}-s{seed}", *sets])
    t0 = time.perf_counter()
    out = run_plain(cfg, log=lambda m: None, progress=False)
    store = ArtifactStore(root)
    its = []
    for r in out.iterations:
        it = {"iteration": r.iteration, "accuracy": r.accuracy,
              "seconds": sum(s.seconds for s in r.stages.values()),
              "stage_seconds": {k: s.seconds for k, s in r.stages.items()}}
        if "analyze" in r.stages:
            meta = store.manifest(r.stages["analyze"].ref)["meta"]
            it["share"] = meta["share"]
            it["classifier"] = meta.get("classifier")
        its.append(it)
    return {"method": method, "seed": seed, "baseline": out.baseline_accuracy, "iterations": its,
            "total_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench testbed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["opd", "topd"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--tag", default=None, help="results go to bench/results/testbed[-TAG].json")
    args = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for m in args.methods:
                console.print(f"{m} seed {seed} ...")
                runs.append(run_one(m, seed, args.iterations, Path(tmp) / f"{m}-{seed}", args.sets))
                r = runs[-1]
                console.print(f"  accuracy {r['baseline']:.2f} -> " + " ".join(f"{i['accuracy']:.2f}"
                                                                          for i in r["iterations"]))
    t = Table("method", "baseline", "final accuracy (mean, min-max over seeds)", "gain (points)",
              "s / iteration", "surface precision / recall", title="testbed: methods x seeds")
    summary = {}
    for m in args.methods:
        rs = [r for r in runs if r["method"] == m]
        final = [r["iterations"][-1]["accuracy"] for r in rs]
        base = [r["baseline"] for r in rs]
        secs = [i["seconds"] for r in rs for i in r["iterations"]]
        cls = [i["classifier"] for r in rs for i in r["iterations"] if i.get("classifier")]
        prec = [c["surface_precision"] for c in cls if c["surface_precision"] is not None]
        rec = [c["surface_recall"] for c in cls if c["surface_recall"] is not None]
        summary[m] = {"final_mean": statistics.mean(final), "final_min": min(final), "final_max": max(final),
                      "baseline_mean": statistics.mean(base),
                      "gain_points": 100 * (statistics.mean(final) - statistics.mean(base)),
                      "seconds_per_iteration": statistics.median(secs),
                      "surface_precision": statistics.mean(prec) if prec else None,
                      "surface_recall": statistics.mean(rec) if rec else None}
        s = summary[m]
        t.add_row(m, f"{s['baseline_mean']:.1%}", f"{s['final_mean']:.1%} ({s['final_min']:.0%}-{s['final_max']:.0%})",
                  f"{s['gain_points']:+.1f}", f"{s['seconds_per_iteration']:.1f}",
                  f"{s['surface_precision']:.2f} / {s['surface_recall']:.2f}" if prec else "-")
    console.print(t)
    if "opd" in summary:
        for m in summary:
            if m != "opd":
                ratio = summary[m]["seconds_per_iteration"] / summary["opd"]["seconds_per_iteration"]
                summary[m]["cost_vs_opd"] = ratio
                console.print(f"{m}: iteration time {ratio:.2f}x opd's (median seconds per iteration)")
    out = save("testbed" + (f"-{args.tag}" if args.tag else ""), {"args": vars(args), "runs": runs, "summary": summary})
    console.print(f"results: {out}")
    return summary


if __name__ == "__main__":
    main()
