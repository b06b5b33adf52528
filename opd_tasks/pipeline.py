"""The one iteration loop of on-policy distillation, the stage runner it calls, and the plain driver.

One iteration, from student checkpoint S_i (`run_iteration`):

    prompts_i -> rollout(S_i) -> score(teacher) -> gates -> analyze (methods that need it) -> update(S_i) = S_{i+1}
    -> evaluate(S_{i+1})

A run (`run_distillation`) is the eval set and the baseline evaluation of the initial student, then
`iterations` of that loop (with `resume`, starting after the run's latest checkpoint, on the next prompts).

This is the only code that chains stages. From the loop to a stage's compute is four calls:

    run_iteration -> StageRunner.__call__ -> executor.run -> run_stage -> the stage's function

The runner computes the key, looks the store up once, honours `--refresh`, and on a miss plans the call (the
stage's parts and `prepare`) and hands it to an executor, then records the lineage. Executors are injected (the
`Executor` protocol): `LocalExecutor` here (the plain driver, `run_plain`: parts in turn, in this process);
flows/executors.py's Prefect one (one generic task with the content key, retries and tags; a process pool for
parts) and deployment one (a flow run of the stage's deployment per part and for the stage). Fault drills
(`fault.*`) wrap the compute an executor runs (`with_faults`). All of them run `run_stage`, so the plain driver
and the flow produce byte-identical artifacts (tests/integration/test_flow.py). Retries are Prefect's: the plain
driver stops at the first failure, and a rerun recomputes only what is missing.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from opd_tasks.config import FaultConfig, RunConfig
from opd_tasks.errors import ConfigError, TransientError
from opd_tasks.method import MethodPlan, plan
from opd_tasks.models import ModelSpec, cache_remote_code_under, spec_of
from opd_tasks.progress import stage_running
from opd_tasks.provenance import drift
from opd_tasks.stages import (
    ANALYZE,
    EVALUATE,
    GATES,
    PROMPTS,
    ROLLOUT,
    SCORE,
    STAGES,
    UPDATE,
    AnalyzeInputs,
    EvaluateInputs,
    GatesInputs,
    PromptsInputs,
    RolloutInputs,
    ScoreInputs,
    Span,
    Stage,
    StageContext,
    StageInputs,
    UpdateInputs,
    check_config,
    plan_call,
    run_stage,
    shards_for,
)
from opd_tasks.stages.evaluate import accuracy, nats, percent
from opd_tasks.stages.gates import check_gates, check_headroom
from opd_tasks.stages.registry import part_key, part_stage
from storage.layout import Layout
from storage.lineage import RunLineage, run_lock
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


@dataclass
class IterationResult:
    iteration: int
    stages: dict[str, StageRecord]  # by label, in the order they ran
    checkpoint: ArtifactRef  # S_{i+1}
    accuracy: float | None  # per sample, on the eval set (opd_tasks/stages/evaluate.py); None: no references
    rkl_per_token: float | None  # the reverse KL of the student's eval answers to the teacher, nats per token
    mean_loss: float | None  # None: the update was skipped (no teacher signal; `skipped` says why)
    analysis: dict | None  # the analysis summary (regime shares, classifier), None when the method has none
    skipped: str | None = None  # why the update took no step (update.min_signal), None when it trained

    def summary(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "accuracy": self.accuracy, "rkl_per_token": self.rkl_per_token,
                "mean_loss": self.mean_loss,
                "skipped": self.skipped,
                "analysis": self.analysis, "checkpoint": self.checkpoint.model_dump(mode="json"),
                "stages": [r.row() for r in self.stages.values()]}


@dataclass
class Distillation:
    run: str
    root: str
    baseline_accuracy: float | None  # None: prompt-only data
    baseline_rkl_per_token: float | None
    iterations: list[IterationResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The run as JSON (what the `distill` flow returns)."""
        return {"run": self.run, "root": self.root, "baseline_accuracy": self.baseline_accuracy,
                "baseline_rkl_per_token": self.baseline_rkl_per_token,
                "iterations": [it.summary() for it in self.iterations]}


# ----------------------------------------------------------------------------------------- the stage runner


