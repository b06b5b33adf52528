"""The one Prefect task that runs any stage, and its cache policy.

`stage_task` runs a registered stage (opd_tasks/stages/) on its inputs with the shared cache prologue: the
artifact under the stage's key if the store has it, else `fault.*` and the computation. Its result is the
stage's `ArtifactRef`, persisted as JSON (never pickle) under `<root>/prefect/results`, next to the artifacts.

Its Prefect cache key is the stage's content key (`StageKey`): the caller computes it once from the registry
(`Stage.key`: input artifact and model hashes, the config the inputs carry, the seed, the stage's code version;
no flow-run id, no run name, no iteration) and passes it in, so a retry, a rerun of the same run and a new run
with the same inputs all hit the cache, and the store and Prefect agree on what is cached.

`call_stage_task` sets the options that depend on the run (result storage under its root, retries with
exponential backoff, the GPU concurrency tag when a limit on it exists: `tag_is_limited`). The distill flow
(flows/runners.py) and a stage's own flow run (flows/stage.py) both go through it, so a stage behaves the same
in-process and as a deployment.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.tasks import exponential_backoff

from opd_tasks.config import FaultConfig, OrchestrationConfig
from opd_tasks.errors import OpdError
from opd_tasks.pipeline import inject_fault
from opd_tasks.stages import STAGES, StageContext, StageInputs, execute
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


@dataclass
class StageKey(CachePolicy):
    """The cache key of a `stage_task` call: `opd-<stage>-<the stage's content key>`, from its parameters."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        return f"opd-{inputs['stage']}-{inputs['key']}"


def _should_retry(task, task_run, state) -> bool:
    """Retry unless the failure is an OpdError that says it is not retryable (config, data, ...)."""
    try:
        state.result(raise_on_failure=True)
    except OpdError as e:
        return e.retryable
    except Exception:  # noqa: BLE001 - unknown failures (OOM, CUDA, I/O) may be transient
        return True
    return False


@task(name="stage", task_run_name="{stage}-it{iteration}", cache_policy=StageKey(), result_serializer="json",
      persist_result=True, retry_condition_fn=_should_retry, retry_jitter_factor=0.5)
def stage_task(stage: str, inputs: StageInputs, key: str, root: str, remote: str | None, device: str,
               iteration: int, run_name: str, fault: FaultConfig | None) -> ArtifactRef:
    """Run stage `stage` on `inputs` (its content key `key`) against the store at `root`."""
    record, store = STAGES[stage], ArtifactStore(root, remote)
    ref, _ = execute(record, StageContext(store, stage, key, device), inputs,
                     before_compute=lambda: inject_fault(store.root, run_name, stage, iteration, fault))
    return ref


#: How long a process trusts its answer to "is there a concurrency limit on the GPU tag?" (seconds).
TAG_CHECK_SECONDS = 60.0
_tag_checks: dict[tuple[str, str], tuple[float, bool]] = {}


def tag_is_limited(tag: str) -> bool:
    """Whether the Prefect API has a concurrency limit on `tag` (`prefect concurrency-limit create gpu N`, or a global
    limit named `tag:gpu`). GPU stages carry the tag only then: a tagged task run asks the API for a slot of it
    whether or not a limit exists, about 0.17 s per task run on 2 cores (docs/benchmarks.md), for nothing. Checked
    at most once per TAG_CHECK_SECONDS per process, so a limit created while a run goes on applies within a minute."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    where = (str(PREFECT_API_URL.value()), tag)
    checked = _tag_checks.get(where)
    if checked is not None and time.monotonic() - checked[0] < TAG_CHECK_SECONDS:
        return checked[1]
    limited = False
    with get_client(sync_client=True) as client:
        for read in (lambda: client.read_global_concurrency_limit_by_name(f"tag:{tag}"),
                     lambda: client.read_concurrency_limit_by_tag(tag)):
            try:
                read()
                limited = True
                break
            except ObjectNotFound:
                continue
    _tag_checks[where] = (time.monotonic(), limited)
    return limited


def call_stage_task(stage: str, inputs: StageInputs, key: str, *, root: str, remote: str | None, device: str,
                    iteration: int, run_name: str, fault: FaultConfig | None, refresh_cache: bool,
                    orchestration: OrchestrationConfig):
    """Call `stage_task` with this run's options; returns its final Prefect state (result: the ArtifactRef)."""
    o = orchestration
    opts: dict[str, Any] = dict(result_storage=Path(root) / "prefect" / "results", refresh_cache=refresh_cache,
                                retries=o.retries, retry_delay_seconds=exponential_backoff(o.retry_delay_seconds))
    if STAGES[stage].gpu and tag_is_limited(o.concurrency_tag):
        opts["tags"] = [o.concurrency_tag]
    return stage_task.with_options(**opts)(stage=stage, inputs=inputs, key=key, root=root, remote=remote,
                                           device=device, iteration=iteration, run_name=run_name, fault=fault,
                                           return_state=True)
