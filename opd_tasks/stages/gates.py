"""Quality gates, a stage between teacher scoring and the update. Each gate is a number compared with a
configured threshold (None disables it); the stage publishes every figure in its artifact's manifest
(`meta.gates`) and `check_gates` raises `DataError` naming each failed gate before anything trains on it.

- truncated: share of rollouts that hit max_new_tokens (an EOS the student never emits, a length explosion);
- topk_coverage: share of sampled tokens inside the teacher's top-k (teacher and student disagree on format);
- logprob_drift: mean |sampling log-prob - a teacher-forced recomputation by the same student| over a sample
  (sampler/trainer mismatch: dtype, kernels, a wrong checkpoint);
- teacher_repeat_diff: max |difference| when the teacher scores the same sample again (non-determinism); with
  `scoring.backend: vllm` the re-score is `hf`, so the figure is the backend difference: reported, not enforced.
"""

from __future__ import annotations

import numpy as np

from opd_tasks.config import GatesConfig
from opd_tasks.errors import DataError
from opd_tasks.models import ModelSpec
from opd_tasks.stages.registry import StageContext, StageInputs, stage
from opd_tasks.training.sequences import scored_sequences
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


class GatesInputs(StageInputs):
    """The figures of the gates on `rollouts` and their `scores`; two of them re-score a sample with `student` and
    `teacher`."""

    student: ModelSpec
    teacher: ModelSpec
    rollouts: ArtifactRef
    scores: ArtifactRef
    gates: GatesConfig


def evaluate_gates(figures: dict[str, float], cfg: GatesConfig) -> dict[str, dict]:
    """{gate: {value, threshold, passed}} for the configured gates."""
    rules = {"truncated": (cfg.max_truncated, "max"), "topk_coverage": (cfg.min_topk_coverage, "min"),
             "logprob_drift": (cfg.max_logprob_drift, "max"),
             "teacher_repeat_diff": (cfg.max_teacher_repeat_diff, "max")}
    out = {}
    for name, (limit, kind) in rules.items():
        v = figures[name]
        ok = True if limit is None else (v <= limit if kind == "max" else v >= limit)
        out[name] = {"value": v, "threshold": limit, "kind": kind, "passed": ok}
    return out


@stage("gates", version=1, inputs=GatesInputs, outputs=())
def gates(ctx: StageContext, x: GatesInputs) -> ArtifactRef:
    """Quality figures of the rollouts and scores, each against its threshold (manifest meta only)."""
    from opd_tasks.backends import HfBackend

    store, rollouts, scores, cfg = ctx.store, x.rollouts, x.scores, x.gates
    roll = store.read_table(rollouts, "rollouts", columns=["finish_reason"])
    reasons = roll.column("finish_reason").to_pylist()
    seqs = scored_sequences(store, rollouts, scores, ("topk_ids",))
    inside = [tok in ids for s in seqs for tok, ids in zip(s.tokens, s.topk_ids, strict=True)]
    # A deterministic sample (evenly spaced) for the two gates that need model passes.
    step = max(1, len(seqs) // cfg.sample_sequences)
    sample = seqs[::step][: cfg.sample_sequences]
    prompts, comps = [s.prompt for s in sample], [s.tokens for s in sample]
    # The re-scores run on hf whatever the stages' backends; right padding, so the pad id never reaches a value.
    hf = HfBackend(ctx.device)
    rec = hf.score(x.student, prompts, comps, pad_token_id=0, top_k=1, progress=False)
    drift = np.concatenate([np.abs(np.asarray(s.sampling_logprobs) - np.asarray(r.logprob))
                            for s, r in zip(sample, rec, strict=True)])
    again = hf.score(x.teacher, prompts, comps, pad_token_id=0, top_k=1, progress=False)
    rep = np.concatenate([np.abs(np.asarray(s.teacher_logprobs) - np.asarray(r.logprob))
                          for s, r in zip(sample, again, strict=True)])
    figures = {
        "truncated": sum(r == "length" for r in reasons) / max(1, len(reasons)),
        "topk_coverage": sum(inside) / max(1, len(inside)),
        "logprob_drift": float(drift.mean()) if drift.size else 0.0,
        "teacher_repeat_diff": float(rep.max()) if rep.size else 0.0,
    }
    if store.manifest(scores)["meta"].get("backend") == "vllm":
        # The re-score runs on `hf`, so for vLLM scores this figure is the backend difference (bf16 kernels), not
        # the scorer's non-determinism: it is reported, never enforced (the parity tests bound it; tests/gpu).
        cfg = cfg.model_copy(update={"max_teacher_repeat_diff": None})
    result = evaluate_gates(figures, cfg)
    with ctx.writer() as w:
        w.meta.update({"gates": result, "passed": all(g["passed"] for g in result.values()),
                       "sampled_sequences": len(sample)})
        return w.commit()


def check_gates(store: ArtifactStore, ref: ArtifactRef) -> dict:
    """Raise DataError naming every failed gate; return the gates otherwise."""
    meta = store.manifest(ref)["meta"]
    failed = {k: g for k, g in meta["gates"].items() if not g["passed"]}
    if failed:
        parts = [f"{k} = {g['value']:.4g} ({'above' if g['kind'] == 'max' else 'below'} the limit {g['threshold']})"
                 for k, g in failed.items()]
        raise DataError("quality gates failed, the iteration stops before the update: " + "; ".join(parts)
                        + f". Figures in artifact {ref.short()}; thresholds under gates.* in the config "
                        "(null disables a gate).")
    return meta["gates"]
