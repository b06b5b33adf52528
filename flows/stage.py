"""The Prefect flow `opd-stage`: ONE pipeline stage, or one part of it, as its own flow run
(`orchestration.stage_runner: deployment`).

`opd deploy-stages --pool POOL` creates one deployment of this flow per GPU stage (`opd-stage/rollout`, ...), and
the distill flow's deployment executor starts them with `run_deployment` (flows/deployments.py). Each flow run
calls the same Prefect task as the inline path (flows/executors.py: `stage_task`, or `part_task` for a part), so
the cache key, the cache records under `<root>/prefect/results`, the retries and the concurrency tag are the
same, and inline and deployment runs share one cache. Its result, persisted as JSON, is the `ArtifactRef`.

Parameters are JSON: `inputs` is the stage's inputs record (opd_tasks/stages/inputs.py), validated back into its
type; `ctx` is the planned call's context (its key, parts and `prepare` result), as the caller planned it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import ValidationError

from flows.executors import part_task, task_of, task_options
from opd_tasks.config import FaultConfig, OrchestrationConfig
from opd_tasks.errors import ConfigError
from opd_tasks.pipeline import FaultInjection
from opd_tasks.stages import STAGES, Span, StageContext, StageInputs, run_stage
from storage.refs import ArtifactRef


def typed_inputs(stage: str, inputs: dict[str, Any]) -> StageInputs:
    """JSON -> stage `stage`'s inputs record; an unknown stage, or a missing, unknown or malformed field is a
    ConfigError naming the stage and the field."""
    if stage not in STAGES:
        raise ConfigError(f"opd-stage: unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    try:
        return STAGES[stage].inputs.model_validate(inputs)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<inputs>'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"opd-stage {stage}: bad inputs: {problems}") from None


@flow(name="opd-stage", log_prints=True, persist_result=True, result_serializer="json")
def opd_stage(stage: str, inputs: dict[str, Any], ctx: dict[str, Any], orchestration: dict[str, Any] | None = None,
              fault: dict[str, Any] | None = None, span: dict[str, int] | None = None) -> ArtifactRef:
    """Compute stage `stage` once (its task), or with `span` (index, count, start, stop) that part of it; return
    its ArtifactRef. The task's failure (after its retries) fails this flow run with the same error."""
    record, typed = STAGES[stage] if stage in STAGES else None, typed_inputs(stage, inputs)
    context = StageContext.from_json(ctx)
    if context.stage != stage or context.key != record.key(typed):
        raise ConfigError(f"opd-stage {stage}: the context is for {context.stage}/{context.key}, not these inputs "
                          f"(key {record.key(typed)})")
    compute = run_stage if fault is None else FaultInjection(run_stage, FaultConfig.model_validate(fault))
    options = task_options(record, context.root, OrchestrationConfig.model_validate(orchestration or {}))
    if span is not None:
        if record.rows is None:
            raise ConfigError(f"opd-stage: stage {stage!r} is not row-parallel; it takes no span")
        return part_task.with_options(**options)(stage=record, ctx=context, inputs=typed, span=Span(**span),
                                                 compute=compute)
    return task_of(compute).with_options(**options)(stage=record, ctx=context, inputs=typed)
