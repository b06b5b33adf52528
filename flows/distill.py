"""The Prefect flow `distill`: a run of OPD iterations, each stage a cached, retried Prefect task.

The loop itself is `opd_tasks.pipeline.run_distillation`, the same code the plain driver runs; this flow only
injects the Prefect stage runner (flows/runners.py: the generic stage task with the content-key cache policy,
retries and tags, or a stage's own deployment) and publishes, after each iteration, a table artifact of its
stages and a markdown summary. Those are created in the flow itself, not in a cached task, so a fully cached run
still shows them.

Retries: exponential backoff with jitter; errors marked non-retryable (config, data, model, artifact, training)
are not retried (flows/stage_task.py). Cache records are Prefect results (JSON) under `<root>/prefect/results`.
A run is locked while the flow writes it (`storage.lineage.run_lock`): a second flow of the same run name is refused.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.runners import PrefectStageRunner
from opd_tasks.config import RunConfig
from opd_tasks.pipeline import Distillation, IterationResult, check_refresh, open_run, run_distillation
from storage.lineage import run_lock


def publish_iteration(result: IterationResult, run: Distillation) -> None:
    """The iteration's stages as a Prefect table artifact, and a markdown summary."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in run.run.lower()).strip("-") or "run"
    rows = [r.row() for r in result.stages.values()]
    i = result.iteration
    create_table_artifact(table=rows, key=f"opd-{slug}-stages",
                          description=f"run {run.run}, iteration {i}: stages, artifacts, cache hits, seconds")
    lines = [f"# {run.run}: iteration {i}", "",
             f"accuracy (per sample) {result.accuracy:.1%} (baseline {run.baseline_accuracy:.1%})", "",
             "| stage | state | seconds | rows | artifact |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['state']} | {r['seconds']:.1f} | {r['rows']} | `{r['uri']}` |" for r in rows]
    lines += ["", f"Query: `opd sql \"SELECT * FROM evals WHERE run='{run.run}' AND iteration={i}\"`"]
    create_markdown_artifact(markdown="\n".join(lines), key=f"opd-{slug}-report",
                             description=f"run {run.run}, iteration {i}")


@flow(name="distill", log_prints=True, validate_parameters=False, result_serializer="json")
def distill(config: dict, refresh: list[str] | None = None, resume: bool = False) -> dict:
    """Run `config["iterations"]` OPD iterations of run `config["name"]`; returns a JSON summary.

    `refresh`: stages to recompute (their stored artifacts are retired first). With `resume`, continue the named
    run: start after its latest recorded update, from that checkpoint, on the next slices of prompts (what a
    scheduled "nightly distillation" does). Without it, iterations start at 0 from the configured student (and
    are cache hits where they already ran).
    """
    cfg = RunConfig.model_validate(config)
    check_refresh(refresh or [])  # before open_run records the run: a refused flag writes nothing
    with run_lock(cfg.resolved_root(), [cfg.name]):
        store, lineage = open_run(cfg)
        with PrefectStageRunner(store, lineage, cfg, refresh=refresh or [], log=get_run_logger().info) as runner:
            return run_distillation(runner, cfg, resume=resume, on_iteration=publish_iteration).summary()
