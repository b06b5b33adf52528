"""The one iteration loop of on-policy distillation, and the plain driver that runs it without Prefect.

One iteration, from student checkpoint S_i (`run_iteration`):

    prompts_i -> rollout(S_i) -> score(teacher) -> gates -> analyze (methods that need it) -> update(S_i) = S_{i+1}
    -> evaluate(S_{i+1})

A run (`run_distillation`) is the eval set and the baseline evaluation of the initial student, then
`iterations` of that loop (with `resume`, starting after the run's latest checkpoint, on the next prompts).

This is the only code that chains stages. It calls each stage through a `StageRunner`: this module's runs them
in this process (the plain driver, `run_plain`); the Prefect flow's (flows/runners.py) runs each as a Prefect
task with its cache policy and retries, or as a flow run of the stage's own deployment. Both compute the cache
key once per call from the stage registry, honour `--refresh` and `fault.*` the same way, record the run's
lineage, and therefore produce byte-identical artifacts (tests/integration/test_flow.py). Retries are Prefect's:
the plain driver stops at the first failure, and a rerun recomputes only what is missing.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    Stage,
    StageContext,
    StageInputs,
    UpdateInputs,
    check_gates,
    compute,
)
from opd_tasks.stages.evaluate import accuracy
from opd_tasks.stages.sharding import Span, part_key, part_stage, shard_plan
from storage.lineage import RunLineage, run_lock
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


@dataclass
class StageRecord:
    """One stage call of a run: what it produced, whether it came from the cache, how long it took."""

    iteration: int
    stage: str  # the registered stage
    label: str  # its name in the lineage: the stage's, or eval_prompts / baseline
    ref: ArtifactRef
    cached: bool
    seconds: float

    def row(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "stage": self.label, "state": "Cached" if self.cached else "Completed",
                "seconds": round(self.seconds, 3), "rows": self.ref.rows, "sha256": self.ref.sha256,
                "uri": self.ref.uri}


@dataclass
class IterationResult:
    iteration: int
    stages: dict[str, StageRecord]  # by label, in the order they ran
    checkpoint: ArtifactRef  # S_{i+1}
    accuracy: float  # per sample, on the eval set (opd_tasks/stages/evaluate.py)
    mean_loss: float | None  # None: the update was skipped (no teacher signal; `skipped` says why)
    analysis: dict | None  # the analysis summary (regime shares, classifier), None when the method has none
    skipped: str | None = None  # why the update took no step (update.min_signal), None when it trained

    def summary(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "accuracy": self.accuracy, "mean_loss": self.mean_loss,
                "skipped": self.skipped,
                "analysis": self.analysis, "checkpoint": self.checkpoint.model_dump(mode="json"),
                "stages": [r.row() for r in self.stages.values()]}


@dataclass
class Distillation:
    run: str
    root: str
    baseline_accuracy: float
    iterations: list[IterationResult] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The run as JSON (what the `distill` flow returns)."""
        return {"run": self.run, "root": self.root, "baseline_accuracy": self.baseline_accuracy,
                "iterations": [it.summary() for it in self.iterations]}


# ----------------------------------------------------------------------------------------- the stage runner


def check_refresh(stages: Iterable[str]) -> frozenset[str]:
    """`--refresh` stage names, each a registered stage."""
    chosen = frozenset(stages)
    if bad := sorted(chosen - set(STAGES)):
        raise ConfigError(f"--refresh: unknown stage(s) {bad}; stages are {', '.join(STAGES)}")
    return chosen


def inject_fault(root: Path, run_name: str, stage: str, iteration: int, fault: FaultConfig | None,
                 shard: int | None = None) -> None:
    """`fault.*` (tests, crash drills): fail once with a TransientError when `stage` (with `fault.shard`, that
    shard of it) is about to compute at `iteration`; a marker file under `<root>/faults` makes it once, so a retry
    or a rerun goes through."""
    if fault is None or (fault.stage, fault.iteration, fault.shard) != (stage, iteration, shard):
        return
    where = f"{stage}.it{iteration}" + (f".shard{shard}" if shard is not None else "")
    marker = Path(root) / "faults" / f"{run_name}.{where}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    raise TransientError(f"injected fault: stage {stage!r}{f' shard {shard}' if shard is not None else ''} at "
                         f"iteration {iteration} (fault.* in the config)")


