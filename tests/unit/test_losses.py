"""The OPD losses against explicit per-token loops (float64), values and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opd_tasks.training.losses import bridge_nll, full_rkl, pg_loss, topk_rkl, topk_rkl_per_token

B, T, V = 3, 5, 11


def _rand(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    weight = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    return g, logits, mask, weight


def _log_softmax_list(xs: list[float]) -> list[float]:
    m = max(xs)
    lse = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - lse for x in xs]


def test_pg_loss_matches_loop_and_gradient() -> None:
    g, logits, mask, weight = _rand(0)
    targets = torch.randint(0, V, (B, T), generator=g)
    logp_old = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(
        -1, targets[..., None]).squeeze(-1)
    logp_t = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3

    x = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(x, -1).gather(-1, targets[..., None]).squeeze(-1)
    ours = pg_loss(logp, logp_old, logp_t, weight, mask)
    ours.backward()

    # Reference: an explicit loop over tokens with plain floats, gradient by hand:
    # d/dlogits of -w * exp(lp - lp_old) * A = -w * A * ratio * (onehot - softmax).
    ref = 0.0
    grad = np.zeros((B, T, V))
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            lps = _log_softmax_list(logits[b, t].tolist())
            lp = lps[int(targets[b, t])]
            adv = -(float(logp_old[b, t]) - float(logp_t[b, t]))
            ratio = math.exp(lp - float(logp_old[b, t]))
            ref += -float(weight[b, t]) * ratio * adv
            for v in range(V):
                onehot = 1.0 if v == int(targets[b, t]) else 0.0
                grad[b, t, v] = -float(weight[b, t]) * adv * ratio * (onehot - math.exp(lps[v]))
    assert ours.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), grad, rtol=1e-9, atol=1e-12)


def test_ppo_clipped_pg_loss_matches_loop_and_gradient() -> None:
    """The default update loss: `clip_ratio` 0.2. Per token, -w * min(r A, clip(r, 0.8, 1.2) A); where the clipped
    term is the smaller one and r is outside [0.8, 1.2] the token passes no gradient, elsewhere the gradient is
    the unclipped one. The case covers tokens on both sides of the clip range with both signs of the advantage."""
    eps = 0.2
    g, logits, mask, weight = _rand(1)
    targets = torch.randint(0, V, (B, T), generator=g)
    logp_now = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    logp_old = logp_now + torch.tensor([[-0.5, 0.5, -0.05, 0.05, 0.3], [0.4, -0.4, 0.1, 0.0, -0.1],
                                        [0.6, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # ratios 0.55 .. 1.65
    logp_t = logp_old + torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 0.5, -0.5],
                                      [-2.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # A = logp_t - logp_old

    x = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(x, -1).gather(-1, targets[..., None]).squeeze(-1)
    ours = pg_loss(logp, logp_old, logp_t, weight, mask, clip=eps)
    ours.backward()

    ref, grad, kinds = 0.0, np.zeros((B, T, V)), set()
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0:
                continue
            lps = _log_softmax_list(logits[b, t].tolist())
            lp, old = lps[int(targets[b, t])], float(logp_old[b, t])
            adv = float(logp_t[b, t]) - old
            ratio = math.exp(lp - old)
            unclipped, clipped = ratio * adv, min(max(ratio, 1 - eps), 1 + eps) * adv
            ref += -float(weight[b, t]) * min(unclipped, clipped)
            passes = unclipped <= clipped or 1 - eps < ratio < 1 + eps
            kinds.add((passes, adv > 0))
            if passes:
                for v in range(V):
                    onehot = 1.0 if v == int(targets[b, t]) else 0.0
                    grad[b, t, v] = -float(weight[b, t]) * adv * ratio * (onehot - math.exp(lps[v]))
    assert kinds == {(True, True), (True, False), (False, True), (False, False)}
    assert ours.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), grad, rtol=1e-9, atol=1e-12)


def _topk_ref(student_logits, ids, teacher_lp) -> float:
    s = _log_softmax_list([student_logits[i] for i in ids])
    q = _log_softmax_list(list(teacher_lp))
    return sum(math.exp(a) * (a - b) for a, b in zip(s, q, strict=True))


@pytest.mark.parametrize("k", [1, 4, V])
def test_topk_rkl_matches_loop(k: int) -> None:
    g, logits, mask, weight = _rand(1)
    teacher_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tlp_full = torch.log_softmax(teacher_logits, -1)
    top_lp, top_id = tlp_full.topk(k, -1)
    x = logits.clone().requires_grad_(True)
    ours = topk_rkl(x, top_id, top_lp, weight, mask)
    ours.backward()
    ref = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                ref += float(weight[b, t]) * _topk_ref(logits[b, t].tolist(), top_id[b, t].tolist(),
                                                       top_lp[b, t].tolist())
    assert ours.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # Gradient against autograd of a float64 per-token loop reference.
    y = logits.clone().requires_grad_(True)
    ref_t = sum(
        weight[b, t] * (lambda s, q: (s.exp() * (s - q)).sum())(
            torch.log_softmax(y[b, t][top_id[b, t]], -1), torch.log_softmax(top_lp[b, t], -1))
        for b in range(B) for t in range(T) if mask[b, t]
    )
    ref_t.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)
    if k == 1:  # both renormalise to a point mass on the same token: zero loss, zero gradient
        assert ours.item() == pytest.approx(0.0, abs=1e-12)
        assert x.grad.abs().max().item() < 1e-12
    if k == V:  # the full support: equals the full-vocabulary reverse KL
        full = full_rkl(logits, teacher_logits, weight, mask)
        assert ours.item() == pytest.approx(full.item(), rel=1e-9)


def test_topk_renormalisation_ignores_teacher_mass_outside_support() -> None:
    # Teacher top-2 log-probs that do not sum to 1 are renormalised: [log .3, log .1] -> [.75, .25].
    s_logits = torch.tensor([[[0.0, math.log(3.0), 5.0]]], dtype=torch.float64)  # student p on {0,1}: .25/.75
    ids = torch.tensor([[[1, 0]]])
    t_lp = torch.tensor([[[math.log(0.3), math.log(0.1)]]], dtype=torch.float64)
    got = topk_rkl_per_token(s_logits, ids, t_lp).item()
    expected = 0.75 * math.log(0.75 / 0.75) + 0.25 * math.log(0.25 / 0.25)
    assert got == pytest.approx(expected, abs=1e-12)
    t_lp2 = torch.tensor([[[math.log(0.5), math.log(0.5)]]], dtype=torch.float64)
    got2 = topk_rkl_per_token(s_logits, ids, t_lp2).item()
    assert got2 == pytest.approx(0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5), abs=1e-12)


def test_full_rkl_matches_loop() -> None:
    g, logits, mask, weight = _rand(2)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ours = full_rkl(logits, teacher, weight, mask).item()
    ref = 0.0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                s = _log_softmax_list(logits[b, t].tolist())
                q = _log_softmax_list(teacher[b, t].tolist())
                ref += float(weight[b, t]) * sum(math.exp(a) * (a - c) for a, c in zip(s, q, strict=True))
    assert ours == pytest.approx(ref, rel=1e-10)


def test_bridge_nll_matches_loop() -> None:
    logp = -torch.rand(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    got = bridge_nll(logp, 0.5, mask).item()
    ref = -sum(0.5**j * float(logp[b, j]) for b in range(2) for j in range(4) if mask[b, j])
    assert got == pytest.approx(ref, rel=1e-12)


def test_discounted_return_matches_loop() -> None:
    """opd_return's advantage: A_t = -sum_{j=0..H} gamma^j k1_{t+j} over the same sequence's real tokens."""
    from opd_tasks.training.losses import discounted_return

    g, _, mask, _ = _rand(3)
    k1 = torch.randn(B, T, generator=g, dtype=torch.float64)
    for horizon, gamma in ((0, 0.8), (2, 0.5), (10, 0.9)):
        got = discounted_return(k1, mask, horizon, gamma)
        for b in range(B):
            for t in range(T):
                ref = -sum(gamma**j * float(k1[b, t + j]) * float(mask[b, t + j])
                           for j in range(horizon + 1) if t + j < T)
                assert float(got[b, t]) == pytest.approx(ref, abs=1e-12)
    # with H = 0 the policy gradient equals the plain one
    targets = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).gather(
        -1, targets[..., None]).squeeze(-1)
    old, teacher, w = logp + 0.1, logp - 0.3, torch.ones(B, T, dtype=torch.float64)
    plain = pg_loss(logp, old, teacher, w, mask, 0.2)
    assert float(pg_loss(logp, old, teacher, w, mask, 0.2, discounted_return(old - teacher, mask, 0, 0.8))) == \
        pytest.approx(float(plain), abs=1e-12)
