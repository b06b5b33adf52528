"""The real recipe's test statistics (bench/real_experiment.py) on known cases."""

from __future__ import annotations

import numpy as np
import pytest

from bench.real_experiment import g_bootstrap, step_figures


def test_the_gap_closed_is_exact_where_resampling_cannot_move_it() -> None:
    base = [np.zeros(50), np.zeros(50)]
    teacher = [np.ones(50), np.ones(50)]
    assert g_bootstrap(base, [np.ones(50), np.ones(50)], teacher, reps=200) == (1.0, 1.0)  # the teacher reached
    assert g_bootstrap(base, [np.zeros(50), np.zeros(50)], teacher, reps=200) == (0.0, 0.0)  # nothing gained


def test_the_gap_closed_interval_covers_a_half_and_its_width_follows_the_questions() -> None:
    rng = np.random.default_rng(1)
    base, teacher = [np.zeros(400)] * 3, [np.ones(400)] * 3
    finals = [(rng.random(400) < 0.5).astype(float) for _ in range(3)]
    lo, hi = g_bootstrap(base, finals, teacher, reps=500)
    g = np.mean([f.mean() for f in finals])
    assert lo < g < hi and lo < 0.5 < hi
    # a binomial share of 1,200 questions: the 95% interval is about +-1.96 * sqrt(0.25 / 1200) = +-0.028
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.25 / 1200), rel=0.25)


def test_step_figures_are_the_manifest_definitions() -> None:
    # (correct, rkl summed over the answer, answer tokens, truncated)
    answers = {"a": (True, 2.0, 4, False), "b": (False, 6.0, 4, True), "c": (True, 1.0, 2, False)}
    got = step_figures(answers)
    assert got == {"n": 3, "accuracy": pytest.approx(2 / 3), "rkl_per_token": pytest.approx(9.0 / 10),
                   "truncated": pytest.approx(1 / 3)}
    teacher = step_figures({"a": (True, None, 4, False), "b": (False, None, 3, False)})
    assert teacher["rkl_per_token"] is None and teacher["accuracy"] == 0.5