def check_refresh(stages: Iterable[str]) -> frozenset[str]:
    """`--refresh` stage names, each a stage of the table."""
    chosen = frozenset(stages)
    if bad := sorted(chosen - set(STAGES)):
        raise ConfigError(f"--refresh: unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
    return chosen


class Executor(Protocol):
    """Where a planned stage call computes: `run` computes the missing `parts` (spans of `ctx.spans`), then the
    stage itself (`run_stage`), and returns its artifact; `close` releases what it holds (processes)."""

    def run(self, stage: Stage, ctx: StageContext, inputs: StageInputs, parts: list[Span]) -> ArtifactRef: ...

    def close(self) -> None: ...


#: What an executor runs for each part and for the stage (`run_stage`, or it wrapped by `with_faults`).
Compute = Callable[..., ArtifactRef]


@dataclass
class LocalExecutor:
    """In this process: each missing part in turn, then the stage."""

    compute: Compute = run_stage

    def run(self, stage: Stage, ctx: StageContext, inputs: StageInputs, parts: list[Span]) -> ArtifactRef:
        for span in parts:
            self.compute(stage, ctx, inputs, span)
        return self.compute(stage, ctx, inputs)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class FaultInjection:
    """`fault.*` (tests, crash drills) around a compute: fail once with a TransientError when `fault.stage` (with
    `fault.shard`, that part of it) is about to compute at `fault.iteration`; a marker file under `<root>/faults`
    makes it once, so a retry or a rerun goes through. Picklable: it crosses to a process pool with the call."""

    compute: Compute
    fault: FaultConfig

    def __call__(self, stage: Stage, ctx: StageContext, inputs: StageInputs, span: Span | None = None) -> ArtifactRef:
        f = self.fault
        if (f.stage, f.iteration, f.shard) == (stage.name, ctx.iteration, span.index if span else None):
            where = f"{stage.name}.it{ctx.iteration}" + (f".shard{span.index}" if span else "")
            marker = Path(ctx.root) / "faults" / f"{ctx.run}.{where}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                raise TransientError(f"injected fault: stage {stage.name!r}{f' shard {span.index}' if span else ''} "
                                     f"at iteration {ctx.iteration} (fault.* in the config)")
        return self.compute(stage, ctx, inputs, span)


def with_faults(executor, fault: FaultConfig | None):
    """`executor` whose compute fails as `fault` says (unchanged without a fault)."""
    if fault is None or fault.stage is None:
        return executor
    return replace(executor, compute=FaultInjection(executor.compute, fault))


@dataclass
class StageRecord:
    """One stage call of a run: what it produced, whether it came from the cache, how long it took."""

    iteration: int
    stage: str  # the stage of the table
    label: str  # its name in the lineage: the stage's, or eval_prompts / baseline
    ref: ArtifactRef
    cached: bool
    seconds: float

    def row(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "stage": self.label, "state": "Cached" if self.cached else "Completed",
                "seconds": round(self.seconds, 3), "rows": self.ref.rows, "sha256": self.ref.sha256,
                "uri": self.ref.uri}


