"""One micro-batch of the update's objective: the weighted OPD loss of section 5 of DESIGN.md over a list of
scored sequences, plus TOPD's bridge loss (opd_tasks/training/losses.py has the per-token formulas)."""

from __future__ import annotations

import torch

from opd_tasks.config import UpdateConfig
from opd_tasks.method import Bridge, Return
from opd_tasks.training.losses import bridge_nll, discounted_return, full_rkl, pg_loss, topk_rkl
from opd_tasks.training.sequences import ScoredSequence


def _pad(rows: list[list], t: int, fill, dtype) -> torch.Tensor:
    out = torch.full((len(rows), t), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def _pad3(rows: list[list[list]], t: int, k: int, dtype) -> torch.Tensor:
    out = torch.zeros((len(rows), t, k), dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


def micro_batch_loss(model, batch: list[ScoredSequence], cfg: UpdateConfig, bridge: Bridge | None, pad_id: int,
                     device: torch.device, teacher=None,
                     advantage: Return | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over the batch's tokens of the weighted per-token loss (not yet divided by the step's tokens).

    The old log-probs (the ratio's denominator and the k1 of the advantage) are those `cfg.old_logprobs` names:
    the trainer's recomputation (default) or the sampler's.

    With `advantage` (the `opd_return` baseline, `loss: pg` only) the policy gradient's advantage is the discounted
    near-future return of k1 instead of -k1_t.

    Token weights are the sequences' `weights` (1 where None). With `bridge`, the bridge loss continues from the
    same forward: each divergent prefix's keys/values are gathered from it (`PrefixCache`), so only the teacher's
    continuation tokens go through the model again, and the gradient flows back through the prefix states exactly
    as if prefix + continuation had been encoded anew."""
    from opd_tasks.backends.hf import completion_logits, pack_right
    from opd_tasks.backends.prefix_cache import PrefixCache, encode, output_logits

    ids, attn, pred, cmask = pack_right([s.prompt for s in batch], [s.tokens for s in batch], pad_id)
    t = pred.shape[1]
    ids, attn, mask = ids.to(device), attn.to(device), cmask.to(device).float()
    targets = _pad([s.tokens for s in batch], t, 0, torch.long).to(device)
    weight = _pad([s.weights if s.weights is not None else [1.0] * len(s.tokens) for s in batch], t, 0.0,
                  torch.float32).to(device)
    logp_old = _pad([s.old_logprobs(cfg.old_logprobs) for s in batch], t, 0.0, torch.float32).to(device)
    logp_t = _pad([s.teacher_logprobs for s in batch], t, 0.0, torch.float32).to(device)
    bridges = [(b, len(s.prompt) + pos, cont) for b, s in enumerate(batch) for pos, cont in s.bridges
               ] if bridge is not None else []
    # The decoder, then the output head at the completion positions only (no logits over the prompt); with bridges
    # the forward keeps its KV cache for them.
    enc = encode(model, ids, attn, {b: b for b in range(len(batch))}, use_cache=bool(bridges))
    logits = output_logits(model, enc.hidden.gather(1, pred.to(device)[:, :, None].expand(
        -1, -1, enc.hidden.shape[-1])))
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, :, None]).squeeze(-1)
    if cfg.loss == "pg":
        adv = None if advantage is None else discounted_return(logp_old - logp_t, mask, advantage.horizon,
                                                               advantage.decay)
        loss = pg_loss(logp, logp_old, logp_t, weight, mask, cfg.clip_ratio, adv)
    elif cfg.loss == "topk_rkl":
        k = len(batch[0].topk_ids[0])
        tid = _pad3([s.topk_ids for s in batch], t, k, torch.long).to(device)
        tlp = _pad3([s.topk_logprobs for s in batch], t, k, torch.float32).to(device)
        loss = topk_rkl(logits, tid, tlp, weight, mask)
    else:  # the teacher reads its own prompt (its context + the student's), then the same completion tokens
        t_ids, t_attn, t_pred, _ = pack_right([s.teacher_input for s in batch], [s.tokens for s in batch], pad_id)
        with torch.no_grad():
            t_logits = completion_logits(teacher, t_ids.to(device), t_attn.to(device), t_pred)
        loss = full_rkl(logits, t_logits, weight, mask)
    stats = {"kl": float(((logp_old - logp_t) * mask).sum()), "weighted": float((weight * mask).sum()),
             "main": float(loss.detach()), "bridge": 0.0}
    if bridges:
        seqs = [s.prompt + s.tokens for s in batch]
        pre = PrefixCache(model, seqs, [(b, n) for b, n, _ in bridges], pad_id, enc)
        b_logp, b_mask = pre.logprobs([c for _, _, c in bridges])
        bl = bridge_nll(b_logp, bridge.decay, b_mask)
        stats["bridge"] = float(bl.detach())
        loss = loss + bridge.weight * bl
    return loss, stats
