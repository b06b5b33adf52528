"""How the distill flow calls a stage: `PrefectStageRunner`, the loop's stage runner under Prefect.

It differs from the plain driver's (opd_tasks/pipeline.py, `StageRunner`) only in `call`: where the stages run
(`orchestration.stage_runner`):
- `inline` (the default): the generic stage task (flows/stage_task.py) in this flow's process;
- `deployment`: each GPU stage as a flow run of its own deployment (`opd-stage/<stage>`, flows/stage.py, made by
  `opd deploy-stages`), started with `run_deployment`; the `ArtifactRef` is that flow run's result. The child
  calls the same task through `call_stage_task`, so its cache key, cache records, retries and tags are those of
  the inline path, and the two share one cache.
Before each call the runner has looked the artifact up under its key: if it is missing (deleted, or retired by
`--refresh`), the task runs with `refresh_cache=True` instead of trusting a cache record; after the call, a ref
that no longer matches the store (a stale cache record) is recomputed once.

A sharded stage (`orchestration.shards` > 1, opd_tasks/stages/sharding.py) first gets its missing parts: inline,
each shard a task run in a process pool of `orchestration.shard_processes` processes (kept for the whole flow);
deployment, each shard a flow run of the stage's deployment, all started at once. Each is retried alone. Then the
stage's own call (its task here, or its flow run) merges the parts.
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic_core import to_jsonable_python

from flows.stage_task import call_stage_task, shard_pool, submit_shard_tasks
from opd_tasks.errors import ConfigError, OpdError, TransientError
from opd_tasks.pipeline import StageRunner, stages_used
from opd_tasks.stages import STAGES, Stage, StageInputs
from opd_tasks.stages.sharding import Span, part_key, part_stage
from storage.refs import ArtifactRef


class StageRunError(OpdError):
    """A stage's own flow run (stage_runner: deployment) did not complete; names the stage and the flow run.

    The stage's own error class is re-raised where the child's result says what it was (a `DataError` stays
    a `DataError`); this class is used when it does not (a crashed or cancelled flow run).
    """


class PrefectStageRunner(StageRunner):
    """The loop's stage runner inside the distill flow (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deployments: dict[str, Any] = {}  # stage -> its Prefect deployment (stage_runner: deployment)
        self._pool = None  # the shard processes (inline), started by the first sharded stage
        if self.cfg.orchestration.stage_runner == "deployment":
            self._find_deployments([s for s in stages_used(self.cfg) if STAGES[s].gpu])

    def _find_deployments(self, stages: list[str]) -> None:
        """Every GPU stage this run calls has its deployment: fail before any work if one is missing."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL

        o = self.cfg.orchestration
        missing = []
        with get_client(sync_client=True) as client:
            for stage in stages:
                name = o.stage_deployment_name(stage)
                try:
                    self.deployments[stage] = client.read_deployment_by_name(name)
                except ObjectNotFound:
                    missing.append(name)
        if missing:
            raise ConfigError(
                f"orchestration.stage_runner is 'deployment' but deployment(s) {', '.join(missing)} do not exist on "
                f"the Prefect API {PREFECT_API_URL.value() or '(a temporary local server)'}: create them with "
                "`opd deploy-stages --pool POOL`, start a worker on POOL, and point PREFECT_API_URL at that server")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.__exit__(None, None, None)
            self._pool = None

    def call(self, stage: Stage, inputs: StageInputs, key: str, iteration: int, label: str,
             existing: ArtifactRef | None) -> tuple[ArtifactRef, bool]:
        if existing is None:
            self._shards(stage, inputs, key, iteration, label)
        call = self._deployment if stage.name in self.deployments else self._inline
        ref, state = call(stage, inputs, key, iteration, label, refresh=existing is None, fault=self.cfg.fault)
        current = self.store.lookup(stage.name, ref.key)
        if current is None or current.sha256 != ref.sha256:  # a stale cache record: recompute once
            ref, state = call(stage, inputs, key, iteration, label, refresh=True, fault=None)
        return ref, state == "Cached"

    def _shards(self, stage: Stage, inputs: StageInputs, key: str, iteration: int, label: str) -> None:
        """The stage's missing parts, each shard its own task run (inline) or flow run (deployment)."""
        spans = self.shards(stage, inputs, key)
        missing = [s for s in spans if self.store.lookup(part_stage(stage.name), part_key(key, s)) is None]
        if not missing:
            return
        self.log(f"it{iteration} {label}: {len(spans)} shards, {len(missing)} to compute")
        if stage.name in self.deployments:
            ctx = contextvars.copy_context()  # the flow run's context, so each shard's flow run is its subflow
            with ThreadPoolExecutor(len(missing)) as threads:
                runs = [threads.submit(ctx.copy().run, self._deployment, stage, inputs, key, iteration, label,
                                       True, self.cfg.fault, span) for span in missing]
                for r in runs:
                    r.result()
            return
        if self._pool is None:
            o = self.cfg.orchestration
            self._pool = shard_pool(o.shard_processes or max(o.shards_for(s) for s in STAGES))
        try:
            submit_shard_tasks(self._pool, stage.name, inputs, key, missing, root=str(self.store.root),
                               remote=self.store.remote_uri, device=self.cfg.device, iteration=iteration,
                               run_name=self.cfg.name, fault=self.cfg.fault, refresh_cache=True,
                               orchestration=self.cfg.orchestration)
        except BaseException:  # a process that died breaks the pool: the next sharded stage gets a new one
            self.close()
            raise

    def _inline(self, stage: Stage, inputs: StageInputs, key: str, iteration: int, label: str, refresh: bool,
                fault) -> tuple[ArtifactRef, str]:
        state = call_stage_task(stage.name, inputs, key, root=str(self.store.root), remote=self.store.remote_uri,
                                device=self.cfg.device, iteration=iteration, run_name=self.cfg.name, fault=fault,
                                refresh_cache=refresh, orchestration=self.cfg.orchestration)
        return state.result(), state.name  # result() raises the stage's error if it failed after its retries

    def _deployment(self, stage: Stage, inputs: StageInputs, key: str, iteration: int, label: str, refresh: bool,
                    fault, shard: Span | None = None) -> tuple[ArtifactRef, str]:
        """Run the stage (with `shard`, that shard's part) as a flow run of its deployment; wait; its result is
        the ArtifactRef.

        The child writes its flow result (JSON) next to the cache records, `<root>/prefect/results`, through
        the `env` job variable, so this process reads it back; both must see the root at the same path (one
        machine, or a shared volume). If that read fails (e.g. pods with their own local roots and a remote
        mirror), the artifact is looked up by its key in the store instead, which pulls it from the remote.
        """
        from prefect.deployments import run_deployment

        o, dep = self.cfg.orchestration, self.deployments[stage.name]
        results = str(self.store.root / "prefect" / "results")
        env = {**((dep.job_variables or {}).get("env") or {}), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": results}
        name = o.stage_deployment_name(stage.name)
        label += f"-shard{shard.index}" if shard is not None else ""
        fr = run_deployment(
            name, timeout=None, as_subflow=True, poll_interval=o.stage_poll_seconds,
            flow_run_name=f"{self.cfg.name}-it{iteration}-{label}", job_variables={"env": env},
            parameters={"stage": stage.name, "inputs": to_jsonable_python(inputs), "root": str(self.store.root),
                        "remote": self.store.remote_uri, "device": self.cfg.device, "iteration": iteration,
                        "run_name": self.cfg.name, "fault": fault.model_dump(mode="json") if fault else None,
                        "orchestration": o.model_dump(mode="json"), "refresh_cache": refresh,
                        "shard": to_jsonable_python(shard)})
        where = (f"stage {label!r} (deployment {name}) at iteration {iteration}: its flow run {fr.name!r} "
                 f"({fr.id})")
        st = fr.state
        if st is None or not st.is_completed():
            err: BaseException | None = None
            if st is not None and st.is_failed():
                try:
                    st.result(raise_on_failure=True)
                except OpdError as e:  # the stage's own error, read back from the child's result
                    err = e
                except Exception:  # noqa: BLE001 - result not readable here: the state's message says it
                    pass
            cls = type(err) if err is not None else (TransientError if st is not None and st.is_crashed()
                                                     else StageRunError)
            msg = (st.message if st is not None else None) or (str(err) if err else "no message")
            raise cls(f"{where} ended {st.name if st is not None else 'without a state'}: {msg}")
        try:
            ref = st.result()
            if not isinstance(ref, ArtifactRef):
                ref = ArtifactRef.model_validate(ref)
        except Exception as e:  # noqa: BLE001 - e.g. the child's results are not on this machine
            ref = (self.store.lookup(stage.name, key) if shard is None
                   else self.store.lookup(part_stage(stage.name), part_key(key, shard)))
            if ref is None:
                raise StageRunError(f"{where} completed, but neither its result nor an artifact under its key "
                                    f"can be read here ({type(e).__name__}: {e}); the distill flow and the stage "
                                    "must share the storage root or a remote (docs/scaling.md)") from e
            self.log(f"{where}: result not readable here ({e}); took {ref.short()} from the store")
        if shard is not None:  # a part: whether it was cached is not recorded anywhere
            return ref, "Completed"
        return ref, child_task_state(fr.id, f"{stage.name}-it{iteration}", self.log)


def child_task_state(flow_run_id, task_run: str, log) -> str:
    """The final state name (Cached, Completed) of the task run named `task_run` inside a stage's flow run.

    Task run states reach the API as events, a moment after the flow run itself is final: wait briefly.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        for _ in range(60):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = [r for r in runs if r.name == task_run and r.state is not None and r.state.is_final()]
            if done:
                return max(done, key=lambda r: r.expected_start_time or r.created).state.name
            time.sleep(0.5)
    log(f"flow run {flow_run_id}: the {task_run} task's final state is not in the API yet; recorded as computed")
    return "Completed"
