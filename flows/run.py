"""`opd run`: run a distillation and print what happened, stage by stage, and where to look next.

The stages run through the plain driver `opd_tasks.iteration` (every stage content-addressed, so a rerun
computes only what is missing). The Prefect flow that wraps the same stages is in flows/ (when present).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from opd_tasks.config import RunConfig
from opd_tasks.errors import ConfigError

IMPLEMENTED_METHODS = ("opd",)


def run_and_report(cfg: RunConfig, console: Console) -> dict:
    if cfg.method not in IMPLEMENTED_METHODS:
        raise ConfigError(
            f"method: {cfg.method!r} needs the divergence-analysis stage, which this build does not have yet; "
            f"use --method opd (implemented: {', '.join(IMPLEMENTED_METHODS)})"
        )
    from opd_tasks.iteration import run_plain

    root = cfg.resolved_root()
    console.rule(f"[bold]opd run[/] {cfg.name}: method {cfg.method}, {cfg.iterations} iterations, root {root}")
    console.print(
        f"teacher {cfg.models.teacher.path} | student {cfg.models.student.path} | data {cfg.data.source} | "
        f"{cfg.data.prompts_per_iteration} prompts x {cfg.rollout.samples_per_prompt} samples per iteration | "
        f"device {cfg.device}"
    )
    t0 = time.perf_counter()
    out = run_plain(cfg, log=lambda m: console.print(m, highlight=False))
    t = Table("iteration", "accuracy", "mean loss", "stages computed", "stages cached", "seconds",
              title=f"run {cfg.name} (baseline accuracy {out['baseline_accuracy']:.1%})")
    for r in out["iterations"]:
        comp = [s for s, rec in r.stages.items() if not rec.cached]
        cach = [s for s, rec in r.stages.items() if rec.cached]
        t.add_row(str(r.iteration), f"{r.accuracy:.1%}", f"{r.mean_loss:.4f}", ", ".join(comp) or "-",
                  ", ".join(cach) or "-", f"{sum(rec.seconds for rec in r.stages.values()):.1f}")
    console.print(t)
    console.print(f"done in {time.perf_counter() - t0:.0f}s. Artifacts under {root}/artifacts, lineage under "
                  f"{root}/runs/{cfg.name}.")
    query = (f"SELECT iteration, stage, avg(correct::INT) AS accuracy FROM evals WHERE run='{cfg.name}' "
             "GROUP BY 1, 2 ORDER BY 1, 2")
    console.print(f'next: opd runs | opd sql "{query}" | opd verify {cfg.name}', highlight=False, markup=False)
    return out
