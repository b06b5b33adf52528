"""The one Prefect task that runs any stage, and its cache policy.

`stage_task` runs a registered stage (opd_tasks/stages/) on its inputs with the shared cache prologue: the
artifact under the stage's key if the store has it, else `fault.*` and the computation. Its result is the
stage's `ArtifactRef`, persisted as JSON (never pickle) under `<root>/prefect/results`, next to the artifacts.

Its Prefect cache key is the stage's content key (`StageKey`): the caller computes it once from the registry
(`Stage.key`: input artifact and model hashes, the config the inputs carry, the seed, the stage's code version;
no flow-run id, no run name, no iteration) and passes it in, so a retry, a rerun of the same run and a new run
with the same inputs all hit the cache, and the store and Prefect agree on what is cached.

Called with a `span`, the same task computes one shard's part of a sharded stage (opd_tasks/stages/sharding.py),
and its cache key is the part's key. `submit_shard_tasks` runs a stage's shards as task runs in a process pool,
each retried alone.

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
from opd_tasks.pipeline import fault_hooks
from opd_tasks.stages import STAGES, StageContext, StageInputs, execute
from opd_tasks.stages.registry import compute_part
from opd_tasks.stages.sharding import Span, part_key, part_stage
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


@dataclass
class StageKey(CachePolicy):
    """The cache key of a `stage_task` call, from its parameters: `opd-<stage>-<the stage's content key>`, or for
    one shard's part `opd-<stage>.part-<the part's key>`."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        if inputs.get("span") is not None:
            return f"opd-{part_stage(inputs['stage'])}-{part_key(inputs['key'], inputs['span'])}"
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
               iteration: int, run_name: str, fault: FaultConfig | None, shards: int = 1,
               span: Span | None = None) -> ArtifactRef:
    """Run stage `stage` on `inputs` (its content key `key`) against the store at `root`; a sharded stage in
    `shards` shards merges their parts (computing here any that are missing). With `span`, only that shard's part
    (stored, or computed; named `<stage>-it<i>-shard<j>` by its caller), without progress bars: the shards of a
    stage run side by side in other processes than the run's display, whose row for the stage stands for them."""
    record, store = STAGES[stage], ArtifactStore(root, remote)
    before_stage, before_part = fault_hooks(store.root, run_name, stage, iteration, fault)
    if span is not None:
        from opd_tasks.backends.loaded import LOADED

        ctx = StageContext(store, stage, key, shard_device(device, span.index), progress=False,
                           before_part=before_part)
        try:
            return compute_part(record, ctx, inputs, span)
        finally:  # a pool process outlives the stage: its models must not hold a GPU the next stages need
            LOADED.release()
    ctx = StageContext(store, stage, key, device, shards=shards, before_part=before_part)
    ref, _ = execute(record, ctx, inputs, before_compute=before_stage)
    return ref


def shard_device(device: str, shard: int) -> str:
    """The device of shard `shard`: on a machine with several GPUs, shards take them in turn (cuda:i); else
    `device`."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{shard % count}" if count > 1 else device


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


def task_options(stage: str, root: str, refresh_cache: bool, orchestration: OrchestrationConfig) -> dict[str, Any]:
    """The options of a stage's (or a shard's) task run in this run."""
    o = orchestration
    opts: dict[str, Any] = dict(result_storage=Path(root) / "prefect" / "results", refresh_cache=refresh_cache,
                                retries=o.retries, retry_delay_seconds=exponential_backoff(o.retry_delay_seconds))
    if STAGES[stage].gpu and tag_is_limited(o.concurrency_tag):
        opts["tags"] = [o.concurrency_tag]
    return opts


def call_stage_task(stage: str, inputs: StageInputs, key: str, *, root: str, remote: str | None, device: str,
                    iteration: int, run_name: str, fault: FaultConfig | None, refresh_cache: bool,
                    orchestration: OrchestrationConfig):
    """Call `stage_task` with this run's options; returns its final Prefect state (result: the ArtifactRef)."""
    return stage_task.with_options(**task_options(stage, root, refresh_cache, orchestration))(
        stage=stage, inputs=inputs, key=key, root=root, remote=remote, device=device, iteration=iteration,
        run_name=run_name, fault=fault, shards=orchestration.shards_for(stage), return_state=True)


def call_shard_task(stage: str, inputs: StageInputs, key: str, span: Span, *, root: str, remote: str | None,
                    device: str, iteration: int, run_name: str, fault: FaultConfig | None, refresh_cache: bool,
                    orchestration: OrchestrationConfig):
    """Call `stage_task` for shard `span` in this process with this run's options (a stage's flow run for one
    shard, flows/stage.py); returns its final Prefect state (result: the part's ArtifactRef)."""
    return shard_options(stage, span, iteration, root, refresh_cache, orchestration)(
        stage=stage, inputs=inputs, key=key, span=span, root=root, remote=remote, device=device, iteration=iteration,
        run_name=run_name, fault=fault, return_state=True)


def shard_options(stage: str, span: Span, iteration: int, root: str, refresh_cache: bool,
                  orchestration: OrchestrationConfig):
    """`stage_task` with this run's options for shard `span`, named `<stage>-it<i>-shard<j>`."""
    return stage_task.with_options(task_run_name=f"{stage}-it{iteration}-shard{span.index}",
                                   **task_options(stage, root, refresh_cache, orchestration))


def shard_pool(processes: int):
    """A Prefect process-pool task runner of `processes` processes for shard task runs (entered; the caller
    closes it with `__exit__`). Parameters and results cross to the processes with cloudpickle, in memory only:
    nothing pickled is ever written or read back.

    Each process keeps torch's default number of CPU threads, as the stage's own process has: on the CPU the
    float results depend on it (a part computed with 1 thread differs in the last bits from one computed with 2),
    and a shard must compute what the unsharded stage computes."""
    from prefect.task_runners import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=processes).__enter__()


def submit_shard_tasks(pool, stage: str, inputs: StageInputs, key: str, spans: list[Span], *, root: str,
                       remote: str | None, device: str, iteration: int, run_name: str, fault: FaultConfig | None,
                       refresh_cache: bool, orchestration: OrchestrationConfig) -> list[ArtifactRef]:
    """Run each shard of `spans` as its own task run on `pool` (side by side, each retried alone); wait for all;
    the parts' refs. The first shard that failed after its retries raises its error, once all have ended."""
    futures = [pool.submit(shard_options(stage, span, iteration, root, refresh_cache, orchestration),
                           {"stage": stage, "inputs": inputs, "key": key, "span": span, "root": root,
                            "remote": remote, "device": device, "iteration": iteration, "run_name": run_name,
                            "fault": fault})
               for span in spans]
    for f in futures:
        f.wait()
    return [f.result() for f in futures]
