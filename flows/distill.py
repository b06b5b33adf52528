"""The Prefect flow `distill`: OPD iterations as cached, retried tasks over the plain stage functions.

Each stage is a `@task` that wraps one `opd_tasks` function and returns its `ArtifactRef` (JSON results, never
pickle). Its Prefect cache key is the stage's content key (input artifact hashes + config slice + seed + stage
code version; no flow-run id, no run name, no iteration), so a retry, a rerun of the same run and a new run
with the same inputs all hit the cache. Prefect's result store lives under `<root>/prefect/results`, next to
the artifacts. Before each call the flow checks that the artifact behind the key still exists; if it was
deleted (or `--refresh STAGE` retired it), the task is called with `refresh_cache=True` and recomputes.

Retries: exponential backoff with jitter; errors marked non-retryable (config, data, model, artifact,
training) are not retried. A report task (never cached) publishes a Prefect table and markdown artifact per
iteration, so a fully cached run still shows them.

Where the stages run (`orchestration.stage_runner`): `inline` (the default) calls every stage task in this
flow's process. `deployment` runs each GPU stage as a flow run of its own deployment (`opd-stage/<stage>`,
flows/stage.py, created by `opd deploy-stages`) with `run_deployment`, waits for it, and takes the
`ArtifactRef` from that flow run's result. The child calls the same task through `call_stage_task`, so its
cache key, cache records, retries and tags are the same as inline, and the two runners share one cache.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic_core import to_jsonable_python

from opd_tasks.analyze import analyze, analyze_key
from opd_tasks.common import ModelSpec
from opd_tasks.config import (
    GPU_STAGES,
    AnalysisConfig,
    DataConfig,
    EvaluationConfig,
    FaultConfig,
    GatesConfig,
    OrchestrationConfig,
    RolloutConfig,
    RunConfig,
    ScoringConfig,
    UpdateConfig,
)
from opd_tasks.errors import ConfigError, OpdError, TransientError
from opd_tasks.evaluate import accuracy, evaluate, evaluate_key
from opd_tasks.gates import check_gates, gates, gates_key
from opd_tasks.iteration import _max_prompt_tokens, checker_name, resolve_models
from opd_tasks.prompts import prepare_prompts, prompts_key
from opd_tasks.rollout import rollout, rollout_key
from opd_tasks.scoring import score_key, score_teacher
from opd_tasks.update import update, update_key
from storage.lineage import RunLineage
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

STAGES = ("prompts", "rollout", "score", "gates", "analyze", "update", "evaluate")


def _should_retry(task, task_run, state) -> bool:
    """Retry unless the failure is an OpdError that says it is not retryable (config, data, ...)."""
    try:
        state.result(raise_on_failure=True)
    except OpdError as e:
        return e.retryable
    except Exception:  # noqa: BLE001 - unknown failures (OOM, CUDA, I/O) may be transient
        return True
    return False


def _fault(root: str, run: str, stage: str, iteration: int, fault: FaultConfig | None) -> None:
    """Injected fault (tests, drills): fail once at (stage, iteration); a marker file makes it once."""
    if fault is None or fault.stage != stage or fault.iteration != iteration:
        return
    marker = Path(root) / "faults" / f"{run}.{stage}.it{iteration}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    raise TransientError(f"injected fault: stage {stage!r} at iteration {iteration} (fault.* in the config)")


def _key(stage: str, k: str) -> str:
    return f"opd-{stage}-{k}"


TASK_OPTS: dict[str, Any] = dict(result_serializer="json", persist_result=True, retry_condition_fn=_should_retry,
                                 retry_jitter_factor=0.5)


@task(name="prompts", task_run_name="prompts-it{iteration}", **TASK_OPTS,
      cache_key_fn=lambda c, p: _key("prompts", prompts_key(p["data"], p["tokenizer_model"], p["split"], p["n"],
                                                            p["offset"], p["seed"], p["max_context"])))
def prompts_task(root: str, data: DataConfig, tokenizer_model: ModelSpec, split: str, n: int, offset: int, seed: int,
                 max_context: int | None, iteration: int, run: str, fault: FaultConfig | None = None,
                 remote: str | None = None) -> ArtifactRef:
    _fault(root, run, "prompts", iteration, fault)
    return prepare_prompts(ArtifactStore(root, remote), data, tokenizer_model, split, n, offset, seed, max_context)


@task(name="rollout", task_run_name="rollout-it{iteration}", **TASK_OPTS,
      cache_key_fn=lambda c, p: _key("rollout", rollout_key(p["student"], p["prompts"], p["cfg"], p["seed"],
                                                            p["checker"])))
def rollout_task(root: str, student: ModelSpec, prompts: ArtifactRef, cfg: RolloutConfig, seed: int, checker: str,
                 device: str, iteration: int, run: str, fault: FaultConfig | None = None,
                 remote: str | None = None) -> ArtifactRef:
    _fault(root, run, "rollout", iteration, fault)
    return rollout(ArtifactStore(root, remote), student, prompts, cfg, seed, checker, device)


@task(name="score", task_run_name="score-it{iteration}", **TASK_OPTS,
      cache_key_fn=lambda c, p: _key("score", score_key(p["teacher"], p["rollouts"], p["cfg"])))
def score_task(root: str, teacher: ModelSpec, student: ModelSpec, rollouts: ArtifactRef, cfg: ScoringConfig,
               device: str, iteration: int, run: str, fault: FaultConfig | None = None,
               remote: str | None = None) -> ArtifactRef:
    _fault(root, run, "score", iteration, fault)
    return score_teacher(ArtifactStore(root, remote), teacher, student, rollouts, cfg, device)


@task(name="gates", task_run_name="gates-it{iteration}", **TASK_OPTS,
      cache_key_fn=lambda c, p: _key("gates", gates_key(p["student"], p["teacher"], p["rollouts"], p["scores"],
                                                        p["cfg"])))
def gates_task(root: str, student: ModelSpec, teacher: ModelSpec, rollouts: ArtifactRef, scores: ArtifactRef,
               cfg: GatesConfig, device: str, iteration: int, run: str,
               fault: FaultConfig | None = None, remote: str | None = None) -> ArtifactRef:
    _fault(root, run, "gates", iteration, fault)
    return gates(ArtifactStore(root, remote), student, teacher, rollouts, scores, cfg, device)


@task(name="analyze", task_run_name="analyze-it{iteration}", **TASK_OPTS,
      cache_key_fn=lambda c, p: _key("analyze", analyze_key(p["student"], p["teacher"], p["rollouts"], p["scores"],
                                                            p["cfg"], p["method"], p["upd"], p["seed"])))
def analyze_task(root: str, student: ModelSpec, teacher: ModelSpec, rollouts: ArtifactRef, scores: ArtifactRef,
                 cfg: AnalysisConfig, method: str, upd: UpdateConfig, seed: int, label_roles: bool, device: str,
                 iteration: int, run: str, fault: FaultConfig | None = None, remote: str | None = None) -> ArtifactRef:
    _fault(root, run, "analyze", iteration, fault)
    return analyze(ArtifactStore(root, remote), student, teacher, rollouts, scores, cfg, method, upd, seed,
                   label_roles, device)


@task(name="update", task_run_name="update-it{iteration}", **TASK_OPTS,
      cache_key_fn=lambda c, p: _key("update", update_key(p["student"], p["rollouts"], p["scores"], p["weights"],
                                                          p["teacher"], p["cfg"], p["seed"])))
def update_task(root: str, student: ModelSpec, rollouts: ArtifactRef, scores: ArtifactRef, cfg: UpdateConfig,
                seed: int, weights: ArtifactRef | None, teacher: ModelSpec | None, device: str, iteration: int,
                run: str, fault: FaultConfig | None = None, remote: str | None = None) -> ArtifactRef:
    _fault(root, run, "update", iteration, fault)
    return update(ArtifactStore(root, remote), student, rollouts, scores, cfg, seed, weights, teacher, device)


@task(name="evaluate", task_run_name="evaluate-it{iteration}", **TASK_OPTS,
      cache_key_fn=lambda c, p: _key("evaluate", evaluate_key(p["model"], p["prompts"], p["cfg"], p["seed"],
                                                              p["checker"])))
def evaluate_task(root: str, model: ModelSpec, prompts: ArtifactRef, cfg: EvaluationConfig, seed: int, checker: str,
                  device: str, iteration: int, run: str, fault: FaultConfig | None = None,
                  remote: str | None = None) -> ArtifactRef:
    _fault(root, run, "evaluate", iteration, fault)
    return evaluate(ArtifactStore(root, remote), model, prompts, cfg, seed, checker, device)


#: Stage name -> its Prefect task. `_Runner` (inline) and the `opd-stage` flow (flows/stage.py) both call these.
STAGE_TASKS = {"prompts": prompts_task, "rollout": rollout_task, "score": score_task, "gates": gates_task,
               "analyze": analyze_task, "update": update_task, "evaluate": evaluate_task}


def call_stage_task(stage: str, *, root: str, remote: str | None, iteration: int, run: str,
                    fault: FaultConfig | None, params: dict[str, Any], refresh_cache: bool,
                    orchestration: OrchestrationConfig):
    """Call stage `stage`'s task with this project's options; returns its final Prefect state.

    The one place that sets a stage task's options: the cache records (Prefect results) go to
    `<root>/prefect/results`, retries and backoff come from `orchestration`, GPU stages carry its concurrency
    tag. Both runners go through here, so a stage behaves the same in-process and in its own deployment.
    """
    o = orchestration
    opts: dict[str, Any] = dict(result_storage=Path(root) / "prefect" / "results", refresh_cache=refresh_cache,
                                retries=o.retries, retry_delay_seconds=exponential_backoff(o.retry_delay_seconds))
    if stage in GPU_STAGES:
        opts["tags"] = [o.concurrency_tag]
    return STAGE_TASKS[stage].with_options(**opts)(root=root, remote=remote, iteration=iteration, run=run,
                                                   fault=fault, **params, return_state=True)


@task(name="report", task_run_name="report-it{iteration}", cache_policy=NO_CACHE, persist_result=False)
def report_task(root: str, run: str, iteration: int, rows: list[dict], acc: float | None, baseline: float) -> None:
    """Publish the iteration's stages as a table artifact and a markdown summary (never cached)."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in run.lower()).strip("-") or "run"
    create_table_artifact(table=rows, key=f"opd-{slug}-stages",
                          description=f"run {run}, iteration {iteration}: stages, artifacts, cache hits, seconds")
    lines = [f"# {run}: iteration {iteration}", "",
             f"accuracy {acc:.1%} (baseline {baseline:.1%})" if acc is not None else "", "",
             "| stage | state | seconds | rows | artifact |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['state']} | {r['seconds']:.1f} | {r['rows']} | `{r['uri']}` |" for r in rows]
    lines += ["", f"Query: `opd sql \"SELECT * FROM evals WHERE run='{run}' AND iteration={iteration}\"`"]
    create_markdown_artifact(markdown="\n".join(lines), key=f"opd-{slug}-report",
                             description=f"run {run}, iteration {iteration}")


