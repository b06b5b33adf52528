"""Quality gates, a stage between teacher scoring and the update. Each gate is a number compared with a
configured threshold (None disables it); the stage publishes every figure in its artifact's manifest
(`meta.gates`) and `check_gates` raises `DataError` naming each failed gate before anything trains on it.

- truncated: share of rollouts that hit max_new_tokens (an EOS the student never emits, a length explosion);
- topk_coverage: share of sampled tokens inside the teacher's top-k (teacher and student disagree on format);
- logprob_drift: mean |sampling log-prob - the same token's log-prob recomputed by the student in float32, the
  trainer's weights| over a sample (sampler/trainer mismatch: dtype, kernels, a wrong checkpoint). The update
  records the same pair for every token it trains on (its `old_logprobs` table, with the trainer's autocast);
- teacher_repeat_diff: max |difference| when the teacher scores the same sample again, in the dtype it scored in
  (non-determinism, a wrong teacher). The limit depends on that dtype (`repeat_limit`): float32 kernels that see
  another batch shape differ in the last bits (1e-6 on the CPU testbed; limit `max_teacher_repeat_diff`, 1e-3),
  bfloat16 and float16 ones by far more (`max_teacher_repeat_diff_16bit`, 0.5: a logit of magnitude 20 rounded
  to bfloat16's 8-bit mantissa moves by up to 0.04, and the rounding of every layer compounds; a wrong teacher
  or scrambled positions differ by whole nats). With `scoring.backend: vllm` the re-score is `hf`, so the figure
  is the backend difference: reported, not enforced.

Both re-scores run on `hf` whatever the stages' backends, `gates.batch_size` sequences per forward, computing
only the sampled tokens' log-probs (opd_tasks/training/logprobs.py); the student is freed before the teacher
is loaded.
"""

from __future__ import annotations

import numpy as np

from opd_tasks.config import GatesConfig
from opd_tasks.errors import DataError
from opd_tasks.models import ModelSpec
from opd_tasks.stages.inputs import GatesInputs
from opd_tasks.stages.registry import Output, StageContext
from opd_tasks.training.sequences import scored_sequences
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

#: The dtypes whose passes may differ by more than float32's: their own teacher_repeat_diff limit.
SIXTEEN_BIT = ("bfloat16", "float16")


def repeat_limit(cfg: GatesConfig, dtype: str) -> float | None:
    """The teacher_repeat_diff limit for a teacher that scores in `dtype` (torch's name: float32, bfloat16, ...)."""
    return cfg.max_teacher_repeat_diff_16bit if dtype in SIXTEEN_BIT else cfg.max_teacher_repeat_diff


def evaluate_gates(figures: dict[str, float], cfg: GatesConfig, teacher_dtype: str = "float32") -> dict[str, dict]:
    """{gate: {value, threshold, passed}} for the configured gates; `teacher_dtype` picks the repeat limit."""
    rules = {"truncated": (cfg.max_truncated, "max"), "topk_coverage": (cfg.min_topk_coverage, "min"),
             "logprob_drift": (cfg.max_logprob_drift, "max"),
             "teacher_repeat_diff": (repeat_limit(cfg, teacher_dtype), "max")}
    out = {}
    for name, (limit, kind) in rules.items():
        v = figures[name]
        ok = True if limit is None else (v <= limit if kind == "max" else v >= limit)
        out[name] = {"value": v, "threshold": limit, "kind": kind, "passed": ok}
    return out


def _abs_diffs(stored: list[list[float]], again: list[list[float]]) -> np.ndarray:
    """Every token's |stored - recomputed| log-prob, flat."""
    if not stored:
        return np.zeros(0)
    return np.concatenate([np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                           for a, b in zip(stored, again, strict=True)])


