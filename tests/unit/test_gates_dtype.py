"""The gates stage in other dtypes and batch sizes (issue 19, items 1 and 6): the teacher-repeatability limit follows
the dtype the teacher scores in, and the re-scores' batching changes no figure."""

from __future__ import annotations

import pytest

from opd_tasks.config import GatesConfig, ScoringConfig
from opd_tasks.stages import GATES, SCORE, GatesInputs, ScoreInputs
from opd_tasks.stages.gates import evaluate_gates, repeat_limit
from tests.helpers import scored_env


def test_repeat_limit_follows_the_teacher_dtype() -> None:
    cfg = GatesConfig()
    assert repeat_limit(cfg, "float32") == 1e-3  # as strict as before for fp32 (the CPU testbed)
    assert repeat_limit(cfg, "bfloat16") == repeat_limit(cfg, "float16") == cfg.max_teacher_repeat_diff_16bit == 0.5
    own = GatesConfig(max_teacher_repeat_diff=1e-4, max_teacher_repeat_diff_16bit=None)
    assert repeat_limit(own, "float32") == 1e-4 and repeat_limit(own, "bfloat16") is None
    figs = {"truncated": 0.0, "topk_coverage": 1.0, "logprob_drift": 0.0, "teacher_repeat_diff": 0.1}
    fp32, bf16 = evaluate_gates(figs, cfg, "float32"), evaluate_gates(figs, cfg, "bfloat16")
    assert not fp32["teacher_repeat_diff"]["passed"] and fp32["teacher_repeat_diff"]["threshold"] == 1e-3
    assert bf16["teacher_repeat_diff"]["passed"] and bf16["teacher_repeat_diff"]["threshold"] == 0.5


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    return scored_env(tmp_path_factory.mktemp("gates-dtype"), prompts=5, samples=2, max_new_tokens=8, top_k=4)


def _gates(env, scores, teacher, cfg: GatesConfig) -> dict:
    ref = GATES(env["store"], GatesInputs(student=env["student"], teacher=teacher, rollouts=env["roll"],
                                          scores=scores, gates=cfg), device="cpu")
    return env["store"].manifest(ref)["meta"]


def test_gate_batch_size_changes_no_figure(env) -> None:
    """One sequence per forward or all of them: the same figures up to float32 summation order."""
    one = _gates(env, env["scores"], env["teacher"], GatesConfig(batch_size=1))
    many = _gates(env, env["scores"], env["teacher"], GatesConfig(batch_size=64))
    assert one["teacher_dtype"] == many["teacher_dtype"] == "float32"
    for name, g in one["gates"].items():
        assert g["value"] == pytest.approx(many["gates"][name]["value"], abs=1e-5), name
    assert one["gates"]["teacher_repeat_diff"]["value"] < 1e-4 and one["gates"]["logprob_drift"]["value"] < 1e-4


def test_bf16_teacher_is_held_to_the_16bit_limit(env) -> None:
    """A teacher configured in bfloat16 scores and re-scores in bfloat16 (on the CPU here), in batches of other
    shapes (score: 64 sequences, gates: 3): the gate applies the 16-bit limit and records the dtype."""
    teacher = env["teacher"].model_copy(update={"dtype": "bfloat16"})
    scores = SCORE(env["store"], ScoreInputs(teacher=teacher, student=env["student"], rollouts=env["roll"],
                                             scoring=ScoringConfig(top_k=4)), progress=False)
    meta = _gates(env, scores, teacher, GatesConfig(batch_size=3))
    rep = meta["gates"]["teacher_repeat_diff"]
    assert meta["teacher_dtype"] == "bfloat16" and rep["threshold"] == 0.5 and rep["passed"]
    assert rep["value"] < 0.5
