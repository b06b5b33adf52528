"""The OPD losses (DESIGN.md section 5), as pure functions of padded [B, T] tensors.

Every loss returns the SUM over tokens of `weight * per-token loss`; the caller divides by the number of
completion tokens in the optimizer step (token-mean), so micro-batching and gradient accumulation never
change the result. `mask` is 1 on real completion tokens, 0 on padding.

- `pg_loss`: the tinker-cookbook / verl policy-gradient form. Advantage `A_t = -(log pi_old - log pi_T)`
  (detached: the old log-prob minus the teacher's, i.e. minus the per-token reverse-KL estimate k1),
  importance-sampled: `-w_t * exp(log pi_S - log pi_old) * A_t`. `pi_old` is the trainer's recomputation of
  the sampled tokens' log-probs, or the sampler's own (`update.old_logprobs`, opd_tasks/stages/update.py).
- `topk_rkl`: supervised reverse KL on the teacher's top-k support, both distributions renormalised to it:
  `sum_i p_S(i) (log p_S(i) - log q_T(i))`.
- `full_rkl`: reverse KL over the full vocabulary, when the teacher's logits are at hand.
- `bridge_nll`: TOPD's near-future guidance, `-sum_j gamma^j log pi_S(c_j | prefix, c_<j)`.
- `discounted_return`: the `opd_return` baseline's advantage, `-sum_{j<=H} gamma^j k1_{t+j}` within a sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def pg_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    logp_teacher: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = None,
    advantage: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over tokens of `-w * exp(logp - logp_old) * A`, A = -(logp_old - logp_teacher) detached (or the given
    `advantage`, e.g. a discounted return).

    With `clip` (PPO's epsilon), the per-token term is `-w * min(r * A, clip(r, 1 - eps, 1 + eps) * A)`:
    once the policy has moved a token's probability by more than the clip range in the direction the
    advantage wants, that token stops pushing (what verl does; the plain form is tinker-cookbook's).
    """
    adv = (-(logp_old - logp_teacher) if advantage is None else advantage).detach()
    ratio = torch.exp(logp - logp_old.detach())
    term = ratio * adv
    if clip is not None:
        term = torch.minimum(term, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv)
    return -(weight * term * mask).sum()


def topk_rkl_per_token(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> torch.Tensor:
    """Reverse KL [B, T] restricted to the teacher's top-k support (ids [B, T, K]), renormalised."""
    s = F.log_softmax(_up(student_logits.gather(-1, topk_ids)), dim=-1)
    q = F.log_softmax(_up(topk_logprobs), dim=-1)
    return (s.exp() * (s - q)).sum(-1)


def topk_rkl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    return (topk_rkl_per_token(student_logits, topk_ids, topk_logprobs) * weight * mask).sum()


def full_rkl_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    s = F.log_softmax(_up(student_logits), dim=-1)
    q = F.log_softmax(_up(teacher_logits), dim=-1)
    return (s.exp() * (s - q)).sum(-1)


def full_rkl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    return (full_rkl_per_token(student_logits, teacher_logits.detach()) * weight * mask).sum()


def bridge_nll(logp: torch.Tensor, gamma: float, mask: torch.Tensor) -> torch.Tensor:
    """Sum over bridges of `-sum_j gamma^j logp[b, j]` (logp of the teacher's continuation tokens)."""
    j = torch.arange(logp.shape[-1], device=logp.device, dtype=logp.dtype)
    return -(gamma**j * logp * mask).sum()


def discounted_return(k1: torch.Tensor, mask: torch.Tensor, horizon: int, gamma: float) -> torch.Tensor:
    """A [B, T]: `-sum_{j=0..horizon} gamma^j k1[:, t+j] mask[:, t+j]`: the negated per-token divergence of the
    next `horizon` tokens of the same sequence, discounted (padding contributes nothing)."""
    masked = k1 * mask
    out = torch.zeros_like(masked)
    for j in range(horizon + 1):
        if j >= masked.shape[1]:
            break
        out[:, : masked.shape[1] - j] += gamma**j * masked[:, j:]
    return -out
