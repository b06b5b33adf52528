"""The Prefect flow `opd-stage`: ONE pipeline stage as its own flow run (`orchestration.stage_runner: deployment`).

`opd deploy-stages --pool POOL` creates one deployment of this flow per GPU stage (`opd-stage/rollout`,
`opd-stage/score`, `opd-stage/gates`, `opd-stage/analyze`, `opd-stage/update`, `opd-stage/evaluate`), and the
`distill` flow starts them with `run_deployment` (flows/distill.py, `_Runner._deployment`). Each flow run
calls the same Prefect task as the in-process path (`call_stage_task`), so the cache key, the cache records
under `<root>/prefect/results`, the retries and the concurrency tag are the same, and inline and deployment
runs share one cache. Its result, persisted as JSON, is the stage's `ArtifactRef`.

Parameters are JSON: the stage's own parameters (`params`: config slices, `ModelSpec`s, `ArtifactRef`s as
dicts) are turned back into those types from the stage task's signature before the call.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from prefect import flow
from pydantic import TypeAdapter, ValidationError

from flows.distill import STAGE_TASKS, call_stage_task
from opd_tasks.config import FaultConfig, OrchestrationConfig
from opd_tasks.errors import ConfigError
from storage.refs import ArtifactRef

#: Parameters every stage task takes that the flow passes itself (not part of `params`).
_COMMON = {"root", "remote", "iteration", "run", "fault", "return"}


def typed_params(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    """`params` (JSON) -> the stage task's typed arguments, from its type hints. Unknown or missing names and
    values of the wrong shape are `ConfigError`s naming the stage and the parameter."""
    if stage not in STAGE_TASKS:
        raise ConfigError(f"opd-stage: unknown stage {stage!r}; stages are {', '.join(STAGE_TASKS)}")
    fn = STAGE_TASKS[stage].fn
    hints = typing.get_type_hints(fn)
    names = set(hints) - _COMMON
    unknown = set(params) - names
    if unknown:
        raise ConfigError(f"opd-stage {stage}: unknown parameter(s) {sorted(unknown)}; it takes {sorted(names)}")
    missing = [k for k, p in inspect.signature(fn).parameters.items()
               if k not in _COMMON and k not in params and p.default is inspect.Parameter.empty]
    if missing:
        raise ConfigError(f"opd-stage {stage}: missing parameter(s) {missing}")
    out = {}
    for k, v in params.items():
        try:
            out[k] = TypeAdapter(hints[k]).validate_python(v)
        except ValidationError as e:
            raise ConfigError(f"opd-stage {stage}: parameter {k!r} is not a {hints[k]}: {e}") from None
    return out


@flow(name="opd-stage", log_prints=True, persist_result=True, result_serializer="json")
def opd_stage(stage: str, params: dict[str, Any], root: str, iteration: int = 0, run: str = "adhoc",
              remote: str | None = None, fault: dict[str, Any] | None = None,
              orchestration: dict[str, Any] | None = None, refresh_cache: bool = False) -> ArtifactRef:
    """Run stage `stage` once (its task, with its cache) on the storage `root`; return its ArtifactRef.

    The task's failure (after its retries) fails this flow run with the same error.
    """
    state = call_stage_task(
        stage, root=root, remote=remote, iteration=iteration, run=run,
        fault=FaultConfig.model_validate(fault) if fault is not None else None, params=typed_params(stage, params),
        refresh_cache=refresh_cache, orchestration=OrchestrationConfig.model_validate(orchestration or {}))
    return state.result()
