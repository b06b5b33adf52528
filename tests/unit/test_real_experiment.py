"""The real recipe's test statistics (bench/real_experiment.py) on known cases."""

from __future__ import annotations

from pathlib import Path

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
                   "rkl_per_sequence": pytest.approx(9.0 / 3), "truncated": pytest.approx(1 / 3)}
    teacher = step_figures({"a": (True, None, 4, False), "b": (False, None, 3, False)})
    assert teacher["rkl_per_token"] is None and teacher["accuracy"] == 0.5


def test_the_analysis_of_known_runs(monkeypatch) -> None:
    """Two seeds of arm opd with known answers on 4 questions; one seed of arm topd-window stopped early."""
    import bench.real_experiment as rx

    def step(correct: list[bool], rkl: float | None) -> dict:
        return {f"q{j}": (c, rkl, 2, False) for j, c in enumerate(correct)}

    teacher = step([True, True, True, False], None)
    base = step([False, False, False, False], 1.0)  # the teacher is 75 points better
    runs = {
        "x-opd-s1": {-1: teacher, 0: base, 1: step([True, False, False, False], 0.8),
                     2: step([True, True, False, False], 0.6)},  # +50 points: G = 2/3
        "x-opd-s2": {-1: teacher, 0: base, 1: step([True, True, True, False], 1.2),
                     2: step([True, False, False, False], 1.1)},  # +25 points, G = 1/3; the reverse KL rose
        "x-topd-window-s1": {-1: teacher, 0: base, 1: step([True, True, False, False], 0.5)},
    }
    monkeypatch.setattr(rx, "read_evals", lambda root, names: {r: v for r, v in runs.items() if r in names})
    got = rx.analyse(Path("/nowhere"), "x", ["opd", "topd-window"], [1, 2], last=2)
    opd = got["arms"]["opd"]
    assert opd["per_seed"]["1"]["gap_closed"] == pytest.approx(2 / 3)
    assert opd["per_seed"]["2"]["gap_closed"] == pytest.approx(1 / 3)
    assert opd["gap_closed_mean"] == pytest.approx(0.5) and opd["gain_mean"] == pytest.approx(0.375)
    assert opd["per_seed"]["1"]["rkl_falls"] and not opd["per_seed"]["2"]["rkl_falls"] and not opd["r2_holds"]
    assert opd["r1_holds"] == (opd["gain_ci95"][0] > 0)
    assert got["left_out"] == {"x-topd-window-s1": "reached step 1", "x-topd-window-s2": "not run"}
    assert got["arms"]["topd-window"] == {"seeds": []} and "comparisons" not in got
