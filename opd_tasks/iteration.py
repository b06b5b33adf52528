"""A plain driver (no Prefect) that chains the stages of OPD iterations.

    prompts_i -> rollout(S_i) -> score(teacher) -> analyze (not for opd) -> update(S_i) = S_{i+1}
    -> evaluate(S_{i+1})

Every stage is content-addressed, so calling `run_iteration` again with the same inputs computes nothing;
the Prefect flows in `flows/` wrap the same functions. Lineage records which artifact each iteration used.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from opd_tasks.analyze import analyze
from opd_tasks.common import ModelSpec
from opd_tasks.config import RunConfig
from opd_tasks.errors import ConfigError
from opd_tasks.evaluate import accuracy, evaluate
from opd_tasks.gates import check_gates, gates
from opd_tasks.prompts import prepare_prompts
from opd_tasks.rollout import rollout
from opd_tasks.scoring import score_teacher
from opd_tasks.update import update
from storage.lineage import RunLineage
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


@dataclass
class StageRecord:
    ref: ArtifactRef
    cached: bool
    seconds: float


@dataclass
class IterationResult:
    iteration: int
    stages: dict[str, StageRecord] = field(default_factory=dict)
    accuracy: float | None = None
    mean_loss: float | None = None

    @property
    def checkpoint(self) -> ArtifactRef:
        return self.stages["update"].ref


def resolve_models(cfg: RunConfig) -> tuple[ModelSpec, ModelSpec]:
    """(teacher, initial student) as ModelSpecs."""
    from opd_tasks.models import resolve_model

    out = []
    for ref in (cfg.models.teacher, cfg.models.student):
        r = resolve_model(ref)
        out.append(ModelSpec(path=r.local_dir, sha256=r.sha256, trust_remote_code=r.trust_remote_code,
                             dtype=ref.dtype))
    return out[0], out[1]


def checker_name(cfg: RunConfig) -> str:
    return "testbed" if cfg.data.source == "testbed" else "numeric"


def _max_prompt_tokens(model: ModelSpec, max_new_tokens: int) -> int | None:
    import json

    cfg = json.loads((model.dir / "config.json").read_text())
    ctx = cfg.get("max_position_embeddings")
    if ctx is None:
        return None
    if ctx <= max_new_tokens:
        raise ConfigError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in the model's "
                          f"context of {ctx} tokens ({model.path})")
    return ctx - max_new_tokens


class Stages:
    """Runs stage functions, timing them and telling cache hits from computed results."""

    def __init__(self, store: ArtifactStore, lineage: RunLineage | None, log: Callable[[str], None]):
        self.store, self.lineage, self.log = store, lineage, log

    def __call__(self, iteration: int, stage: str, fn: Callable[..., ArtifactRef], *args, **kwargs) -> StageRecord:
        before = len(self.store.published)
        t0 = time.perf_counter()
        ref = fn(self.store, *args, **kwargs)
        rec = StageRecord(ref, cached=len(self.store.published) == before, seconds=time.perf_counter() - t0)
        if self.lineage is not None:
            self.lineage.record(iteration, stage, ref, cached=rec.cached, seconds=rec.seconds)
        self.log(f"it{iteration} {stage:<9} {'cached' if rec.cached else 'computed'} in {rec.seconds:6.1f}s "
                 f"-> {ref.short()}")
        return rec


def eval_prompts(stages: Stages, cfg: RunConfig, tokenizer_model: ModelSpec) -> StageRecord:
    split = cfg.data.eval_split or "test"
    ctx = _max_prompt_tokens(tokenizer_model, cfg.evaluation.max_new_tokens)
    return stages(0, "eval_prompts", prepare_prompts, cfg.data, tokenizer_model, split, cfg.data.eval_size, 0,
                  cfg.seed, ctx)


def run_iteration(
    stages: Stages,
    cfg: RunConfig,
    iteration: int,
    student: ModelSpec,
    teacher: ModelSpec,
    tokenizer_model: ModelSpec,
    eval_set: ArtifactRef,
    progress: bool = True,
) -> IterationResult:
    """One OPD iteration from student checkpoint `student` (S_i); returns S_{i+1} and its accuracy."""
    res = IterationResult(iteration)
    n = cfg.data.prompts_per_iteration
    ctx = _max_prompt_tokens(tokenizer_model, cfg.rollout.max_new_tokens)
    res.stages["prompts"] = stages(iteration, "prompts", prepare_prompts, cfg.data, tokenizer_model, "train", n,
                                   iteration * n, cfg.seed, ctx)
    res.stages["rollout"] = stages(iteration, "rollout", rollout, student, res.stages["prompts"].ref, cfg.rollout,
                                   cfg.seed, checker_name(cfg), cfg.device, progress)
    res.stages["score"] = stages(iteration, "score", score_teacher, teacher, student, res.stages["rollout"].ref,
                                 cfg.scoring, cfg.device, progress)
    if cfg.gates.enabled:
        res.stages["gates"] = stages(iteration, "gates", gates, student, teacher, res.stages["rollout"].ref,
                                     res.stages["score"].ref, cfg.gates, cfg.device)
        check_gates(stages.store, res.stages["gates"].ref)
    weights = None
    if cfg.method != "opd":
        res.stages["analyze"] = stages(iteration, "analyze", analyze, student, teacher, res.stages["rollout"].ref,
                                       res.stages["score"].ref, cfg.analysis, cfg.method, cfg.update, cfg.seed,
                                       checker_name(cfg) == "testbed", cfg.device, progress)
        weights = res.stages["analyze"].ref
    res.stages["update"] = stages(iteration, "update", update, student, res.stages["rollout"].ref,
                                  res.stages["score"].ref, cfg.update, cfg.seed, weights, teacher, cfg.device,
                                  progress)
    new_student = ModelSpec.from_checkpoint(stages.store, res.checkpoint)
    res.stages["evaluate"] = stages(iteration, "evaluate", evaluate, new_student, eval_set, cfg.evaluation,
                                    cfg.seed, checker_name(cfg), cfg.device, progress)
    res.accuracy = accuracy(stages.store, res.stages["evaluate"].ref)
    upd = stages.store.read_table(res.checkpoint, "updates", columns=["loss"]).column("loss").to_pylist()
    res.mean_loss = sum(upd) / len(upd)
    return res


def run_plain(cfg: RunConfig, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """All iterations of a run with the plain driver. Returns the baseline accuracy and per-iteration results."""
    store = ArtifactStore(cfg.resolved_root(), remote=cfg.resolved_remote())
    lineage = RunLineage(store.layout, cfg.name)
    lineage.init(method=cfg.method, config=cfg.model_dump(mode="json"))
    stages = Stages(store, lineage, log)
    teacher, student0 = resolve_models(cfg)
    ev = eval_prompts(stages, cfg, student0)
    base = stages(0, "baseline", evaluate, student0, ev.ref, cfg.evaluation, cfg.seed, checker_name(cfg),
                  cfg.device, progress)
    out = {"baseline_accuracy": accuracy(store, base.ref), "iterations": [], "store": store, "lineage": lineage}
    log(f"baseline: student accuracy {out['baseline_accuracy']:.1%} on {cfg.data.eval_size} held-out prompts")
    student = student0
    for i in range(cfg.iterations):
        res = run_iteration(stages, cfg, i, student, teacher, student0, ev.ref, progress)
        out["iterations"].append(res)
        log(f"iteration {i}: accuracy {res.accuracy:.1%}, mean loss {res.mean_loss:.4f}")
        student = ModelSpec.from_checkpoint(store, res.checkpoint)
    return out