def gates(ctx: StageContext, x: GatesInputs) -> Output:
    """Quality figures of the rollouts and scores, each against its threshold (manifest meta only)."""
    from opd_tasks.backends.hf import resolve_device
    from opd_tasks.backends.loaded import LOADED
    from opd_tasks.training.logprobs import completion_logprobs

    store, rollouts, scores, cfg = ctx.store, x.rollouts, x.scores, x.gates
    roll = store.read_table(rollouts, "rollouts", columns=["finish_reason"])
    reasons = roll.column("finish_reason").to_pylist()
    seqs = scored_sequences(store, rollouts, scores, ("topk_ids",))
    inside = [tok in ids for s in seqs for tok, ids in zip(s.tokens, s.topk_ids, strict=True)]
    # A deterministic sample (evenly spaced) for the two gates that need model passes.
    step = max(1, len(seqs) // cfg.sample_sequences)
    sample = seqs[::step][: cfg.sample_sequences]
    comps = [s.tokens for s in sample]
    dev = resolve_device(ctx.device)

    def rescore(spec: ModelSpec, prompts: list[list[int]]) -> tuple[list[list[float]], str]:
        """The sample's log-probs under `spec` (the process's loaded model, backends/loaded.py) after `prompts`,
        and the dtype it ran in."""
        model = LOADED.model(spec, dev)
        ran_in = str(next(model.parameters()).dtype).removeprefix("torch.")
        # right padding, so the pad id never reaches a value
        return completion_logprobs(model, prompts, comps, pad_token_id=0, batch_size=cfg.batch_size), ran_in

    # the trainer's weights (opd_tasks/stages/update.py), then the teacher in the dtype the score stage ran it in
    recomputed, _ = rescore(x.student.model_copy(update={"dtype": "float32"}), [s.prompt for s in sample])
    again, teacher_dtype = rescore(x.teacher, [s.teacher_input for s in sample])
    drift = _abs_diffs([s.sampling_logprobs for s in sample], recomputed)
    rep = _abs_diffs([s.teacher_logprobs for s in sample], again)
    figures = {
        "truncated": sum(r == "length" for r in reasons) / max(1, len(reasons)),
        "topk_coverage": sum(inside) / max(1, len(inside)),
        "logprob_drift": float(drift.mean()) if drift.size else 0.0,
        "teacher_repeat_diff": float(rep.max()) if rep.size else 0.0,
    }
    if store.manifest(scores)["meta"].get("backend") == "vllm":
        # The re-score runs on `hf`, so for vLLM scores this figure is the backend difference (bf16 kernels), not
        # the scorer's non-determinism: it is reported, never enforced (the parity tests bound it; tests/gpu).
        cfg = cfg.model_copy(update={"max_teacher_repeat_diff": None, "max_teacher_repeat_diff_16bit": None})
    result = evaluate_gates(figures, cfg, teacher_dtype)
    return Output(meta={"gates": result, "passed": all(g["passed"] for g in result.values()),
                        "sampled_sequences": len(sample), "teacher_dtype": teacher_dtype})


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


def check_headroom(store: ArtifactStore, teacher_evals: ArtifactRef, student_evals: ArtifactRef,
                   margin: float) -> str:
    """The headroom gate, before the first update: the teacher's eval accuracy (answering with its context) must
    exceed the initial student's by `margin` (`gates.min_headroom`), else DataError; returns the line the run logs.
    Prompt-only data has no accuracy: `check_config` refuses the gate for it before the run starts."""
    teacher, student = store.manifest(teacher_evals)["meta"], store.manifest(student_evals)["meta"]
    t, s = teacher["accuracy"], student["accuracy"]
    if t - s < margin:
        raise DataError(
            f"headroom gate: the teacher answers {t:.1%} of the {student['n']} held-out samples correctly and the "
            f"student {s:.1%}, so the teacher is not {margin:.1%} better (gates.min_headroom): distilling toward it "
            "cannot be expected to help. Use a stronger teacher or give it a context (teacher_context), or set "
            f"gates.min_headroom: null to train anyway. Figures in artifacts {teacher_evals.short()} (teacher) and "
            f"{student_evals.short()} (student).")
    return f"headroom gate: teacher accuracy {t:.1%}, student {s:.1%} (at least {margin:.1%} more needed)"
