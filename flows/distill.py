"""The Prefect flow `distill`: a run of OPD iterations, each stage a cached, retried Prefect task.

The loop itself is `opd_tasks.pipeline.run_distillation`, the same code the plain driver runs; this flow only
injects a Prefect executor (flows/executors.py: the generic stage task with the content-key cache policy,
retries and tags; or flows/deployments.py: each GPU stage as a flow run of its own deployment) and publishes,
after each iteration, a table artifact of its stages and a markdown summary. Those are created in the flow
itself, not in a task, so a fully cached run still shows them.

Retries: exponential backoff with jitter; errors marked non-retryable (config, data, model, artifact, training)
are not retried. Cache records are Prefect results (JSON) under `<root>/prefect/results`. A run is locked while
the flow writes it (`opened_run`, the one place the lock is taken): a second flow of the same run name is refused.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from opd_tasks.config import RunConfig
from opd_tasks.pipeline import Distillation, IterationResult, StageRunner, opened_run, run_distillation, with_faults
from opd_tasks.stages.evaluate import nats, percent


def publish_iteration(result: IterationResult, run: Distillation) -> None:
    """The iteration's stages as a Prefect table artifact, and a markdown summary."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in run.run.lower()).strip("-") or "run"
    rows = [r.row() for r in result.stages.values()]
    i = result.iteration
    create_table_artifact(table=rows, key=f"opd-{slug}-stages",
                          description=f"run {run.run}, iteration {i}: stages, artifacts, cache hits, seconds")
    lines = [f"# {run.run}: iteration {i}", "",
             f"accuracy (per sample) {percent(result.accuracy)} (baseline {percent(run.baseline_accuracy)}), "
             f"reverse KL to the teacher {nats(result.rkl_per_token)} nats per token "
             f"(baseline {nats(run.baseline_rkl_per_token)})", "",
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
    with opened_run(cfg, refresh or []) as (store, lineage, chosen):
        with StageRunner(store, lineage, cfg, executor(cfg), refresh=chosen, log=get_run_logger().info) as runner:
            return run_distillation(runner, cfg, resume=resume, on_iteration=publish_iteration).summary()


def executor(cfg: RunConfig):
    """The run's executor: the Prefect one (inline), or the deployment one, with the run's fault drill."""
    from flows.executors import PrefectExecutor

    o = cfg.orchestration
    if o.stage_runner == "deployment":
        from flows.deployments import DeploymentExecutor
        from opd_tasks.pipeline import stages_used
        from opd_tasks.stages import STAGES

        return DeploymentExecutor(o, [s for s in stages_used(cfg) if STAGES[s].gpu], cfg.fault)
    return with_faults(PrefectExecutor(o), cfg.fault)
