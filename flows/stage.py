"""The Prefect flow `opd-stage`: ONE pipeline stage as its own flow run (`orchestration.stage_runner: deployment`).

`opd deploy-stages --pool POOL` creates one deployment of this flow per GPU stage (`opd-stage/rollout`, ...), and
the distill flow starts them with `run_deployment` (flows/runners.py). Each flow run calls the same Prefect task
as the in-process path (`call_stage_task`), so the cache key, the cache records under `<root>/prefect/results`,
the retries and the concurrency tag are the same, and inline and deployment runs share one cache. Its result,
persisted as JSON, is the stage's `ArtifactRef`.

Parameters are JSON: `inputs` is the stage's inputs record (opd_tasks/stages/), validated back into its type;
the key is computed from it here, as the caller did.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from pydantic import ValidationError

from flows.stage_task import call_shard_task, call_stage_task
from opd_tasks.config import FaultConfig, OrchestrationConfig
from opd_tasks.errors import ConfigError
from opd_tasks.stages import STAGES, StageInputs
from opd_tasks.stages.sharding import Span
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
def opd_stage(stage: str, inputs: dict[str, Any], root: str, device: str = "auto", iteration: int = 0,
              run_name: str = "adhoc", remote: str | None = None, fault: dict[str, Any] | None = None,
              orchestration: dict[str, Any] | None = None, refresh_cache: bool = False,
              shard: dict[str, int] | None = None) -> ArtifactRef:
    """Run stage `stage` once (its task, with its cache) on the storage `root`; return its ArtifactRef. With
    `shard` (a span: index, count, start, stop; opd_tasks/stages/sharding.py), compute that shard's part only.

    The task's failure (after its retries) fails this flow run with the same error.
    """
    typed = typed_inputs(stage, inputs)
    common = dict(root=root, remote=remote, device=device, iteration=iteration, run_name=run_name,
                  fault=FaultConfig.model_validate(fault) if fault is not None else None, refresh_cache=refresh_cache,
                  orchestration=OrchestrationConfig.model_validate(orchestration or {}))
    if shard is not None:
        if STAGES[stage].shards is None:
            raise ConfigError(f"opd-stage: stage {stage!r} is not sharded; it takes no shard")
        return call_shard_task(stage, typed, STAGES[stage].key(typed), Span(**shard), **common).result()
    return call_stage_task(stage, typed, STAGES[stage].key(typed), **common).result()