class StageRunner:
    """Runs one stage for the loop (module docstring): key, one lookup, `--refresh`, on a miss the plan and the
    executor, then the lineage. `records` holds every call of the run, in order."""

    def __init__(self, store: ArtifactStore, lineage: RunLineage, cfg: RunConfig, executor: Executor, *,
                 refresh: frozenset[str] = frozenset(), progress: bool | None = None,
                 log: Callable[[str], None] = print):
        self.store, self.lineage, self.cfg, self.executor = store, lineage, cfg, executor
        self.refresh = refresh
        self.progress = sys.stderr.isatty() if progress is None else progress  # None: bars only on a terminal
        self.log = log
        self.records: list[StageRecord] = []
        self._drift_told: set[tuple[str, str, str]] = set()  # (library, cached version, ours) already warned of

    def __call__(self, stage: Stage, inputs: StageInputs, iteration: int, label: str | None = None) -> ArtifactRef:
        label = label or stage.name
        t0 = time.perf_counter()
        key = stage.key(inputs)
        ref = self.store.lookup(stage.name, key)  # the one lookup of this call
        while self.store.quarantined:  # corrupted, or emptied by opd gc: moved aside, recomputed below
            self.log(f"it{iteration} {label}: {self.store.quarantined.pop(0)}; recomputing")
        refresh = stage.name in self.refresh
        if ref is not None and refresh:
            self.log(f"--refresh {stage.name}: retired {ref.short()} to {self.store.retire(ref)}")
            ref = None
        cached = ref is not None
        if cached:
            self.warn_version_drift(ref, stage.name, iteration, label)
        else:
            ctx = plan_call(stage, StageContext.of(self.store, stage.name, key, device=self.cfg.device,
                                                   progress=self.progress, run=self.cfg.name, iteration=iteration,
                                                   label=label),
                            inputs, shards_for(self.cfg.orchestration, stage.name))
            missing = []
            for span in ctx.spans:
                part = self.store.lookup(part_stage(stage.name), part_key(ctx, span))
                if part is not None and refresh:
                    self.store.retire(part)
                missing += [span] if part is None or refresh else []
            if missing:
                self.log(f"it{iteration} {label}: {len(ctx.spans)} parts, {len(missing)} to compute")
            with stage_running(f"it{iteration} {label}"):  # the run display's row (opd_tasks/progress.py)
                ref = self.executor.run(stage, ctx, inputs, missing)
        record = StageRecord(iteration, stage.name, label, ref, cached, time.perf_counter() - t0)
        self.records.append(record)
        self.lineage.record(iteration, label, ref, cached=cached, seconds=record.seconds)
        self.log(f"it{iteration} {label:<12} {'cached' if cached else 'computed'} in {record.seconds:6.1f}s "
                 f"-> {ref.short()}")
        return ref

    def warn_version_drift(self, ref: ArtifactRef, stage: str, iteration: int, label: str) -> None:
        """One warning per (library, version pair) in a run when a cache hit was computed under another minor version
        of torch or transformers than this process has (opd_tasks/provenance.py); the hit is reused."""
        for lib, theirs, ours in drift(self.store.manifest(ref).get("provenance")):
            if (lib, theirs, ours) in self._drift_told:
                continue
            self._drift_told.add((lib, theirs, ours))
            self.log(f"warning: it{iteration} {label}: the cached artifact {ref.short()} was computed under {lib} "
                     f"{theirs}, this environment has {lib} {ours}; it is reused (no cache key holds a library "
                     f"version: docs/operations.md), as is any later one made under {lib} {theirs} in this run; "
                     f"`--refresh {stage}` recomputes it")

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.executor.close()


# ----------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Models:
    teacher: ModelSpec
    initial_student: ModelSpec  # S_0; its tokenizer encodes every prompt


def resolve_models(cfg: RunConfig) -> Models:
    root = Layout(cfg.root).root  # where `imported:` models are
    return Models(teacher=spec_of(cfg.models.teacher, root), initial_student=spec_of(cfg.models.student, root))


def checker_name(cfg: RunConfig) -> str:
    """The answer checker of the run's data: the testbed's, or numeric answers."""
    return "testbed" if cfg.data.source == "testbed" else "numeric"


def max_prompt_tokens(model: ModelSpec, max_new_tokens: int) -> int | None:
    """The longest prompt that leaves room for `max_new_tokens` in the model's context (None: no limit known)."""
    context = json.loads((model.dir / "config.json").read_text()).get("max_position_embeddings")
    if context is None:
        return None
    if context <= max_new_tokens:
        raise ConfigError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's "
                          f"context of {context} tokens ({model.path})")
    return context - max_new_tokens


def eval_prompts_inputs(cfg: RunConfig, models: Models) -> PromptsInputs:
    """The held-out eval set: `data.eval_size` prompts of `data.eval_split` (default: the loader's held-out split,
    `opd_tasks.data.EVAL_SPLIT`) drawn with `data.eval_seed`, the same for every iteration, and for every run seed
    and method (so comparisons are paired)."""
    from opd_tasks.data import EVAL_SPLIT

    return PromptsInputs(data=cfg.data, teacher_context=cfg.teacher_context, tokenizer=models.initial_student,
                         split=cfg.data.eval_split or EVAL_SPLIT, n=cfg.data.eval_size, offset=0,
                         max_context=max_prompt_tokens(models.initial_student, cfg.evaluation.max_new_tokens),
                         seed=cfg.data.eval_seed)


