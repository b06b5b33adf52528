"""The Prefect executor: where the distill flow's stage calls compute (opd_tasks/pipeline.py, `Executor`).

`stage_task` is `run_stage` as a Prefect task: its cache key is the stage's content key (`StageKey`: the runner
computed it once from the stage table; no flow-run id, run name or iteration), its result the `ArtifactRef` as
JSON (never pickle) under `<root>/prefect/results`, next to the artifacts. The runner calls the executor only on
a store miss, so every call runs with `refresh_cache=True`: the store decides what is cached, and a Prefect
record whose artifact was deleted or retired never stands in for it.

`PrefectExecutor.run` computes a planned call: its missing parts first, each a task run of `part_task` in a
process pool of `orchestration.shard_processes` processes (kept for the whole flow, so each is retried alone and
loads its models once), then the stage itself as a task run in this flow's process. `task_options` is the one
place the run's options are set: result storage under the root, retries with exponential backoff (not for a
config, data, model, artifact or training error), and the GPU concurrency tag on GPU stages when a limit on it
exists (`tag_is_limited`). flows/deployments.py runs the same tasks as flow runs of the stages' deployments.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.tasks import exponential_backoff

from opd_tasks.config import OrchestrationConfig
from opd_tasks.errors import OpdError
from opd_tasks.pipeline import Compute
from opd_tasks.stages import STAGES, Span, Stage, StageContext, StageInputs, run_stage, shards_for
from opd_tasks.stages.registry import part_key, part_stage
from storage.refs import ArtifactRef


@dataclass
class StageKey(CachePolicy):
    """The cache key of a stage or part task run: `opd-<stage>-<the stage's content key>`, or for one part
    `opd-<stage>.part-<the part's key>`."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str:
        stage, ctx, span = inputs["stage"], inputs["ctx"], inputs.get("span")
        if span is not None:
            return f"opd-{part_stage(stage.name)}-{part_key(ctx, span)}"
        return f"opd-{stage.name}-{ctx.key}"


def _should_retry(task, task_run, state) -> bool:
    """Retry unless the failure is an OpdError that says it is not retryable (config, data, ...)."""
    try:
        state.result(raise_on_failure=True)
    except OpdError as e:
        return e.retryable
    except Exception:  # noqa: BLE001 - unknown failures (OOM, CUDA, I/O) may be transient
        return True
    return False


def task_run_name() -> str:
    """`<stage>-it<i>`, or `<stage>-it<i>-shard<j>` for a part: what the Prefect UI lists."""
    from prefect.runtime import task_run

    p = task_run.parameters
    span = p.get("span")
    return f"{p['stage'].name}-it{p['ctx'].iteration}" + (f"-shard{span.index}" if span is not None else "")


#: Every stage task's settings; `task_options` adds the run's.
TASK_SETTINGS = dict(name="stage", task_run_name=task_run_name, cache_policy=StageKey(), result_serializer="json",
                     persist_result=True, retry_condition_fn=_should_retry, retry_jitter_factor=0.5)

stage_task = task(run_stage, **TASK_SETTINGS)


def task_of(compute: Compute):
    """The task that runs `compute` for a stage: `stage_task`, or one around a wrapped compute (a fault drill)."""
    if compute is run_stage:
        return stage_task

    def run_stage_with_faults(stage: Stage, ctx: StageContext, inputs: StageInputs, span: Span | None = None):
        return compute(stage, ctx, inputs, span)

    return task(run_stage_with_faults, **TASK_SETTINGS)


@task(**TASK_SETTINGS)
def part_task(stage: Stage, ctx: StageContext, inputs: StageInputs, span: Span, compute: Compute = run_stage
              ) -> ArtifactRef:
    """One part, in a pool process that outlives the stage: its models are released after it, so they hold no GPU
    the next stages need."""
    from opd_tasks.backends.loaded import LOADED

    try:
        return compute(stage, ctx, inputs, span)
    finally:
        LOADED.release()


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


def task_options(stage: Stage, root: str, orchestration: OrchestrationConfig) -> dict[str, Any]:
    """The options of a stage's (or a part's) task run in this run."""
    o = orchestration
    opts: dict[str, Any] = dict(result_storage=Path(root) / "prefect" / "results", refresh_cache=True,
                                retries=o.retries, retry_delay_seconds=exponential_backoff(o.retry_delay_seconds))
    if stage.gpu and tag_is_limited(o.concurrency_tag):
        opts["tags"] = [o.concurrency_tag]
    return opts


def part_device(device: str, index: int) -> str:
    """The device of part `index`: on a machine with several GPUs, parts take them in turn (cuda:i); else
    `device`."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    count = torch.cuda.device_count()
    return f"cuda:{index % count}" if count > 1 else device


@dataclass
class PrefectExecutor:
    """Parts as task runs in a process pool, then the stage as a task run here (module docstring)."""

    orchestration: OrchestrationConfig
    compute: Compute = run_stage
    _pool: Any = field(default=None, repr=False)

    def run(self, stage: Stage, ctx: StageContext, inputs: StageInputs, parts: list[Span]) -> ArtifactRef:
        if parts:
            self.run_parts(stage, ctx, inputs, parts)
        return task_of(self.compute).with_options(**task_options(stage, ctx.root, self.orchestration))(
            stage=stage, ctx=ctx, inputs=inputs)

    def run_parts(self, stage: Stage, ctx: StageContext, inputs: StageInputs, parts: list[Span]) -> None:
        """Each part its own task run in the pool, side by side, each retried alone; the first that failed after
        its retries raises its error once all have ended. Parameters cross to the processes with cloudpickle, in
        memory only: nothing pickled is written or read back. Each process keeps torch's default number of CPU
        threads, as this one has: on the CPU the float results depend on it."""
        if self._pool is None:
            from prefect.task_runners import ProcessPoolTaskRunner

            o = self.orchestration
            self._pool = ProcessPoolTaskRunner(
                max_workers=o.shard_processes or max(shards_for(o, s) for s in STAGES)).__enter__()
        options = task_options(stage, ctx.root, self.orchestration)
        try:
            futures = [self._pool.submit(part_task.with_options(**options), {
                "stage": stage, "ctx": replace(ctx, device=part_device(ctx.device, span.index), progress=False),
                "inputs": inputs, "span": span, "compute": self.compute}) for span in parts]
            for f in futures:
                f.wait()
            for f in futures:
                f.result()
        except BaseException:  # a process that died breaks the pool: the next stage gets a new one
            self.close()
            raise

    def close(self) -> None:
        if self._pool is not None:
            self._pool.__exit__(None, None, None)
            self._pool = None
