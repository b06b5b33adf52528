"""`opd run`: run the `distill` Prefect flow and print what happened and where to look next.

Without `PREFECT_API_URL`, the command uses the local server opd commands share, starting it when none runs (a few
seconds; it stops after some idle minutes, flows/server.py); with a running `prefect server start` (see
docs/operations.md), runs and artifacts show in its UI.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from opd_tasks.config import RunConfig
from storage.lineage import check_unlocked


def run_and_report(cfg: RunConfig, console: Console, refresh: list[str] | None = None, resume: bool = False) -> dict:
    """The distill flow on `cfg`, then its table. A run another process holds is refused before the Prefect server
    starts (`check_unlocked`; the flow itself takes the lock); the caller has checked the flags (flows/cli/run.py),
    so a refused command writes nothing."""
    from flows.distill import distill
    from flows.server import prefect_api
    from opd_tasks.pipeline import stage_calls
    from opd_tasks.progress import run_display
    from opd_tasks.stages.evaluate import nats, percent

    root = cfg.resolved_root().resolve()
    check_unlocked(root, [cfg.name])
    with prefect_api(lambda line: console.print(line, style="dim", highlight=False,
                                                                            markup=False)):
        console.rule(f"[bold]opd run[/] {cfg.name}: method {cfg.method}, {cfg.iterations} iterations, root {root}")
        console.print(
            f"teacher {cfg.models.teacher.path} | student {cfg.models.student.path} | data {cfg.data.source} | "
            f"{cfg.data.prompts_per_iteration} prompts x {cfg.rollout.samples_per_prompt} samples per iteration | "
            f"device {cfg.device}", highlight=False,
        )
        t0 = time.perf_counter()
        with run_display(Console(stderr=True), total=stage_calls(cfg), title=f"run {cfg.name}"):
            out = distill(cfg.model_dump(mode="json"), refresh=refresh or [], resume=resume)
    t = Table("iteration", "accuracy (per sample)", "reverse KL (nats/token)", "mean loss",
              "high-loss tokens: surface / divergent / unprobed", "stages computed / cached", "seconds",
              title=f"run {cfg.name}: accuracy on {cfg.data.eval_size} held-out prompts per iteration "
                    f"(baseline {percent(out['baseline_accuracy'])}, reverse KL {nats(out['baseline_rkl_per_token'])})")
    for iteration in out["iterations"]:
        stages = iteration["stages"]
        cached = sum(1 for r in stages if r["state"] == "Cached")
        analysis = iteration["analysis"]
        shares = (" / ".join(f"{analysis['share'][r]:.0%}" for r in ("surface", "divergent", "unprobed"))
                  if analysis else "-")
        loss = "skipped (no signal)" if iteration.get("skipped") else f"{iteration['mean_loss']:.4f}"
        t.add_row(str(iteration["iteration"]), percent(iteration["accuracy"]), nats(iteration["rkl_per_token"]),
                  loss, shares, f"{len(stages) - cached} / {cached}", f"{sum(r['seconds'] for r in stages):.1f}")
    console.print(t)
    console.print(f"done in {time.perf_counter() - t0:.0f}s. Artifacts: {root}/artifacts; lineage: "
                  f"{root}/runs/{cfg.name}", highlight=False)
    query = (f"SELECT iteration, stage, avg(correct::INT) AS accuracy FROM evals WHERE run='{cfg.name}' "
             "GROUP BY 1, 2 ORDER BY 1, 2")
    console.print(f'next: opd report {cfg.name} | opd runs | opd sql "{query}" | opd verify {cfg.name}',
                  highlight=False, markup=False)
    return out