def run_iteration(runner: StageRunner, cfg: RunConfig, method: MethodPlan, iteration: int, student: ModelSpec,
                  models: Models, eval_prompts: ArtifactRef) -> IterationResult:
    """One OPD iteration from student checkpoint `student` (S_i): returns S_{i+1} and its accuracy."""
    store, seed, checker, first = runner.store, cfg.seed, checker_name(cfg), len(runner.records)
    n = cfg.data.prompts_per_iteration
    prompts = runner(PROMPTS, PromptsInputs(
        data=cfg.data, teacher_context=cfg.teacher_context, tokenizer=models.initial_student, split="train", n=n,
        offset=iteration * n,
        max_context=max_prompt_tokens(models.initial_student, cfg.rollout.max_new_tokens), seed=seed), iteration)
    sampling = cfg.rollout.model_copy(update={"samples_per_prompt": method.samples_per_prompt})
    rollouts = runner(ROLLOUT, RolloutInputs(student=student, prompts=prompts, rollout=sampling, checker=checker,
                                             seed=seed), iteration)
    scores = runner(SCORE, ScoreInputs(teacher=models.teacher, student=student, rollouts=rollouts,
                                       scoring=cfg.scoring), iteration)
    if cfg.gates.enabled:
        gate_figures = runner(GATES, GatesInputs(student=student, teacher=models.teacher, rollouts=rollouts,
                                                 scores=scores, gates=cfg.gates), iteration)
        check_gates(store, gate_figures)  # DataError naming each failed gate: nothing trains on these rollouts
    analysis = None
    if method.analyze:
        analysis = runner(ANALYZE, AnalyzeInputs(
            student=student, teacher=models.teacher, rollouts=rollouts, scores=scores, analysis=cfg.analysis,
            weighting=method.weighting, bridge=method.bridge is not None, label_roles=checker == "testbed",
            seed=seed), iteration)
    checkpoint = runner(UPDATE, UpdateInputs(student=student, rollouts=rollouts, scores=scores, analysis=analysis,
                                             teacher=models.teacher, update=cfg.update, bridge=method.bridge,
                                             advantage=method.advantage, seed=seed), iteration)
    update_meta = store.manifest(checkpoint)["meta"]
    if update_meta.get("skipped"):
        runner.log(f"it{iteration} update skipped: {update_meta['skipped']}")
    new_student = ModelSpec.from_checkpoint(store, checkpoint, student)
    evals = runner(EVALUATE, EvaluateInputs(model=new_student, teacher=models.teacher, prompts=eval_prompts,
                                            evaluation=cfg.evaluation, checker=checker, seed=seed), iteration)
    return IterationResult(iteration, {r.label: r for r in runner.records[first:]}, checkpoint,
                           accuracy(store, evals), store.manifest(evals)["meta"].get("rkl_per_token"),
                           mean_loss=update_meta["mean_loss"],
                           analysis=store.manifest(analysis)["meta"] if analysis is not None else None,
                           skipped=update_meta.get("skipped"))


def stages_used(cfg: RunConfig) -> list[str]:
    """The stages an iteration of `cfg` runs (what `run_iteration` calls), in order."""
    skipped = ({GATES.name} if not cfg.gates.enabled else set()) | ({ANALYZE.name} if not plan(cfg).analyze else set())
    return [name for name in STAGES if name not in skipped]


def stage_calls(cfg: RunConfig) -> int:
    """How many stage calls a run of `cfg` makes: the eval set, the baseline (and the teacher's evaluation for the
    headroom gate), then each iteration's stages."""
    return 2 + cfg.gates.checks_headroom + cfg.iterations * len(stages_used(cfg))


