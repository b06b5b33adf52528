"""Pure per-token functions of TOPD (numpy, no model): high-loss selection, the positions worth probing, regimes,
token weights and the classifier's scores against ground truth. Each is checked against a slow loop in
tests/unit/test_analyze.py.

Regimes: `normal` (not high-loss), `surface` (high-loss, D_t < delta), `divergent` (high-loss, D_t >= delta),
`unprobed` (high-loss beyond the per-rollout probe budget: treated as in standard OPD, weight 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from opd_tasks.config import AnalysisConfig
from opd_tasks.errors import ConfigError
from opd_tasks.method import TokenWeighting

REGIMES = ("normal", "surface", "divergent", "unprobed")

#: The regime each ground-truth role of the testbed (opd_tasks/testbed/labeler.py) should get: the truth the
#: classifier is scored against, and what the `oracle` detector assigns. `unknown` has none.
TRUE_REGIME = {"form": "surface", "filler": "surface", "reasoning": "divergent", "answer": "divergent",
               "fork": "divergent"}


def high_loss_cut(signal: np.ndarray, quantile: float, threshold: float | None, floor: float = 0.0) -> float:
    """The signal value from which a token is high-loss: `threshold`, or the one that keeps the top-q fraction of
    the batch's tokens `signal` (ties included) but never below `floor` (`analysis.min_high_loss`): a batch whose
    signal is noise has no high-loss tokens, where the quantile alone always selects its share."""
    if threshold is not None:
        return threshold
    return max(float(np.quantile(signal, 1.0 - quantile, method="higher")), floor) if signal.size else float("inf")


def high_loss_mask(signal: np.ndarray, quantile: float, threshold: float | None, floor: float = 0.0) -> np.ndarray:
    """Top-q fraction of the batch's tokens by `signal` (ties included) that are at least `floor`, or
    signal >= threshold."""
    return signal >= high_loss_cut(signal, quantile, threshold, floor)


def probe_positions(signal: Sequence[Sequence[float]], high: Sequence[np.ndarray], budget: int | str,
                    skip_last: bool) -> list[tuple[int, int]]:
    """(sequence, position) pairs to probe: per sequence, its `budget` high-loss positions with the highest signal
    (in position order), or every one with budget 'all'; with `skip_last`, never a sequence's last token (it has no
    near future)."""
    rows: list[tuple[int, int]] = []
    for i, mask in enumerate(high):
        cand = np.flatnonzero(mask).tolist()
        if skip_last:
            cand = [t for t in cand if t < len(mask) - 1]
        order = cand if budget == "all" else sorted(cand, key=lambda t: -signal[i][t])[:budget]
        rows += [(i, t) for t in sorted(order)]
    return rows


def window_divergence(signal: list[float], window: int) -> list[float]:
    """D_t = mean of the signal over the student's own next `window` tokens t+1..t+W (0 when none follow)."""
    s = np.asarray(signal, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(s)])
    n = len(s)
    out = np.zeros(n)
    for t in range(n):  # n is one sequence's length; the cumsum makes each value O(1)
        a, b = t + 1, min(n, t + 1 + window)
        out[t] = (c[b] - c[a]) / (b - a) if b > a else 0.0
    return out.tolist()


def token_weights(regimes: np.ndarray, pos: np.ndarray, weighting: TokenWeighting) -> np.ndarray:
    """Per-token weights from the regimes of the tokens of consecutive sequences (`pos`: each token's position in
    its sequence): `surface` -> surface_weight, else 1; then each `divergent` t adds spread_weight * spread_decay^j
    to the tokens t + j of its sequence, j = 0..spread_horizon (added in the order of t, as a loop would)."""
    w = np.where(regimes == "surface", weighting.surface_weight, 1.0)
    if weighting.spread_weight > 0:
        divergent = regimes == "divergent"
        for j in range(weighting.spread_horizon, -1, -1):  # a later j comes from an earlier t
            source = np.zeros_like(divergent)
            source[j:] = divergent[: len(divergent) - j]
            w += np.where(source & (pos >= j), weighting.spread_weight * weighting.spread_decay**j, 0.0)
    return w


def regime_of(high: bool, probed: bool, d: float | None, delta: float) -> str:
    if not high:
        return "normal"
    if not probed or d is None:
        return "unprobed"
    return "divergent" if d >= delta else "surface"


def regimes(high: np.ndarray, probed: np.ndarray, d: np.ndarray, delta: float) -> np.ndarray:
    """`regime_of` of every token at once (`d`: D_t where `probed`, anything elsewhere)."""
    with np.errstate(invalid="ignore"):
        divergent = d >= delta
    return np.where(~high, "normal", np.where(~probed, "unprobed", np.where(divergent, "divergent", "surface")))


def resolve_delta(cfg: AnalysisConfig, distances: list[float]) -> float:
    """The divergence threshold: `delta` itself (absolute), or that quantile of the batch's D_t (quantile), never
    below `min_delta` when it is set."""
    if cfg.delta_mode == "absolute":
        return cfg.delta
    if not 0.0 <= cfg.delta <= 1.0:
        raise ConfigError(f"analysis.delta must be in [0, 1] when analysis.delta_mode is 'quantile', got {cfg.delta}")
    if not distances:
        return float("inf")
    quantile = float(np.quantile(distances, cfg.delta))
    return quantile if cfg.min_delta is None else max(quantile, cfg.min_delta)


def classifier_scores(roles: list[str | None], regimes: list[str]) -> dict:
    """Precision/recall of `surface` and of `divergent` against the regime the ground-truth role should get
    (TRUE_REGIME: form, filler -> surface; reasoning, answer, fork -> divergent), over classified high-loss tokens
    (regime surface or divergent) whose role is known."""
    pairs = [(r, g) for r, g in zip(roles, regimes, strict=True) if r is not None and g in ("surface", "divergent")]
    out: dict = {"classified": len(pairs)}
    for regime in ("surface", "divergent"):
        tp = sum(1 for r, g in pairs if g == regime and TRUE_REGIME.get(r) == regime)
        pred = sum(1 for _, g in pairs if g == regime)
        actual = sum(1 for r, _ in pairs if TRUE_REGIME.get(r) == regime)
        out[f"{regime}_precision"] = tp / pred if pred else None
        out[f"{regime}_recall"] = tp / actual if actual else None
    return out
