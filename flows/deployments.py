"""The deployment executor (`orchestration.stage_runner: deployment`): each GPU stage, and each of its parts, as a
flow run of the stage's own deployment (`opd-stage/<stage>`, flows/stage.py, made by `opd deploy-stages`),
started with `run_deployment`, its parts all at once. Non-GPU stages compute inline (flows/executors.py).

The child runs the same Prefect task as the inline path (`stage_task`, or `part_task` for a part), so keys,
cache records, retries and tags are the same, and the two share one cache. It writes its flow result (JSON) next
to the cache records, `<root>/prefect/results`, through the `env` job variable, so this process reads it back;
both must see the root at the same path (one machine, or a shared volume). If that read fails (e.g. pods with
their own local roots and a remote mirror), the artifact is looked up by its key in the store instead, which
pulls it from the remote.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import to_jsonable_python

from flows.executors import PrefectExecutor
from opd_tasks.config import FaultConfig, OrchestrationConfig
from opd_tasks.errors import ConfigError, OpdError, TransientError
from opd_tasks.stages import Span, Stage, StageContext, StageInputs, stage_deployment_name
from opd_tasks.stages.registry import part_key, part_stage
from storage.refs import ArtifactRef


class StageRunError(OpdError):
    """A stage's own flow run did not complete; names the stage and the flow run.

    The stage's own error class is re-raised where the child's result says what it was (a `DataError` stays
    a `DataError`); this class is used when it does not (a crashed or cancelled flow run).
    """


@dataclass
class DeploymentExecutor:
    """GPU stages and their parts as flow runs of their deployments; the rest through `inline`."""

    orchestration: OrchestrationConfig
    stages: list[str]  # the GPU stages this run calls: each must have its deployment
    fault: FaultConfig | None = None  # passed to the children, which inject it where they compute
    inline: PrefectExecutor = field(init=False)
    deployments: dict[str, Any] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        from opd_tasks.pipeline import with_faults

        self.inline = with_faults(PrefectExecutor(self.orchestration), self.fault)
        self._find_deployments()

    def _find_deployments(self) -> None:
        """Every GPU stage this run calls has its deployment: fail before any work if one is missing."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        from prefect.settings import PREFECT_API_URL

        missing = []
        with get_client(sync_client=True) as client:
            for stage in self.stages:
                name = stage_deployment_name(self.orchestration, stage)
                try:
                    self.deployments[stage] = client.read_deployment_by_name(name)
                except ObjectNotFound:
                    missing.append(name)
        if missing:
            raise ConfigError(
                f"orchestration.stage_runner is 'deployment' but deployment(s) {', '.join(missing)} do not exist on "
                f"the Prefect API {PREFECT_API_URL.value() or '(a temporary local server)'}: create them with "
                "`opd deploy-stages --pool POOL`, start a worker on POOL, and point PREFECT_API_URL at that server")

    def run(self, stage: Stage, ctx: StageContext, inputs: StageInputs, parts: list[Span]) -> ArtifactRef:
        if stage.name not in self.deployments:
            return self.inline.run(stage, ctx, inputs, parts)
        if parts:
            flow_ctx = contextvars.copy_context()  # the flow run's context: each part's flow run is its subflow
            with ThreadPoolExecutor(len(parts)) as threads:
                for r in [threads.submit(flow_ctx.copy().run, self.flow_run, stage, ctx, inputs, span)
                          for span in parts]:
                    r.result()
        return self.flow_run(stage, ctx, inputs)

    def flow_run(self, stage: Stage, ctx: StageContext, inputs: StageInputs, span: Span | None = None) -> ArtifactRef:
        """Run the stage (with `span`, that part) as a flow run of its deployment; wait; its result is the ref."""
        from prefect.deployments import run_deployment

        o, dep = self.orchestration, self.deployments[stage.name]
        results = f"{ctx.root}/prefect/results"
        env = {**((dep.job_variables or {}).get("env") or {}), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": results}
        name = stage_deployment_name(o, stage.name)
        label = (ctx.label or stage.name) + (f"-shard{span.index}" if span is not None else "")
        fr = run_deployment(
            name, timeout=None, as_subflow=True, poll_interval=o.stage_poll_seconds,
            flow_run_name=f"{ctx.run}-it{ctx.iteration}-{label}", job_variables={"env": env},
            parameters={"stage": stage.name, "inputs": to_jsonable_python(inputs), "ctx": ctx.to_json(),
                        "orchestration": o.model_dump(mode="json"),
                        "fault": self.fault.model_dump(mode="json") if self.fault else None,
                        "span": span.__dict__ if span is not None else None})
        where = f"stage {label!r} (deployment {name}) at iteration {ctx.iteration}: its flow run {fr.name!r} ({fr.id})"
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
            return ref if isinstance(ref, ArtifactRef) else ArtifactRef.model_validate(ref)
        except Exception as e:  # noqa: BLE001 - e.g. the child's results are not on this machine
            store = ctx.store
            ref = (store.lookup(stage.name, ctx.key) if span is None
                   else store.lookup(part_stage(stage.name), part_key(ctx, span)))
            if ref is None:
                raise StageRunError(f"{where} completed, but neither its result nor an artifact under its key "
                                    f"can be read here ({type(e).__name__}: {e}); the distill flow and the stage "
                                    "must share the storage root or a remote (docs/scaling.md)") from e
            return ref

    def close(self) -> None:
        self.inline.close()