def run_distillation(runner: StageRunner, cfg: RunConfig, resume: bool = False,
                     on_iteration: Callable[[IterationResult, Distillation], None] | None = None) -> Distillation:
    """The eval set and the baseline, then `cfg.iterations` iterations; with `resume`, starting after the run's
    latest checkpoint, from it, on the next prompts (what a scheduled "nightly distillation" does)."""
    store, seed, checker = runner.store, cfg.seed, checker_name(cfg)
    models, method = resolve_models(cfg), plan(cfg)
    eval_prompts = runner(PROMPTS, eval_prompts_inputs(cfg, models), iteration=0, label="eval_prompts")
    baseline = runner(EVALUATE, EvaluateInputs(model=models.initial_student, teacher=models.teacher,
                                               prompts=eval_prompts, evaluation=cfg.evaluation, checker=checker,
                                               seed=seed), iteration=0, label="baseline")
    out = Distillation(cfg.name, str(store.root), accuracy(store, baseline),
                       store.manifest(baseline)["meta"].get("rkl_per_token"))
    runner.log(f"baseline: student accuracy {percent(out.baseline_accuracy)} on {cfg.data.eval_size} held-out "
               f"prompts, reverse KL to the teacher {nats(out.baseline_rkl_per_token)} nats per token")
    if cfg.gates.checks_headroom:  # before the first update: is there anything to learn from the teacher?
        teacher_evals = runner(EVALUATE, EvaluateInputs(model=models.teacher, teacher=models.teacher, as_teacher=True,
                                                        prompts=eval_prompts, evaluation=cfg.evaluation,
                                                        checker=checker, seed=seed), iteration=0, label="teacher_eval")
        runner.log(check_headroom(store, teacher_evals, baseline, cfg.gates.min_headroom))
    student, first = models.initial_student, 0
    latest = runner.lineage.latest("update") if resume else None
    if latest is not None:
        student, first = ModelSpec.from_checkpoint(store, latest.ref, models.initial_student), latest.iteration + 1
        runner.log(f"resuming run {cfg.name} after iteration {latest.iteration} from checkpoint {latest.ref.short()}")
    for iteration in range(first, first + cfg.iterations):
        result = run_iteration(runner, cfg, method, iteration, student, models, eval_prompts)
        out.iterations.append(result)
        runner.log(f"iteration {iteration}: accuracy {percent(result.accuracy)} (baseline "
                   f"{percent(out.baseline_accuracy)}), reverse KL {nats(result.rkl_per_token)} nats per token, "
                   + (f"mean loss {result.mean_loss:.4f}" if result.skipped is None else "update skipped (no signal)"))
        if on_iteration is not None:
            on_iteration(result, out)
        student = ModelSpec.from_checkpoint(store, result.checkpoint, student)
    return out


@contextmanager
def opened_run(cfg: RunConfig, refresh: Iterable[str] = ()) -> Iterator[tuple[ArtifactStore, RunLineage,
                                                                              frozenset[str]]]:
    """The run's store, lineage and checked `--refresh` stages, under the run's lock, for the run's duration. The
    flags and the config are checked first (`check_refresh`, `check_config`), so a refused run writes nothing;
    then the run's method and config are recorded in its run.json."""
    chosen = check_refresh(refresh)
    check_config(cfg)
    with run_lock(cfg.resolved_root(), [cfg.name]):
        cache_remote_code_under(cfg.resolved_root())  # before any stage imports transformers
        store = ArtifactStore(cfg.resolved_root(), remote=cfg.resolved_remote())
        lineage = RunLineage(store.layout, cfg.name)
        lineage.init(method=cfg.method, arm=cfg.arm or cfg.method, config=cfg.model_dump(mode="json"))
        yield store, lineage, chosen


def run_plain(cfg: RunConfig, log: Callable[[str], None] = print, progress: bool | None = None,
              refresh: Iterable[str] = (), resume: bool = False) -> Distillation:
    """A whole run in this process, without Prefect (tests, benchmarks, debugging)."""
    with opened_run(cfg, refresh) as (store, lineage, chosen):
        executor = with_faults(LocalExecutor(), cfg.fault)
        with StageRunner(store, lineage, cfg, executor, refresh=chosen, progress=progress, log=log) as runner:
            return run_distillation(runner, cfg, resume=resume)