class StageRunError(OpdError):
    """A stage's own flow run (stage_runner: deployment) did not complete; names the stage and the flow run.

    The stage's own error class is re-raised where the child's result says what it was (a `DataError` stays
    a `DataError`); this class is used when it does not (a crashed or cancelled flow run).
    """


class _Runner:
    """Calls stage tasks (in-process or as deployments) and records lineage + a row per stage."""

    def __init__(self, cfg: RunConfig, store: ArtifactStore, lineage: RunLineage, refresh: set[str]):
        self.cfg, self.store, self.lineage, self.refresh = cfg, store, lineage, refresh
        self.rows: list[dict] = []
        self.log = get_run_logger()
        self.deployments: dict[str, Any] = {}  # stage -> Prefect deployment (stage_runner: deployment)

    def check_deployments(self, stages: list[str]) -> None:
        """stage_runner: deployment: every GPU stage this run calls has its deployment (fail before any work)."""
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

    def __call__(self, stage: str, iteration: int, key: str, label: str | None = None, **params) -> ArtifactRef:
        """Run stage `stage` (content key `key`); record it in the lineage as `label` (default: stage)."""
        existing = self.store.lookup(stage, key)
        if existing is not None and stage in self.refresh:
            moved = self.store.retire(existing)
            self.log.info("--refresh %s: retired %s to %s", stage, existing.short(), moved)
            existing = None
        label = label or stage
        call = self._deployment if stage in self.deployments else self._inline
        t0 = time.perf_counter()
        ref, state_name = call(stage, iteration, label, key, params, refresh=existing is None, fault=self.cfg.fault)
        current = self.store.lookup(stage, ref.key)
        if current is None or current.sha256 != ref.sha256:  # a stale cache record: recompute once
            ref, state_name = call(stage, iteration, label, key, params, refresh=True, fault=None)
        secs = time.perf_counter() - t0
        cached = state_name == "Cached"
        self.lineage.record(iteration, label, ref, cached=cached, seconds=secs)
        self.rows.append({"iteration": iteration, "stage": label, "state": state_name, "seconds": round(secs, 3),
                          "rows": ref.rows, "sha256": ref.sha256[:16], "uri": ref.uri})
        self.log.info("it%d %-9s %-9s %6.1fs -> %s", iteration, stage, state_name, secs, ref.short())
        return ref

    def _inline(self, stage: str, iteration: int, label: str, key: str, params: dict, refresh: bool,
                fault: FaultConfig | None) -> tuple[ArtifactRef, str]:
        state = call_stage_task(stage, root=str(self.store.root), remote=self.store.remote_uri, iteration=iteration,
                                run=self.cfg.name, fault=fault, params=params, refresh_cache=refresh,
                                orchestration=self.cfg.orchestration)
        return state.result(), state.name  # result() raises the stage's error if it failed after its retries

    def _deployment(self, stage: str, iteration: int, label: str, key: str, params: dict, refresh: bool,
                    fault: FaultConfig | None) -> tuple[ArtifactRef, str]:
        """Run the stage as a flow run of its deployment; wait; its result is the ArtifactRef.

        The child writes its flow result (JSON) next to the cache records, `<root>/prefect/results`, through
        the `env` job variable, so this process reads it back; both must see the root at the same path (one
        machine, or a shared volume). If that read fails (e.g. pods with their own local roots and a remote
        mirror), the artifact is looked up by its key in the store instead, which pulls it from the remote.
        """
        from prefect.deployments import run_deployment

        o, dep = self.cfg.orchestration, self.deployments[stage]
        results = str(self.store.root / "prefect" / "results")
        env = {**((dep.job_variables or {}).get("env") or {}), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": results}
        name = o.stage_deployment_name(stage)
        fr = run_deployment(
            name, timeout=None, as_subflow=True, poll_interval=o.stage_poll_seconds,
            flow_run_name=f"{self.cfg.name}-it{iteration}-{label}", job_variables={"env": env},
            parameters={"stage": stage, "params": to_jsonable_python(params), "root": str(self.store.root),
                        "remote": self.store.remote_uri, "iteration": iteration, "run": self.cfg.name,
                        "fault": fault.model_dump(mode="json") if fault is not None else None,
                        "orchestration": o.model_dump(mode="json"), "refresh_cache": refresh})
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
            ref = self.store.lookup(stage, key)
            if ref is None:
                raise StageRunError(f"{where} completed, but neither its result nor an artifact under its key "
                                    f"can be read here ({type(e).__name__}: {e}); the distill flow and the stage "
                                    "must share the storage root or a remote (docs/scaling.md)") from e
            self.log.warning("%s: result not readable here (%s); took %s from the store", where, e, ref.short())
        return ref, _child_task_state(fr.id, stage, iteration, self.log)


def _child_task_state(flow_run_id, stage: str, iteration: int, log) -> str:
    """The final state name (Cached, Completed) of the stage task inside a stage's flow run.

    Task run states reach the API as events, a moment after the flow run itself is final: wait briefly.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        for _ in range(60):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            done = [r for r in runs if r.name == f"{stage}-it{iteration}" and r.state is not None
                    and r.state.is_final()]
            if done:
                return max(done, key=lambda r: r.expected_start_time or r.created).state.name
            time.sleep(0.5)
    log.warning("flow run %s: the %s task's final state is not in the API yet; recorded as computed", flow_run_id,
                stage)
    return "Completed"


@flow(name="distill", log_prints=True, validate_parameters=False)
def distill(config: dict, refresh: list[str] | None = None, resume: bool = False) -> dict:
    """Run `config["iterations"]` OPD iterations of run `config["name"]`; returns a JSON summary.

    With `resume`, continue the named run: start after its latest recorded update, from that checkpoint, on
    the next slices of prompts (what a scheduled "nightly distillation" does). Without it, iterations start at
    0 from the configured student (and are cache hits where they already ran).
    """
    cfg = RunConfig.model_validate(config)
    store = ArtifactStore(cfg.resolved_root(), remote=cfg.resolved_remote())
    lineage = RunLineage(store.layout, cfg.name)
    lineage.init(method=cfg.method, config=cfg.model_dump(mode="json"))
    bad = set(refresh or []) - set(STAGES)
    if bad:
        raise ConfigError(f"--refresh: unknown stage(s) {sorted(bad)}; stages are {', '.join(STAGES)}")
    run = _Runner(cfg, store, lineage, set(refresh or []))
    if cfg.orchestration.stage_runner == "deployment":
        run.check_deployments([s for s in GPU_STAGES if (s != "gates" or cfg.gates.enabled)
                               and (s != "analyze" or cfg.method != "opd")])
    teacher, student0 = resolve_models(cfg)
    chk = checker_name(cfg)
    dev, seed = cfg.device, cfg.seed

    ev_split = cfg.data.eval_split or "test"
    ev_ctx = _max_prompt_tokens(student0, cfg.evaluation.max_new_tokens)
    ev = run("prompts", 0, prompts_key(cfg.data, student0, ev_split, cfg.data.eval_size, 0, seed, ev_ctx),
             label="eval_prompts", data=cfg.data, tokenizer_model=student0, split=ev_split, n=cfg.data.eval_size,
             offset=0, seed=seed, max_context=ev_ctx)
    base = run("evaluate", 0, evaluate_key(student0, ev, cfg.evaluation, seed, chk), label="baseline",
               model=student0, prompts=ev, cfg=cfg.evaluation, seed=seed, checker=chk, device=dev)
    baseline = accuracy(store, base)

    summary: dict[str, Any] = {"run": cfg.name, "root": str(store.root), "baseline_accuracy": baseline,
                               "iterations": []}
    student, start = student0, 0
    latest = lineage.latest("update") if resume else None
    if latest is not None:
        student, start = ModelSpec.from_checkpoint(store, latest.ref), latest.iteration + 1
        run.log.info("resuming run %s after iteration %d from checkpoint %s", cfg.name, latest.iteration,
                     latest.ref.short())
    n = cfg.data.prompts_per_iteration
    ctx = _max_prompt_tokens(student0, cfg.rollout.max_new_tokens)
    for i in range(start, start + cfg.iterations):
        run.rows = []
        pr = run("prompts", i, prompts_key(cfg.data, student0, "train", n, i * n, seed, ctx),
                 data=cfg.data, tokenizer_model=student0, split="train", n=n, offset=i * n, seed=seed,
                 max_context=ctx)
        ro = run("rollout", i, rollout_key(student, pr, cfg.rollout, seed, chk), student=student,
                 prompts=pr, cfg=cfg.rollout, seed=seed, checker=chk, device=dev)
        sc = run("score", i, score_key(teacher, ro, cfg.scoring), teacher=teacher, student=student,
                 rollouts=ro, cfg=cfg.scoring, device=dev)
        if cfg.gates.enabled:
            gt = run("gates", i, gates_key(student, teacher, ro, sc, cfg.gates), student=student,
                     teacher=teacher, rollouts=ro, scores=sc, cfg=cfg.gates, device=dev)
            check_gates(store, gt)  # DataError naming each failed gate: nothing trains on these rollouts
        an = None
        if cfg.method != "opd":
            an = run("analyze", i, analyze_key(student, teacher, ro, sc, cfg.analysis, cfg.method, cfg.update, seed),
                     student=student, teacher=teacher, rollouts=ro, scores=sc, cfg=cfg.analysis, method=cfg.method,
                     upd=cfg.update, seed=seed, label_roles=chk == "testbed", device=dev)
        up = run("update", i, update_key(student, ro, sc, an, teacher, cfg.update, seed),
                 student=student, rollouts=ro, scores=sc, cfg=cfg.update, seed=seed, weights=an, teacher=teacher,
                 device=dev)
        student = ModelSpec.from_checkpoint(store, up)
        ev_ref = run("evaluate", i, evaluate_key(student, ev, cfg.evaluation, seed, chk),
                     model=student, prompts=ev, cfg=cfg.evaluation, seed=seed, checker=chk, device=dev)
        acc = accuracy(store, ev_ref)
        losses = store.read_table(up, "updates", columns=["loss"]).column("loss").to_pylist()
        report_task(str(store.root), cfg.name, i, run.rows, acc, baseline)
        analysis = store.manifest(an)["meta"] if an is not None else None
        summary["iterations"].append({"iteration": i, "accuracy": acc, "mean_loss": sum(losses) / len(losses),
                                      "analysis": analysis,
                                      "checkpoint": up.model_dump(mode="json"), "stages": run.rows})
        run.log.info("iteration %d: accuracy %.1f%% (baseline %.1f%%)", i, 100 * acc, 100 * baseline)
    return summary
