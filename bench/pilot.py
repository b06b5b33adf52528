"""The pilot for the pre-registered experiment (docs/testbed.md, "The mechanism switch"): on one condition of the
testbed, per seed, OPD against a replicate of OPD that differs only in the order its updates see the sequences
(`update.order_seed`), plus any other methods asked for; every run with the plain driver in its own root, all on
one shared eval set.

Per run and iteration it records the greedy accuracy (what the runs' evaluate stage measures) and, from a second,
sampled evaluation of the same checkpoints on the same problems (temperature 1, one sample each), the sampled
accuracy and the early-stop rate, the readout of the `consequential` fork. It then prints, per metric, the
per-seed paired difference of each method against OPD at the last iteration, and the standard deviation over seeds
of OPD-replicate minus OPD: the noise floor that the experiment's power calculation uses. Since that difference
has a true mean of 0, its root mean square over seeds is reported too (the SD around 0; with few seeds the SD
around the sample mean understates it).

    python -m bench pilot --fork consequential --seeds 0 1 --iterations 4 --methods opd topd
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

console = Console(width=160)
REPLICATE = "opd-replicate"


def run_one(label: str, method: str, seed: int, args, root: Path) -> dict:
    from opd_tasks.config_files import load_config
    from opd_tasks.models import ModelSpec
    from opd_tasks.pipeline import checker_name, run_plain
    from opd_tasks.stages import EVALUATE, EvaluateInputs
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    sets = [f"method={method}", f"seed={seed}", f"iterations={args.iterations}", f"root={root}", f"name={label}",
            f"data.testbed.fork={args.fork}", f"data.eval_size={args.eval_size}", *args.sets]
    if label == REPLICATE:
        sets.append(f"update.order_seed={10_000 + seed}")
    cfg = load_config(None, sets)
    t0 = time.perf_counter()
    out = run_plain(cfg, log=lambda m: None, progress=False)
    store, lineage = ArtifactStore(root), RunLineage(root, label)
    sampled = cfg.evaluation.model_copy(update={"greedy": False, "pass_k": 1})
    its = []
    for it in out.iterations:
        greedy = lineage.get(it.iteration, "evaluate").ref
        ref = EVALUATE(store, EvaluateInputs(model=ModelSpec.from_checkpoint(store, it.checkpoint),
                                             prompts=lineage.get(0, "eval_prompts").ref, evaluation=sampled,
                                             checker=checker_name(cfg), seed=seed), progress=False)
        meta = store.manifest(ref)["meta"]
        its.append({"iteration": it.iteration, "greedy_accuracy": it.accuracy,
                    "sampled_accuracy": meta["accuracy"], "early_stop_rate": meta.get("early_stop_rate"),
                    "greedy_early_stop_rate": store.manifest(greedy)["meta"].get("early_stop_rate")})
    return {"label": label, "method": method, "seed": seed, "baseline": out.baseline_accuracy, "iterations": its,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench pilot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fork", default="consequential", choices=["none", "harmless", "consequential"])
    ap.add_argument("--methods", nargs="+", default=["opd"], help="besides opd and its replicate")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--tag", default=None, help="results go to bench/results/pilot[-TAG].json")
    args = ap.parse_args(argv)
    arms = [("opd", "opd"), (REPLICATE, "opd")] + [(m, m) for m in args.methods if m != "opd"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label, method in arms:
                console.print(f"{label} seed {seed} ...")
                runs.append(run_one(label, method, seed, args, Path(tmp) / f"{label}-{seed}"))
                r = runs[-1]
                console.print("  greedy " + " ".join(f"{i['greedy_accuracy']:.3f}" for i in r["iterations"])
                              + " | sampled " + " ".join(f"{i['sampled_accuracy']:.3f}" for i in r["iterations"])
                              + " | early stops " + " ".join(f"{i['early_stop_rate']:.3f}" for i in r["iterations"]))
    last = {(r["label"], r["seed"]): r["iterations"][-1] for r in runs}
    summary: dict = {}
    t = Table("arm - opd", "metric", "per-seed differences (points)", "mean", "SD over seeds", "RMS",
              title=f"pilot: {args.fork}, {args.iterations} iterations, last iteration")
    for label, _ in arms[1:]:
        for metric in ("greedy_accuracy", "sampled_accuracy", "early_stop_rate"):
            diffs = [100 * (last[(label, s)][metric] - last[("opd", s)][metric]) for s in args.seeds]
            sd = statistics.stdev(diffs) if len(diffs) > 1 else None
            rms = (sum(d * d for d in diffs) / len(diffs)) ** 0.5
            summary.setdefault(label, {})[metric] = {"diffs": diffs, "mean": statistics.mean(diffs), "sd": sd,
                                                     "rms": rms}
            t.add_row(label, metric, " ".join(f"{d:+.1f}" for d in diffs), f"{statistics.mean(diffs):+.1f}",
                      "-" if sd is None else f"{sd:.1f}", f"{rms:.1f}")
    console.print(t)
    out = save("pilot" + (f"-{args.tag}" if args.tag else ""), {"args": vars(args), "runs": runs,
                                                                "summary": summary})
    console.print(f"results: {out}")
    return summary


if __name__ == "__main__":
    main()
