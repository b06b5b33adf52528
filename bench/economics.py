"""Stage economics and scaling curves on the testbed (issue 8, items 3 and 4).

1. **Economics** (`--reps` repetitions, `opd` and `topd` alternating, each in a fresh store so nothing is
   cached): per stage wall seconds, tokens, tokens/s and peak RSS (the process's high-water mark, reset before
   each stage through /proc/self/clear_refs), for one iteration from the committed student; and the cost per
   kept token: training seconds (prompts + rollout + score + gates + analyze + update, evaluation excluded) over
   the completion tokens that carried a non-zero weight in the update.
2. **Scaling**: one iteration's training seconds and artifact bytes (prompts, rollouts, scores, gates,
   analysis, checkpoint) as the number of sequences (prompts x samples) grows, per method.

Token counts per stage: rollout = generated tokens; score = scored tokens (same); gates = scored tokens;
analyze = analysed tokens (its probe generations are in `probe_tokens`); update = tokens trained; evaluate =
greedy tokens generated on the eval set.

    python -m bench economics --sequences 16 64 256 512 --reps 3
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
TRAIN_STAGES = ("prompts", "rollout", "score", "gates", "analyze", "update")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def one_iteration(method: str, sequences: int, samples: int, root: Path, eval_size: int, sets: list[str]) -> dict:
    from opd_tasks.config_files import load_config
    from opd_tasks.method import plan
    from opd_tasks.pipeline import (
        LocalExecutor,
        StageRunner,
        eval_prompts_inputs,
        opened_run,
        resolve_models,
        run_iteration,
    )
    from opd_tasks.stages import PROMPTS

    class Metered(LocalExecutor):
        peaks: dict[str, float | None] = {}

        def run(self, stage, ctx, inputs, parts):
            _reset_peak()
            out = super().run(stage, ctx, inputs, parts)
            self.peaks[stage.name] = _peak_mb()
            return out

    if sequences % samples:
        raise SystemExit(f"--sequences {sequences} is not a multiple of --samples {samples}")
    cfg = load_config(None, [f"method={method}", f"root={root}", "iterations=1", f"name={method}-{sequences}",
                             f"data.prompts_per_iteration={sequences // samples}",
                             f"rollout.samples_per_prompt={samples}", f"data.eval_size={eval_size}", *sets])
    metered = Metered()
    with opened_run(cfg) as (store, lineage, _):
        stages = StageRunner(store, lineage, cfg, metered, progress=False, log=lambda m: None)
        models = resolve_models(cfg)
        ev = stages(PROMPTS, eval_prompts_inputs(cfg, models), iteration=0, label="eval_prompts")
        res = run_iteration(stages, cfg, plan(cfg), 0, models.initial_student, models, ev)

    def col(ref, table, name):
        return store.read_table(ref, table, columns=[name]).column(name).to_pylist()

    ro = res.stages["rollout"].ref
    generated = sum(len(t) for t in col(ro, "rollouts", "token_ids"))
    trained = sum(col(res.checkpoint, "updates", "tokens_trained"))
    if "analyze" in res.stages:
        weights = col(res.stages["analyze"].ref, "tokens", "weight")
        kept = sum(1 for w in weights if w > 0)
        probes = store.read_table(res.stages["analyze"].ref, "probes")
        probe_tokens = sum(len(c) for c in probes.column("teacher_continuation").to_pylist()) + sum(
            len(c) for c in probes.column("student_continuation").to_pylist())
    else:
        kept, probe_tokens = generated, 0
    tokens = {"rollout": generated, "score": generated, "gates": generated, "analyze": generated,
              "update": trained, "evaluate": sum(col(res.stages["evaluate"].ref, "evals", "num_tokens")),
              "prompts": sequences // samples}
    stages_out = {s: {"seconds": r.seconds, "tokens": tokens.get(s), "peak_rss_mb": metered.peaks.get(s),
                      "bytes": r.ref.bytes} for s, r in res.stages.items()}
    train_s = sum(stages_out[s]["seconds"] for s in TRAIN_STAGES if s in stages_out)
    return {"method": method, "sequences": sequences, "stages": stages_out, "train_seconds": train_s,
            "artifact_bytes": sum(stages_out[s]["bytes"] for s in TRAIN_STAGES if s in stages_out),
            "generated_tokens": generated, "kept_tokens": kept, "probe_tokens": probe_tokens,
            "seconds_per_kept_token": train_s / kept if kept else None, "accuracy": res.accuracy}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench economics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["opd", "topd"])
    ap.add_argument("--economics-sequences", type=int, default=128, help="sequences per iteration for part 1")
    ap.add_argument("--sequences", type=int, nargs="+", default=[16, 64, 256, 512], help="scaling points")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of part 1 (medians)")
    ap.add_argument("--eval-size", type=int, default=50)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--tag", default=None, help="results go to bench/results/economics[-TAG].json")
    args = ap.parse_args(argv)
    if not _reset_peak():
        console.print("[yellow]/proc/self/clear_refs not writable: peak RSS is the process's overall peak[/]")
    econ: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        console.print("warm-up (imports, first model loads; not measured) ...")
        for m in args.methods:
            one_iteration(m, 2 * args.samples, args.samples, Path(tmp) / f"warm-{m}", 4, args.sets)
        for rep in range(args.reps):
            order = args.methods if rep % 2 == 0 else list(reversed(args.methods))
            for m in order:
                console.print(f"economics: {m} rep {rep + 1}/{args.reps} ...")
                econ.append(one_iteration(m, args.economics_sequences, args.samples,
                                          Path(tmp) / f"e-{m}-{rep}", args.eval_size, args.sets))
        scaling: list[dict] = []
        for n in args.sequences:
            for m in args.methods:
                console.print(f"scaling: {m} with {n} sequences ...")
                t0 = time.perf_counter()
                scaling.append(one_iteration(m, n, args.samples, Path(tmp) / f"s-{m}-{n}", args.eval_size,
                                             args.sets))
                scaling[-1]["wall_seconds"] = time.perf_counter() - t0

    summary: dict = {"economics": {}, "scaling": []}
    for m in args.methods:
        rs = [r for r in econ if r["method"] == m]
        stages = [s for s in (*TRAIN_STAGES, "evaluate") if s in rs[0]["stages"]]
        per = {}
        t = Table("stage", "seconds (median)", "tokens", "tokens/s", "peak RSS MB", "artifact MB",
                  title=f"{m}: one iteration of {args.economics_sequences} sequences, {args.reps} reps")
        for s in stages:
            secs = statistics.median(r["stages"][s]["seconds"] for r in rs)
            tok = rs[0]["stages"][s]["tokens"]
            rss = max((r["stages"][s]["peak_rss_mb"] or 0) for r in rs)
            per[s] = {"seconds": secs, "tokens": tok, "tokens_per_s": tok / secs if tok and secs else None,
                      "peak_rss_mb": rss, "bytes": rs[0]["stages"][s]["bytes"]}
            t.add_row(s, f"{secs:.2f}", str(tok), f"{per[s]['tokens_per_s']:.0f}" if per[s]["tokens_per_s"] else "-",
                      f"{rss:.0f}", f"{per[s]['bytes'] / 1e6:.2f}")
        console.print(t)
        train = statistics.median(r["train_seconds"] for r in rs)
        kept = statistics.median(r["kept_tokens"] for r in rs)
        gen = statistics.median(r["generated_tokens"] for r in rs)
        summary["economics"][m] = {"stages": per, "train_seconds": train, "kept_tokens": kept,
                                   "generated_tokens": gen, "probe_tokens": rs[0]["probe_tokens"],
                                   "ms_per_kept_token": 1000 * train / kept if kept else None}
    t = Table("method", "training s / iteration", "generated tokens", "kept tokens (weight > 0)", "probe tokens",
              "ms per kept token", title="cost per kept token (median over reps)")
    for m, e in summary["economics"].items():
        t.add_row(m, f"{e['train_seconds']:.2f}", f"{e['generated_tokens']:.0f}", f"{e['kept_tokens']:.0f}",
                  str(e["probe_tokens"]), f"{e['ms_per_kept_token']:.3f}")
    console.print(t)
    if "opd" in summary["economics"]:
        for m, e in summary["economics"].items():
            if m != "opd":
                e["kept_token_cost_vs_opd"] = e["ms_per_kept_token"] / summary["economics"]["opd"]["ms_per_kept_token"]
                console.print(f"{m}: cost per kept token {e['kept_token_cost_vs_opd']:.2f}x opd's")
    t = Table("sequences", "method", "training s", "ms / sequence", "artifact MB", "peak RSS MB (max stage)",
              title="scaling: one iteration")
    for r in scaling:
        peak = max((s["peak_rss_mb"] or 0) for s in r["stages"].values())
        row = {"sequences": r["sequences"], "method": r["method"], "train_seconds": r["train_seconds"],
               "artifact_bytes": r["artifact_bytes"], "peak_rss_mb": peak,
               "stage_seconds": {s: v["seconds"] for s, v in r["stages"].items()}}
        summary["scaling"].append(row)
        t.add_row(str(r["sequences"]), r["method"], f"{r['train_seconds']:.2f}",
                  f"{1000 * r['train_seconds'] / r['sequences']:.1f}", f"{r['artifact_bytes'] / 1e6:.2f}",
                  f"{peak:.0f}")
    console.print(t)
    out = save("economics" + (f"-{args.tag}" if args.tag else ""),
               {"args": vars(args), "summary": summary, "economics_runs": econ})
    console.print(f"results: {out}")
    return summary


if __name__ == "__main__":
    main()
