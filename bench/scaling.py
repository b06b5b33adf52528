"""Scale-out: the rollout, scoring and analysis stages in 1, 2 and 4 shards, and the update in 1 and 2 processes.

Shards (`orchestration.shards`) run the way the distill flow runs them: the Prefect executor (flows/executors.py),
each shard a task run in a process pool on this machine, then the stage, which puts the parts in row order. For each
number of shards, in a fresh root (nothing cached): the wall time of each stage (the pool's process start included
in the rollout's, the first sharded stage), and whether the stage's artifact is byte-identical (same sha256) to the
one-shard artifact. The analysis is `topd`'s (the default `swap` detector, with the bridge). The update
(`update.world_size`) trains on the one-shard rollouts and scores in 1 and 2 processes (torchrun, gloo on the CPU):
wall time, the largest difference of the per-step losses and of the final weights.

    python -m bench scaling --prompts 128 --samples 4 --shards 1 2 4 --ranks 1 2

Sizes: rollout, scoring and analysis batches of 32 sequences (8 prompts x 4 samples per generation batch), so 128
prompts are 16 batches of each, enough for 4 shards; the update in micro-batches of `--micro-batch` sequences, dealt to
the ranks. On a small CPU the shard processes share its cores with each other (each keeps torch's default
threads, which the byte equality needs: docs/scaling.md), and every shard process and rank pays its own start
(imports, model load): the figures are the cost of the machinery at this size, not a GPU's speed-up.

On a CUDA machine the same runs use the GPUs (`--device cuda`): shards take the GPUs in turn, the update's ranks
one each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import machine, median, save

console = Console(width=160)


def config(root: Path, prompts: int, samples: int, shards: int, device: str, *extra: str):
    from opd_tasks.config_files import load_config

    return load_config(None, [f"root={root}", "name=scaling", f"data.prompts_per_iteration={prompts}",
                              f"rollout.samples_per_prompt={samples}", "rollout.batch_size=32",
                              "scoring.batch_size=32", "analysis.batch_size=32", "method=topd",
                              f"orchestration.shards={shards}", f"device={device}", *extra])


def stage_inputs(cfg):
    """The first iteration's prompts, rollout, score and analysis inputs, as `run_iteration` builds them."""
    from opd_tasks.method import plan
    from opd_tasks.pipeline import checker_name, max_prompt_tokens, resolve_models
    from opd_tasks.stages import AnalyzeInputs, PromptsInputs, RolloutInputs, ScoreInputs

    models = resolve_models(cfg)
    prompts = PromptsInputs(data=cfg.data, tokenizer=models.initial_student, split="train",
                            n=cfg.data.prompts_per_iteration, offset=0,
                            max_context=max_prompt_tokens(models.initial_student, cfg.rollout.max_new_tokens),
                            seed=cfg.seed)
    return models, prompts, lambda p: RolloutInputs(student=models.initial_student, prompts=p, rollout=cfg.rollout,
                                                    checker=checker_name(cfg), seed=cfg.seed), \
        lambda r: ScoreInputs(teacher=models.teacher, student=models.initial_student, rollouts=r,
                              scoring=cfg.scoring), \
        lambda r, s: AnalyzeInputs(student=models.initial_student, teacher=models.teacher, rollouts=r, scores=s,
                                   analysis=cfg.analysis, weighting=plan(cfg).weighting, bridge=True,
                                   label_roles=checker_name(cfg) == "testbed", seed=cfg.seed)


