"""The update's training loop, shared by the one-process update (opd_tasks/stages/update.py) and every rank of a
multi-process one (opd_tasks/training/distributed.py).

`Ranks` is where the two differ: one rank (the default) is the stage's own process and changes nothing; with N ranks
each optimizer step's micro-batches (the same permutation and the same split as on one rank) are dealt round-robin,
rank r taking micro-batches r, r+N, ...; a rank with fewer than the others runs one of the step's micro-batches with
its loss times 0 in the rounds it has none, so that every rank runs the same forwards and backwards (FSDP's
collectives). Each loss is divided by the token count of the whole step, the ranks' gradients are summed (not
averaged: see distributed.shard), so the step's gradient is the token-mean over all its tokens, as on one rank.
The logged figures are summed over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd_tasks.config import UpdateConfig
from opd_tasks.errors import DataError, TrainingError
from opd_tasks.training.sequences import ScoredSequence
from storage.hashing import sha256_json


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one update: rank `rank` of `size` (one: the stage itself)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    def sum(self, values: list[float]) -> list[float]:
        """`values` summed over the ranks (as they are on one rank)."""
        if self.size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def load_sequences(store, x) -> tuple[list[ScoredSequence], object]:
    """The update's scored sequences (with the analysis's weights and bridges) and the bridge it trains with."""
    from opd_tasks.training.sequences import attach_analysis, scored_sequences

    cfg = x.update
    bridge = x.bridge if x.analysis is not None else None
    seqs = scored_sequences(store, x.rollouts, x.scores,
                            ("topk_ids", "topk_logprobs") if cfg.loss == "topk_rkl" else ())
    if not seqs:
        raise DataError(f"rollouts {x.rollouts.short()} have no completion tokens to train on")
    if x.analysis is not None:
        attach_analysis(store, seqs, x.analysis, bridges=bridge is not None)
    return seqs, bridge


def recompute_old_logprobs(model, seqs: list[ScoredSequence], pad_token_id: int, cfg: UpdateConfig,
                           autocast) -> None:
    """Set every sequence's `trainer_logprobs`: the starting model's own log-probs (eval mode, no gradients), in
    batches of one step's size (how a step is split into micro-batches changes no value)."""
    from opd_tasks.training.logprobs import completion_logprobs

    recomputed = completion_logprobs(model.eval(), [s.prompt for s in seqs], [s.tokens for s in seqs],
                                     pad_token_id=pad_token_id, batch_size=cfg.micro_batch_size * cfg.grad_accumulation,
                                     autocast=autocast)
    for s, lps in zip(seqs, recomputed, strict=True):
        s.trainer_logprobs = lps


def train_steps(loss_fn: Callable[[list[ScoredSequence]], tuple[torch.Tensor, dict[str, float]]], params: list,
                opt: torch.optim.Optimizer, seqs: list[ScoredSequence], trainer: dict, cfg: UpdateConfig, seed: int,
                with_bridge: bool, parent_sha: str, autocast, bar, ranks: Ranks = Ranks()) -> list[dict]:
    """Every optimizer step of `cfg.epochs` epochs over `seqs`; the `updates` rows. `loss_fn(batch)` is
    `micro_batch_loss` of the model on a micro-batch; `trainer` (global step/epoch) is advanced in place."""
    per_step = cfg.micro_batch_size * cfg.grad_accumulation
    rows = []
    for _ in range(cfg.epochs):
        order = seed if cfg.order_seed is None else cfg.order_seed
        g = torch.Generator().manual_seed(int(sha256_json([order, trainer["global_epoch"]])[:15], 16))
        perm = torch.randperm(len(seqs), generator=g).tolist()
        for s0 in range(0, len(perm), per_step):
            step_seqs = [seqs[i] for i in perm[s0 : s0 + per_step]]
            n_tok = sum(len(s.tokens) for s in step_seqs)
            micro = [step_seqs[m0 : m0 + cfg.micro_batch_size] for m0 in range(0, len(step_seqs), cfg.micro_batch_size)]
            total, kl, weighted, main, bridge_sum = 0.0, 0.0, 0.0, 0.0, 0.0
            for r in range(-(-len(micro) // ranks.size)):  # rounds: every rank runs as many as the busiest
                j = r * ranks.size + ranks.rank
                mine = j < len(micro)
                with autocast:
                    loss, st = loss_fn(micro[j] if mine else micro[0])
                loss = loss / n_tok
                if not mine:  # in step with the other ranks' collectives; no gradient, no figures
                    (loss * 0.0).backward()
                    continue
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"update step {trainer['global_step']}: loss is {loss.item()} (not finite); "
                        f"nothing was saved, the previous checkpoint {parent_sha[:12]} stays the latest"
                    )
                loss.backward()
                total += loss.item()
                kl += st["kl"]
                weighted += st["weighted"]
                main += st["main"] / n_tok
                bridge_sum += st["bridge"] / n_tok
            total, kl, weighted, main, bridge_sum = ranks.sum([total, kl, weighted, main, bridge_sum])
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if hasattr(gnorm, "full_tensor"):  # a DTensor under FSDP: the global norm, replicated
                gnorm = gnorm.full_tensor()
            if not torch.isfinite(gnorm):
                raise TrainingError(f"update step {trainer['global_step']}: gradient norm is {gnorm.item()}; "
                                    "nothing was saved, the previous checkpoint stays the latest")
            opt.step()
            opt.zero_grad(set_to_none=True)
            rows.append({"step": trainer["global_step"], "loss": total, "distill_loss": main,
                         "bridge_loss": bridge_sum if with_bridge else None, "kl": kl / n_tok,
                         "grad_norm": float(gnorm), "lr": cfg.learning_rate, "tokens_trained": n_tok,
                         "weighted_tokens": weighted})
            trainer["global_step"] += 1
            bar.update(1)
            bar.note(loss=f"{total:.4f}", kl=f"{kl / n_tok:.3f}")
        trainer["global_epoch"] += 1
    bar.close()
    return rows