def fault_hooks(root: Path, run_name: str, stage: str, iteration: int,
                fault: FaultConfig | None) -> tuple[Callable[[], None], Callable[[Any], None]]:
    """(before the stage computes, before a shard's part computes): `inject_fault` for each."""
    return (lambda: inject_fault(root, run_name, stage, iteration, fault),
            lambda span: inject_fault(root, run_name, stage, iteration, fault, span.index))


class StageRunner:
    """Runs one stage for the loop: computes its key, honours `--refresh`, calls it, records the lineage.

    This class calls the stage in this process (the plain driver). A subclass changes `call` alone (the Prefect
    task or a deployment run, flows/runners.py); everything else is the same for both."""

    def __init__(self, store: ArtifactStore, lineage: RunLineage, cfg: RunConfig, *, refresh: Iterable[str] = (),
                 progress: bool | None = None, log: Callable[[str], None] = print):
        self.store, self.lineage, self.cfg = store, lineage, cfg
        self.refresh = check_refresh(refresh)
        self.progress = sys.stderr.isatty() if progress is None else progress  # None: bars only on a terminal
        self.log = log
        self._drift_told: set[tuple[str, str, str]] = set()  # (library, cached version, ours) already warned of

    def __call__(self, stage: Stage, inputs: StageInputs, iteration: int, label: str | None = None) -> StageRecord:
        label = label or stage.name
        key = stage.key(inputs)  # the one computation of this call's key: the store and Prefect both use it
        existing = self.store.lookup(stage.name, key)
        while self.store.quarantined:  # corrupted, or emptied by opd gc: moved aside, recomputed below
            self.log(f"it{iteration} {label}: {self.store.quarantined.pop(0)}; recomputing")
        if stage.name in self.refresh:
            if existing is not None:
                moved = self.store.retire(existing)
                self.log(f"--refresh {stage.name}: retired {existing.short()} to {moved}")
                existing = None
            for part in self.stored_parts(stage, inputs, key):
                self.store.retire(part)
        if existing is not None:
            self.warn_version_drift(existing, stage.name, iteration, label)
        t0 = time.perf_counter()
        with stage_running(f"it{iteration} {label}"):  # the run display's row, on a terminal (opd_tasks/progress.py)
            ref, cached = self.call(stage, inputs, key, iteration, label, existing)
        record = StageRecord(iteration, stage.name, label, ref, cached, time.perf_counter() - t0)
        self.lineage.record(iteration, label, ref, cached=cached, seconds=record.seconds)
        self.log(f"it{iteration} {label:<12} {'cached' if cached else 'computed'} in {record.seconds:6.1f}s "
                 f"-> {ref.short()}")
        return record

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

    def context(self, stage: Stage, key: str, **kw) -> StageContext:
        """The stage's context in this run: its store, key, device, progress and shards."""
        return StageContext(self.store, stage.name, key, self.cfg.device, self.progress,
                            shards=self.cfg.orchestration.shards_for(stage.name), **kw)

    def shards(self, stage: Stage, inputs: StageInputs, key: str) -> list[Span]:
        """The spans of the stage's parts in this run; none for a stage that runs as one part."""
        if stage.shards is None:
            return []
        plan = shard_plan(stage, self.context(stage, key), inputs)[1]
        return plan if len(plan) > 1 else []

    def stored_parts(self, stage: Stage, inputs: StageInputs, key: str) -> list[ArtifactRef]:
        refs = [self.store.lookup(part_stage(stage.name), part_key(key, span))
                for span in self.shards(stage, inputs, key)]
        return [r for r in refs if r is not None]

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release what the runner holds (the Prefect runner's shard processes)."""

    def call(self, stage: Stage, inputs: StageInputs, key: str, iteration: int, label: str,
             existing: ArtifactRef | None) -> tuple[ArtifactRef, bool]:
        """(the artifact, whether it came from the cache): the stored one, or computed here (a sharded stage's
        shards one after the other)."""
        if existing is not None:
            return existing, True
        before_stage, before_part = fault_hooks(self.store.root, self.cfg.name, stage.name, iteration, self.cfg.fault)
        before_stage()
        return compute(stage, self.context(stage, key, before_part=before_part), inputs), False


# ----------------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Models:
    teacher: ModelSpec
    initial_student: ModelSpec  # S_0; its tokenizer encodes every prompt


def resolve_models(cfg: RunConfig) -> Models:
    return Models(teacher=spec_of(cfg.models.teacher), initial_student=spec_of(cfg.models.student))


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

    return PromptsInputs(data=cfg.data, tokenizer=models.initial_student, split=cfg.data.eval_split or EVAL_SPLIT,
                         n=cfg.data.eval_size, offset=0,
                         max_context=max_prompt_tokens(models.initial_student, cfg.evaluation.max_new_tokens),
                         seed=cfg.data.eval_seed)


def run_iteration(runner: StageRunner, cfg: RunConfig, method: MethodPlan, iteration: int, student: ModelSpec,
                  models: Models, eval_prompts: ArtifactRef) -> IterationResult:
    """One OPD iteration from student checkpoint `student` (S_i): returns S_{i+1} and its accuracy."""
    store, seed, checker = runner.store, cfg.seed, checker_name(cfg)
    done: dict[str, StageRecord] = {}

    def run(stage: Stage, inputs: StageInputs) -> ArtifactRef:
        done[stage.name] = runner(stage, inputs, iteration)
        return done[stage.name].ref

    n = cfg.data.prompts_per_iteration
    prompts = run(PROMPTS, PromptsInputs(
        data=cfg.data, tokenizer=models.initial_student, split="train", n=n, offset=iteration * n,
        max_context=max_prompt_tokens(models.initial_student, cfg.rollout.max_new_tokens), seed=seed))
    sampling = cfg.rollout.model_copy(update={"samples_per_prompt": method.samples_per_prompt})
    rollouts = run(ROLLOUT, RolloutInputs(student=student, prompts=prompts, rollout=sampling, checker=checker,
                                          seed=seed))
    scores = run(SCORE, ScoreInputs(teacher=models.teacher, student=student, rollouts=rollouts, scoring=cfg.scoring))
    if cfg.gates.enabled:
        gate_figures = run(GATES, GatesInputs(student=student, teacher=models.teacher, rollouts=rollouts,
                                              scores=scores, gates=cfg.gates))
        check_gates(store, gate_figures)  # DataError naming each failed gate: nothing trains on these rollouts
    analysis = None
    if method.analyze:
        analysis = run(ANALYZE, AnalyzeInputs(
            student=student, teacher=models.teacher, rollouts=rollouts, scores=scores, analysis=cfg.analysis,
            weighting=method.weighting, bridge=method.bridge is not None, label_roles=checker == "testbed",
            seed=seed))
    checkpoint = run(UPDATE, UpdateInputs(student=student, rollouts=rollouts, scores=scores, analysis=analysis,
                                          teacher=models.teacher, update=cfg.update, bridge=method.bridge,
                                          advantage=method.advantage, seed=seed))
    update_meta = store.manifest(checkpoint)["meta"]
    if update_meta.get("skipped"):
        runner.log(f"it{iteration} update skipped: {update_meta['skipped']}")
    new_student = ModelSpec.from_checkpoint(store, checkpoint, student)
    evals = run(EVALUATE, EvaluateInputs(model=new_student, prompts=eval_prompts, evaluation=cfg.evaluation,
                                         checker=checker, seed=seed))
    return IterationResult(iteration, done, checkpoint, accuracy(store, evals),
                           mean_loss=update_meta["mean_loss"],
                           analysis=store.manifest(analysis)["meta"] if analysis is not None else None,
                           skipped=update_meta.get("skipped"))


def stages_used(cfg: RunConfig) -> list[str]:
    """The stages an iteration of `cfg` runs (what `run_iteration` calls), in order."""
    skipped = ({GATES.name} if not cfg.gates.enabled else set()) | ({ANALYZE.name} if not plan(cfg).analyze else set())
    return [name for name in STAGES if name not in skipped]


def stage_calls(cfg: RunConfig) -> int:
    """How many stage calls a run of `cfg` makes: the eval set and the baseline, then each iteration's stages."""
    return 2 + cfg.iterations * len(stages_used(cfg))


def run_distillation(runner: StageRunner, cfg: RunConfig, resume: bool = False,
                     on_iteration: Callable[[IterationResult, Distillation], None] | None = None) -> Distillation:
    """The eval set and the baseline, then `cfg.iterations` iterations; with `resume`, starting after the run's
    latest checkpoint, from it, on the next prompts (what a scheduled "nightly distillation" does)."""
    store, seed, checker = runner.store, cfg.seed, checker_name(cfg)
    models, method = resolve_models(cfg), plan(cfg)
    eval_prompts = runner(PROMPTS, eval_prompts_inputs(cfg, models), iteration=0, label="eval_prompts").ref
    baseline = runner(EVALUATE, EvaluateInputs(model=models.initial_student, prompts=eval_prompts,
                                               evaluation=cfg.evaluation, checker=checker, seed=seed),
                      iteration=0, label="baseline").ref
    out = Distillation(cfg.name, str(store.root), accuracy(store, baseline))
    runner.log(f"baseline: student accuracy {out.baseline_accuracy:.1%} on {cfg.data.eval_size} held-out prompts")
    student, first = models.initial_student, 0
    latest = runner.lineage.latest("update") if resume else None
    if latest is not None:
        student, first = ModelSpec.from_checkpoint(store, latest.ref, models.initial_student), latest.iteration + 1
        runner.log(f"resuming run {cfg.name} after iteration {latest.iteration} from checkpoint {latest.ref.short()}")
    for iteration in range(first, first + cfg.iterations):
        result = run_iteration(runner, cfg, method, iteration, student, models, eval_prompts)
        out.iterations.append(result)
        runner.log(f"iteration {iteration}: accuracy {result.accuracy:.1%} (baseline {out.baseline_accuracy:.1%}), "
                   + (f"mean loss {result.mean_loss:.4f}" if result.skipped is None else "update skipped (no signal)"))
        if on_iteration is not None:
            on_iteration(result, out)
        student = ModelSpec.from_checkpoint(store, result.checkpoint, student)
    return out


def open_run(cfg: RunConfig) -> tuple[ArtifactStore, RunLineage]:
    """The run's store and lineage; records the run's method and config in its run.json."""
    cache_remote_code_under(cfg.resolved_root())  # before any stage imports transformers
    store = ArtifactStore(cfg.resolved_root(), remote=cfg.resolved_remote())
    lineage = RunLineage(store.layout, cfg.name)
    lineage.init(method=cfg.method, arm=cfg.arm or cfg.method, config=cfg.model_dump(mode="json"))
    return store, lineage


def run_plain(cfg: RunConfig, log: Callable[[str], None] = print, progress: bool | None = None,
              refresh: Iterable[str] = (), resume: bool = False) -> Distillation:
    """A whole run in this process, without Prefect (tests, benchmarks, debugging)."""
    refresh = check_refresh(refresh)  # before open_run records the run: a refused flag writes nothing
    with run_lock(cfg.resolved_root(), [cfg.name]):
        store, lineage = open_run(cfg)
        with StageRunner(store, lineage, cfg, refresh=refresh, progress=progress, log=log) as runner:
            return run_distillation(runner, cfg, resume=resume)