def shards_run(root: Path, prompts: int, samples: int, shards: int, device: str) -> dict:
    """Rollout, score and analysis of one iteration in `shards` shards through the Prefect executor, in a
    flow."""
    from prefect import flow

    from flows.executors import PrefectExecutor
    from opd_tasks.pipeline import StageRunner, opened_run
    from opd_tasks.stages import ANALYZE, PROMPTS, ROLLOUT, SCORE

    @flow(name="bench-scaling", log_prints=False)
    def run() -> dict:
        cfg = config(root, prompts, samples, shards, device)
        _, prompt_inputs, rollout_inputs, score_inputs, analyze_inputs = stage_inputs(cfg)
        out = {}
        with opened_run(cfg) as (store, lineage, _), StageRunner(
                store, lineage, cfg, PrefectExecutor(cfg.orchestration), log=lambda m: None, progress=False) as runner:
            p = runner(PROMPTS, prompt_inputs, 0)
            t0 = time.perf_counter()
            r = runner(ROLLOUT, rollout_inputs(p), 0)
            t1 = time.perf_counter()
            s = runner(SCORE, score_inputs(r), 0)
            t2 = time.perf_counter()
            a = runner(ANALYZE, analyze_inputs(r, s), 0)
            t3 = time.perf_counter()
        out = {"rollout_s": t1 - t0, "score_s": t2 - t1, "analyze_s": t3 - t2, "rollout_sha256": r.sha256,
               "score_sha256": s.sha256, "analyze_sha256": a.sha256, "sequences": r.rows, "tokens": s.rows,
               "rollout_parts": parts(root, "rollout"), "score_parts": parts(root, "score"),
               "analyze_parts": parts(root, "analyze"), "rollouts": r.model_dump(mode="json"),
               "scores": s.model_dump(mode="json")}
        return out

    return run()


