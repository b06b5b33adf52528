"""Paired statistics for comparing two methods run on the same seeds and the same eval problems.

For each seed s the two methods' scores a_s and b_s are paired (same eval set, same prompts and sampling stream);
what is compared is the per-seed difference d_s = b_s - a_s:
- `paired_t`: the paired t-test (two-sided), and the t-based 95% CI of the mean difference;
- `wilcoxon`: the Wilcoxon signed-rank test (two-sided; zero differences dropped): exact p-value without ties and
  for n <= 50, the normal approximation with the tie correction otherwise (scipy's defaults);
- `bootstrap_ci`: a percentile CI from resampling seeds, then problems within each seed (both methods at the same
  problems), so that both the seed-to-seed and the eval-set noise are in it.
Pure Python and numpy (no scipy at run time); tests/unit/test_stats.py checks each against scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t, by bisection on the two-sided tail."""
    lo, hi, tail = 0.0, 1e3, 2.0 * (1.0 - p)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf_two_sided(mid, df) > tail:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class PairedT:
    n: int
    mean: float
    sd: float
    t: float
    p: float
    ci95: tuple[float, float]


def paired_t(a: Sequence[float], b: Sequence[float]) -> PairedT:
    """The paired t-test of b - a (two-sided) with the 95% CI of the mean difference; needs 2 pairs or more."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = len(d)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return PairedT(n, mean, 0.0, math.copysign(math.inf, mean) if mean else 0.0, 0.0 if mean else 1.0,
                       (mean, mean))
    se = sd / math.sqrt(n)
    t = mean / se
    half = t_quantile(0.975, n - 1) * se
    return PairedT(n, mean, sd, t, t_sf_two_sided(t, n - 1), (mean - half, mean + half))


@dataclass(frozen=True)
class Wilcoxon:
    n: int  # pairs with a non-zero difference
    statistic: float  # the smaller of the positive and negative rank sums
    p: float
    exact: bool


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of `x`, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> Wilcoxon:
    """The Wilcoxon signed-rank test of b - a, two-sided, zero differences dropped."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    d = d[d != 0.0]
    n = len(d)
    if n == 0:
        return Wilcoxon(0, 0.0, 1.0, True)
    r = _ranks(np.abs(d))
    w_plus = float(r[d > 0].sum())
    stat = min(w_plus, n * (n + 1) / 2.0 - w_plus)
    ties = len(np.unique(np.abs(d))) < n
    if n <= 50 and not ties:
        # exact: the number of subsets of {1..n} with each rank sum, by dynamic programming
        top = n * (n + 1) // 2
        counts = np.zeros(top + 1)
        counts[0] = 1.0
        for k in range(1, n + 1):
            counts[k:] = counts[k:] + counts[: top + 1 - k].copy()
        cdf = counts[: int(stat) + 1].sum() / 2.0**n
        return Wilcoxon(n, stat, min(1.0, 2.0 * cdf), True)
    mean = n * (n + 1) / 4.0
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float((tie_counts**3 - tie_counts).sum()) / 48.0
    z = (stat - mean) / math.sqrt(var)
    return Wilcoxon(n, stat, min(1.0, math.erfc(abs(z) / math.sqrt(2.0))), False)


def bootstrap_ci(per_seed_a: Sequence[Sequence[float]], per_seed_b: Sequence[Sequence[float]],
                 reps: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of mean(b) - mean(a): resample seeds with replacement, then, within each drawn seed, its
    problems with replacement (the same problems for both methods); per_seed_x[s][j] is method x's score on
    problem j of seed s (the problems of a seed are the same for both)."""
    rng = np.random.default_rng(seed)
    pairs = [(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
             for a, b in zip(per_seed_a, per_seed_b, strict=True)]
    for a, b in pairs:
        if len(a) != len(b) or len(a) == 0:
            raise ValueError("each seed needs the same, non-empty set of problems for both methods")
    out = np.empty(reps)
    for k in range(reps):
        diffs = []
        for s in rng.integers(0, len(pairs), len(pairs)):
            a, b = pairs[s]
            j = rng.integers(0, len(a), len(a))
            diffs.append(b[j].mean() - a[j].mean())
        out[k] = np.mean(diffs)
    lo, hi = np.quantile(out, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
