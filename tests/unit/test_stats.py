"""The paired statistics against scipy on fixed numbers, and the bootstrap against known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special, stats

from opd_tasks.stats import betainc, bootstrap_ci, paired_t, t_quantile, wilcoxon

A = [0.81, 0.77, 0.85, 0.79, 0.90, 0.74, 0.88, 0.80, 0.83, 0.76, 0.86, 0.82]
B = [0.84, 0.78, 0.85, 0.83, 0.91, 0.79, 0.86, 0.84, 0.88, 0.77, 0.90, 0.85]


@pytest.mark.parametrize(("a", "b", "x"), [(0.5, 0.5, 0.3), (2.0, 3.0, 0.7), (5.5, 0.5, 0.99), (30.0, 0.5, 0.2),
                                           (1.0, 1.0, 0.0), (3.0, 2.0, 1.0)])
def test_betainc_matches_scipy(a: float, b: float, x: float) -> None:
    assert betainc(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("df", [1, 3, 11, 40])
def test_t_quantile_matches_scipy(df: int) -> None:
    assert t_quantile(0.975, df) == pytest.approx(float(stats.t.ppf(0.975, df)), rel=1e-8)


def test_paired_t_matches_scipy() -> None:
    got = paired_t(A, B)
    ref = stats.ttest_rel(B, A)
    assert got.t == pytest.approx(float(ref.statistic), rel=1e-10)
    assert got.p == pytest.approx(float(ref.pvalue), rel=1e-8)
    ci = ref.confidence_interval(0.95)
    assert got.ci95 == pytest.approx((float(ci.low), float(ci.high)), rel=1e-7)
    assert got.n == 12 and got.mean == pytest.approx(np.mean(np.subtract(B, A)))
    same = paired_t(A, A)
    assert (same.mean, same.p, same.ci95) == (0.0, 1.0, (0.0, 0.0))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_t([0.5], [0.6])


def test_wilcoxon_matches_scipy_exact_and_with_ties() -> None:
    a = [0.5, 0.61, 0.42, 0.73, 0.55, 0.66, 0.48, 0.52, 0.71]
    b = [0.56, 0.59, 0.49, 0.81, 0.54, 0.70, 0.58, 0.55, 0.76]
    assert len({round(abs(y - x), 6) for x, y in zip(a, b, strict=True)}) == 9  # no ties, no zeros: exact
    got, ref = wilcoxon(a, b), stats.wilcoxon(b, a, method="exact")
    assert got.exact and got.statistic == float(ref.statistic)
    assert got.p == pytest.approx(float(ref.pvalue), rel=1e-12)
    tied_a, tied_b = A, B  # differences with ties and a zero: normal approximation with the tie correction
    got = wilcoxon(tied_a, tied_b)
    ref = stats.wilcoxon(tied_b, tied_a, zero_method="wilcox", correction=False, method="approx")
    assert not got.exact and got.n == 11
    assert got.statistic == float(ref.statistic) and got.p == pytest.approx(float(ref.pvalue), rel=1e-10)
    assert wilcoxon(A, A).p == 1.0


def test_bootstrap_ci_known_cases() -> None:
    # a constant difference of 0.1 on every problem of every seed: the interval is that point
    a = [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
    b = [[0.1, 1.1, 0.1, 1.1], [1.1, 1.1, 0.1, 0.1]]
    lo, hi = bootstrap_ci(a, b, reps=200)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    # independent noise: the interval covers the true difference (0) and has about the normal-theory width
    rng = np.random.default_rng(1)
    a = [rng.integers(0, 2, 400).astype(float) for _ in range(10)]
    b = [rng.integers(0, 2, 400).astype(float) for _ in range(10)]
    lo, hi = bootstrap_ci(a, b, reps=1000, seed=2)
    se = math.sqrt(2 * 0.25 / 400 / 10)  # per-problem Bernoulli(0.5) noise of a mean over 10 x 400 problems
    assert lo < 0 < hi and 2 * 1.96 * se * 0.7 < hi - lo < 2 * 1.96 * se * 1.8
    with pytest.raises(ValueError, match="same, non-empty set of problems"):
        bootstrap_ci([[1.0]], [[1.0, 0.0]])


def test_threshold_calibration_on_known_cases() -> None:
    """bench detectors' calibrated delta: the cut with the largest Youden J (divergent iff D_t >= delta)."""
    from bench.detectors import calibrate

    assert calibrate([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == (0.8, 1.0)
    delta, j = calibrate([0.1, 0.5, 0.3, 0.9, 0.2], [False, True, True, True, False])  # one divergent at 0.3
    assert delta == 0.3 and j == 1.0
    delta, j = calibrate([0.1, 0.6, 0.4, 0.9], [False, False, True, True])  # overlap: best keeps 2 of 2, drops 1 of 2
    assert delta == 0.4 and j == pytest.approx(0.5)
    assert calibrate([0.1, 0.2], [True, True]) == (None, None)


def test_hypotheses_from_report_summaries(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.hypotheses on made-up per-seed values: H1's one-sided p and H2's 90% CI equal scipy's, H3's share
    is the ratio of mean gains, H4 reads the early-stop CI."""
    import json

    import bench.common
    from bench.hypotheses import main

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path / "results")  # not the repository's bench/results
    seeds = [str(s) for s in range(2, 8)]
    opd = [0.20, 0.22, 0.25, 0.21, 0.24, 0.23]
    oracle = [0.24, 0.25, 0.27, 0.26, 0.27, 0.25]
    probe = [x + 0.02 for x in opd]  # 0.02 of a 0.032 gain: 63%

    def method(final, stop):
        return {"final_by_seed": dict(zip(seeds, final, strict=True)), "area_by_seed": dict(zip(seeds, final,
                strict=True)), "early_stop_by_seed": dict(zip(seeds, stop, strict=True))}

    def summary(**arms):
        return {"summary": {"methods": arms, "comparisons": []}}

    stop_opd, stop_oracle = [0.5] * 6, [0.46, 0.47, 0.45, 0.46, 0.44, 0.47]
    files = {}
    for name, content in (("h1", summary(opd=method(opd, stop_opd), **{"topd-oracle": method(oracle, stop_oracle),
                                         "topd-probe": method(probe, stop_opd), "topd-swap": method(opd, stop_opd)})),
                          ("h2", summary(opd=method(opd, stop_opd), **{"topd-oracle": method(
                              [x + 0.001 * (-1) ** i for i, x in enumerate(opd)], stop_opd)})),
                          ("abl", summary(opd=method(opd, stop_opd), **{"topd-oracle": method(oracle, stop_oracle)}))):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(content))
    res = main(["--h1", str(files["h1"]), "--h2", str(files["h2"]), "--abl", str(files["abl"])])
    ref = stats.ttest_rel(oracle, opd, alternative="greater")
    assert res["H1"]["one_sided_p"] == pytest.approx(ref.pvalue, rel=1e-8) and res["H1"]["holds"]
    ci90 = stats.ttest_rel([x + 0.001 * (-1) ** i for i, x in enumerate(opd)], opd).confidence_interval(0.90)
    assert res["H2"]["final"]["ci90"] == pytest.approx([100 * ci90.low, 100 * ci90.high], rel=1e-7)
    assert res["H2"]["holds"]
    gain = 100 * np.mean(np.subtract(oracle, opd))
    assert res["H3"]["topd-probe"]["recovered_share"] == pytest.approx(100 * np.mean(np.subtract(probe, opd)) / gain)
    assert res["H3"]["topd-probe"]["holds"] and not res["H3"]["topd-swap"]["holds"]
    assert res["H4"]["holds"] and res["H4"]["early_stop"]["mean"] == pytest.approx(-100 * (0.5 - np.mean(stop_oracle)))
    assert (tmp_path / "results" / "experiment-17-hypotheses.json").is_file()