def parts(root: Path, stage: str) -> int:
    """How many parts the stage was computed in (0: unsharded)."""
    from opd_tasks.stages.registry import part_stage

    d = root / "artifacts" / part_stage(stage)
    return sum(1 for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else 0


def update_run(root: Path, rollouts: dict, scores: dict, world_size: int, micro_batch: int, accumulation: int,
               device: str) -> dict:
    """One update on the given rollouts and scores in `world_size` processes: wall time, losses, weights."""
    from safetensors.torch import load_file

    from opd_tasks.models import ModelSpec
    from opd_tasks.stages import UPDATE, UpdateInputs
    from storage.refs import ArtifactRef
    from storage.store import ArtifactStore

    cfg = config(root, 1, 1, 1, device, f"update.world_size={world_size}", f"update.micro_batch_size={micro_batch}",
                 f"update.grad_accumulation={accumulation}")
    models, *_ = stage_inputs(cfg)
    store = ArtifactStore(root)
    inputs = UpdateInputs(student=models.initial_student, rollouts=ArtifactRef.model_validate(rollouts),
                          scores=ArtifactRef.model_validate(scores), analysis=None, teacher=models.teacher,
                          update=cfg.update, bridge=None, seed=cfg.seed)
    t0 = time.perf_counter()
    ref = UPDATE(store, inputs, device=device, progress=False)
    seconds = time.perf_counter() - t0
    student = ModelSpec.from_checkpoint(store, ref, models.initial_student)
    weights = {}
    for f in sorted(student.dir.glob("*.safetensors")):
        weights |= load_file(str(f))
    out = {"seconds": seconds, "losses": store.read_table(ref, "updates").column("loss").to_pylist(),
           "steps": store.manifest(ref)["meta"]["steps"], "weights": weights, "sha256": ref.sha256}
    store.retire(ref)  # the next repetition trains again instead of finding this one in the cache
    return out


def summary(runs: list[dict], timed: tuple[str, ...]) -> dict:
    """One row of the table from the repetitions of one setting: the median of each timing, every repetition's
    timings, equality only if every repetition was identical, the largest differences."""
    row = {k: v for k, v in runs[0].items() if k not in ("rep", "rollouts", "scores", "weights", "losses")}
    for k in timed:
        row[k] = median([r[k] for r in runs])
        row[f"{k}_reps"] = [r[k] for r in runs]
    for k in ("rollout_identical", "score_identical", "analyze_identical"):
        if k in row:
            row[k] = all(r[k] for r in runs)
    for k in ("max_loss_diff", "max_weight_diff"):
        if k in row:
            row[k] = max(r[k] for r in runs)
    return row


def main(argv: list[str]) -> None:
    from flows.server import prefect_api

    ap = argparse.ArgumentParser(prog="python -m bench scaling")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--micro-batch", type=int, default=8, help="update.micro_batch_size")
    ap.add_argument("--grad-accumulation", type=int, default=2,
                    help="update.grad_accumulation: the ranks share each step's micro-batches")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=1, help="repetitions of the whole sweep; the medians are shown")
    ap.add_argument("--out", default=None, help="write the results here (default: bench/results/scaling.json)")
    args = ap.parse_args(argv)
    if args.shards[0] != 1 or args.ranks[0] != 1:
        ap.error("--shards and --ranks start at 1: the others are compared with it")

    runs, update_runs = [], []  # every repetition's figures, the sweeps one after the other
    with tempfile.TemporaryDirectory() as tmp, prefect_api(console.print):
        for rep in range(args.reps):
            for n in args.shards:
                console.print(f"[bold]rep {rep}, {n} shard(s)[/]: rollout, score and analysis of {args.prompts} "
                              f"prompts x {args.samples}")
                got = shards_run(Path(tmp) / f"rep{rep}-shards{n}", args.prompts, args.samples, n, args.device)
                runs.append({"rep": rep, "shards": n, **got})
            first = runs[0]
            for w in args.ranks:
                console.print(f"[bold]rep {rep}, update in {w} process(es)[/]")
                update_runs.append({"rep": rep, "world_size": w, **update_run(
                    Path(tmp) / "rep0-shards1", first["rollouts"], first["scores"], w, args.micro_batch,
                    args.grad_accumulation, args.device)})
    one = runs[0]
    for r in runs:  # every run's artifacts against the first one-shard run's
        r["rollout_identical"] = r["rollout_sha256"] == one["rollout_sha256"]
        r["score_identical"] = r["score_sha256"] == one["score_sha256"]
        r["analyze_identical"] = r["analyze_sha256"] == one["analyze_sha256"]
    rows = [summary([r for r in runs if r["shards"] == n], ("rollout_s", "score_s", "analyze_s"))
            for n in args.shards]
    updates = []
    for w in args.ranks:
        mine = [u for u in update_runs if u["world_size"] == w]
        for u in mine:
            u["max_loss_diff"] = max((abs(a - b) for a, b in zip(u["losses"], update_runs[0]["losses"], strict=True)),
                                     default=0.0)
            u["max_weight_diff"] = max(float((u["weights"][k] - update_runs[0]["weights"][k]).abs().max())
                                       for k in u["weights"])
        updates.append(summary(mine, ("seconds",)))
    one = rows[0]

    shards_table = Table(title=f"shards: {args.prompts} prompts x {args.samples} samples, device {args.device}")
    shards_table.add_column("shards", justify="right")
    for stage in ("rollout", "score", "analyze"):
        for col in ("parts", f"{stage} s", "vs 1", "identical"):
            shards_table.add_column(col, justify="right")
    for r in rows:
        shards_table.add_row(str(r["shards"]), *(cell for stage in ("rollout", "score", "analyze") for cell in (
            str(r[f"{stage}_parts"]), f"{r[f'{stage}_s']:.1f}", f"{r[f'{stage}_s'] / one[f'{stage}_s']:.2f}",
            str(r[f"{stage}_identical"]))))
    console.print(shards_table)
    base = updates[0]
    update_table = Table(title=f"update: world size ({base['steps']} steps of {args.grad_accumulation} "
                               f"micro-batches of {args.micro_batch})")
    for col in ("world size", "seconds", "vs 1", "max |loss diff|", "max |weight diff|"):
        update_table.add_column(col, justify="right")
    for u in updates:
        update_table.add_row(str(u["world_size"]), f"{u['seconds']:.1f}", f"{u['seconds'] / base['seconds']:.2f}",
                             f"{u['max_loss_diff']:.2e}", f"{u['max_weight_diff']:.2e}")
    console.print(update_table)
    results = {
        "args": vars(args),
        "shards": rows,
        "update": updates,
        "runs": [{k: v for k, v in r.items() if k not in ("rollouts", "scores")} for r in runs],
        "update_runs": [{k: v for k, v in u.items() if k not in ("weights", "losses")} for u in update_runs],
    }
    if args.out:
        out = Path(args.out)
        out.write_text(json.dumps({"machine": machine(), **results}, indent=1) + "\n")
    else:
        out = save("scaling", results)
    console.print(f"saved {out}")
