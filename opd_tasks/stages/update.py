"""Stage 4, `update`: train the student on its own rollouts with the OPD loss; publish a checkpoint.

The checkpoint artifact holds the student (`model/`), its optimizer and RNG state (`state/`; the format is in
opd_tasks/training/checkpoint.py) and the `updates` table, one row per optimizer step. Nothing in it depends on
wall time (stage seconds live in the run lineage), so the same inputs give the same bytes: a recovered run is
byte-identical to one that never failed.

Per-token weights come from the analysis's `tokens` table when there is an analysis, else 1; with the method's
bridge, the teacher's continuations at divergent positions come from its `probes` table. The loss of an
optimizer step is the token-mean over all completion tokens in that step (micro-batches and gradient
accumulation do not change it). A NaN/inf loss or gradient raises `TrainingError` before the optimizer step and
nothing is published, so the previous checkpoint stays the latest.
"""

from __future__ import annotations

from opd_tasks.config import UpdateConfig
from opd_tasks.errors import ConfigError, DataError, TrainingError
from opd_tasks.method import Bridge, Return
from opd_tasks.models import ModelSpec
from opd_tasks.stages.registry import StageContext, StageInputs, stage
from storage.hashing import sha256_json
from storage.refs import ArtifactRef


class UpdateInputs(StageInputs):
    """One update of `student` on its `rollouts` and the teacher's `scores`; `analysis` (token weights, bridges) or
    None for weight 1 everywhere; `bridge` from the method; `teacher` is read only by `update.loss: full_rkl`."""

    student: ModelSpec
    rollouts: ArtifactRef
    scores: ArtifactRef
    analysis: ArtifactRef | None
    teacher: ModelSpec
    update: UpdateConfig
    bridge: Bridge | None
    advantage: Return | None = None  # the opd_return baseline's discounted return; None: -k1_t
    seed: int

    def key_parts(self):
        """the teacher only with `update.loss: full_rkl`, the one loss that reads the teacher model itself."""
        artifacts, config, seed = super().key_parts()
        if self.update.loss != "full_rkl":
            artifacts["teacher"] = None
        return artifacts, config, seed


@stage("update", version=3, inputs=UpdateInputs, outputs=("updates", "checkpoint"))
def update(ctx: StageContext, x: UpdateInputs) -> ArtifactRef:
    """One distillation update of the student: a checkpoint and the per-step losses.

    Runs inside a forked RNG seeded from the seed (or restored from the parent checkpoint), so the result, saved
    RNG state included, depends only on the inputs, not on what the process did before."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(sha256_json(["update-rng", x.seed])[:15], 16))
        return _train(ctx, x)


def _train(ctx: StageContext, x: UpdateInputs) -> ArtifactRef:
    import pyarrow as pa
    import torch
    from tqdm.auto import tqdm

    from opd_tasks.backends.hf import load_causal_lm, load_tokenizer, resolve_device
    from opd_tasks.training.checkpoint import load_training_state, save_checkpoint
    from opd_tasks.training.objective import micro_batch_loss
    from opd_tasks.training.sequences import attach_analysis, scored_sequences

    cfg, student, teacher, seed = x.update, x.student, x.teacher, x.seed
    if x.advantage is not None and cfg.loss != "pg":
        raise ConfigError(f"the opd_return baseline's discounted return is a policy-gradient advantage: it needs "
                          f"update.loss: pg, not {cfg.loss!r}")
    dev = resolve_device(ctx.device)
    bridge = x.bridge if x.analysis is not None else None
    seqs = scored_sequences(ctx.store, x.rollouts, x.scores,
                            ("topk_ids", "topk_logprobs") if cfg.loss == "topk_rkl" else ())
    if not seqs:
        raise DataError(f"rollouts {x.rollouts.short()} have no completion tokens to train on")
    if x.analysis is not None:
        attach_analysis(ctx.store, seqs, x.analysis, bridges=bridge is not None)
    tok = load_tokenizer(student.path, student.trust_remote_code)
    model = load_causal_lm(student.path, dev, "float32", student.trust_remote_code).train()
    t_model = load_causal_lm(teacher.path, dev, teacher.dtype, teacher.trust_remote_code) if (
        cfg.loss == "full_rkl") else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    trainer = load_training_state(student, opt, cfg)

    per_step = cfg.micro_batch_size * cfg.grad_accumulation
    n_steps = cfg.epochs * ((len(seqs) + per_step - 1) // per_step)
    autocast = torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.bf16 and dev.type == "cuda")
    rows = []
    bar = tqdm(total=n_steps, desc="update", unit="step", disable=not ctx.progress, leave=False)
    for _ in range(cfg.epochs):
        order = seed if cfg.order_seed is None else cfg.order_seed
        g = torch.Generator().manual_seed(int(sha256_json([order, trainer["global_epoch"]])[:15], 16))
        perm = torch.randperm(len(seqs), generator=g).tolist()
        for s0 in range(0, len(perm), per_step):
            step_seqs = [seqs[i] for i in perm[s0 : s0 + per_step]]
            n_tok = sum(len(s.tokens) for s in step_seqs)
            total, kl, weighted, main, bridge_sum = 0.0, 0.0, 0.0, 0.0, 0.0
            for m0 in range(0, len(step_seqs), cfg.micro_batch_size):
                with autocast:
                    loss, st = micro_batch_loss(model, step_seqs[m0 : m0 + cfg.micro_batch_size], cfg, bridge,
                                                tok.pad_token_id, dev, t_model, x.advantage)
                loss = loss / n_tok
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"update step {trainer['global_step']}: loss is {loss.item()} (not finite); "
                        f"nothing was saved, the previous checkpoint {student.sha256[:12]} stays the latest"
                    )
                loss.backward()
                total += loss.item()
                kl += st["kl"]
                weighted += st["weighted"]
                main += st["main"] / n_tok
                bridge_sum += st["bridge"] / n_tok
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(gnorm):
                raise TrainingError(f"update step {trainer['global_step']}: gradient norm is {gnorm.item()}; "
                                    "nothing was saved, the previous checkpoint stays the latest")
            opt.step()
            opt.zero_grad(set_to_none=True)
            rows.append({"step": trainer["global_step"], "loss": total, "pg_loss": main,
                         "bridge_loss": bridge_sum if bridge is not None else None, "kl": kl / n_tok,
                         "grad_norm": float(gnorm), "lr": cfg.learning_rate, "tokens_trained": n_tok,
                         "weighted_tokens": weighted})
            trainer["global_step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", kl=f"{kl / n_tok:.3f}")
        trainer["global_epoch"] += 1
    bar.close()

    model.eval()
    with ctx.writer() as w:
        save_checkpoint(w.path, model, tok, student.dir, opt, trainer, seed)
        w.write_table("updates", pa.Table.from_pylist(rows))
        w.meta.update({"steps": len(rows), "sequences": len(seqs), "parent": student.sha256,
                       "mean_loss": sum(r["loss"] for r in rows) / len(rows)})
        return w.commit()
