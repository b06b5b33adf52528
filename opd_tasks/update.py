"""Stage 4, `update`: train the student on its own rollouts with the OPD loss; publish a checkpoint.

The checkpoint artifact holds
```
model/                   save_pretrained (safetensors) + tokenizer: loadable by AutoModelForCausalLM / vLLM
state/optimizer.safetensors  AdamW moments and step counts (tensors only, no pickle)
state/trainer.json       global step/epoch counters, optimizer param groups, RNG state (as a list)
updates/part-*.parquet   one row per optimizer step (the `updates` table)
```
Nothing in it depends on wall time (stage seconds live in the run lineage), so the same inputs give the same
bytes: a recovered run is byte-identical to one that never failed.
A later update that starts from this checkpoint restores the optimizer and RNG state, so two chained
updates equal one uninterrupted update over the same data (tested).

Per-token weights come from the `tokens` table of the analysis stage (`weight` column) when given, else 1.
The loss of an optimizer step is the token-mean over all completion tokens in that step (micro-batches
and gradient accumulation do not change it). A NaN/inf loss or gradient raises `TrainingError` before the
optimizer step and nothing is published, so the previous checkpoint stays the latest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from opd_tasks.common import (
    CHECKPOINT_MODEL_DIR,
    CHECKPOINT_STATE_DIR,
    STAGE_VERSIONS,
    ModelSpec,
    group_tokens,
    scored_rollouts,
)
from opd_tasks.config import UpdateConfig
from opd_tasks.errors import ConfigError, DataError, TrainingError
from opd_tasks.losses import bridge_nll, full_rkl, pg_loss, topk_rkl
from storage.hashing import sha256_json
from storage.keys import cache_key
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


@dataclass
class Sequence:
    prompt: list[int]
    tokens: list[int]
    logp_old: list[float]
    logp_teacher: list[float]
    weight: list[float]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    bridges: list[tuple[int, list[int]]] = field(default_factory=list)  # (completion position, teacher continuation)


def update_key(student: ModelSpec, rollouts: ArtifactRef, scores: ArtifactRef, weights: ArtifactRef | None,
               teacher: ModelSpec | None, cfg: UpdateConfig, seed: int) -> str:
    inputs = {"student": student.sha256, "rollouts": rollouts, "scores": scores, "weights": weights,
              "teacher": teacher.sha256 if (teacher is not None and cfg.loss == "full_rkl") else None}
    return cache_key("update", STAGE_VERSIONS["update"], inputs, cfg.model_dump(mode="json"), seed)


def load_sequences(store: ArtifactStore, rollouts: ArtifactRef, scores: ArtifactRef, weights: ArtifactRef | None,
                   need_topk: bool, bridges: bool = False) -> list[Sequence]:
    """Per rollout: tokens, sampling and teacher log-probs, weights (from the analysis' `tokens` table, else 1),
    and with `bridges` the teacher continuations probed at its `divergent` positions."""
    wt = None
    div: dict[tuple[str, int], list[tuple[int, list[int]]]] = {}
    if weights is not None:
        tk = store.read_table(weights, "tokens", columns=["prompt_id", "sample_id", "pos", "weight", "regime"])
        wt = group_tokens(tk, ["weight"])
    if bridges and weights is not None:
        divergent = {(a, b, c) for a, b, c, r in zip(*(tk.column(x).to_pylist() for x in
                                                       ("prompt_id", "sample_id", "pos", "regime")), strict=True)
                     if r == "divergent"}
        pr = store.read_table(weights, "probes", columns=["prompt_id", "sample_id", "pos", "teacher_continuation"])
        for a, b, c, cont in zip(*(pr.column(x).to_pylist() for x in
                                   ("prompt_id", "sample_id", "pos", "teacher_continuation")), strict=True):
            if (a, b, c) in divergent and cont:
                div.setdefault((a, b), []).append((c, cont))
    seqs = []
    cols = ["teacher_logprob"] + (["topk_ids", "topk_logprobs"] if need_topk else [])
    for pid, sid, p, toks, lps, s in scored_rollouts(store, rollouts, scores, cols):
        w = [1.0] * len(toks)
        if wt is not None:
            got = wt.get((pid, sid))
            if got is None or len(got["weight"]) != len(toks):
                raise DataError(f"token weights do not cover rollout ({pid!r}, {sid})")
            w = got["weight"]
        br = sorted(div.get((pid, sid), []))
        seqs.append(Sequence(p, toks, lps, s["teacher_logprob"], w,
                             s.get("topk_ids"), s.get("topk_logprobs"), br))
    if not seqs:
        raise DataError(f"rollouts {rollouts.short()} have no completion tokens to train on")
    return seqs


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


def micro_batch_loss(model, batch: list[Sequence], cfg: UpdateConfig, pad_id: int, device: torch.device,
                     teacher=None) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over the batch's tokens of the weighted per-token loss (not yet divided by the step's tokens).

    The bridge loss continues from the same forward: each divergent prefix's keys/values are gathered from it
    (`hf._Prefixes`), so only the teacher's continuation tokens go through the model again, and the gradient
    flows back through the prefix states exactly as if prefix + continuation had been encoded anew."""
    from opd_tasks.hf import _head, _Prefixes, completion_logits, encode, pack_right

    ids, attn, pred, cmask = pack_right([s.prompt for s in batch], [s.tokens for s in batch], pad_id)
    t = pred.shape[1]
    ids, attn, mask = ids.to(device), attn.to(device), cmask.to(device).float()
    targets = _pad([s.tokens for s in batch], t, 0, torch.long).to(device)
    weight = _pad([s.weight for s in batch], t, 0.0, torch.float32).to(device)
    logp_old = _pad([s.logp_old for s in batch], t, 0.0, torch.float32).to(device)
    logp_t = _pad([s.logp_teacher for s in batch], t, 0.0, torch.float32).to(device)
    bridges = [(b, len(s.prompt) + pos, cont) for b, s in enumerate(batch) for pos, cont in s.bridges
               ] if cfg.beta > 0 else []
    enc = None
    if bridges:
        enc = encode(model, ids, attn, {b: b for b in range(len(batch))})
        logits = _head(model, enc.hidden.gather(1, pred.to(device)[:, :, None].expand(-1, -1, enc.hidden.shape[-1])))
    else:
        logits = completion_logits(model, ids, attn, pred)
    logp = torch.log_softmax(logits, -1).gather(-1, targets[:, :, None]).squeeze(-1)
    if cfg.loss == "pg":
        loss = pg_loss(logp, logp_old, logp_t, weight, mask, cfg.clip_ratio)
    elif cfg.loss == "topk_rkl":
        k = len(batch[0].topk_ids[0])
        tid = _pad3([s.topk_ids for s in batch], t, k, torch.long).to(device)
        tlp = _pad3([s.topk_logprobs for s in batch], t, k, torch.float32).to(device)
        loss = topk_rkl(logits, tid, tlp, weight, mask)
    else:
        with torch.no_grad():
            t_logits = completion_logits(teacher, ids, attn, pred)
        loss = full_rkl(logits, t_logits, weight, mask)
    stats = {"kl": float(((logp_old - logp_t) * mask).sum()), "weighted": float((weight * mask).sum()),
             "main": float(loss.detach()), "bridge": 0.0}
    if bridges:
        seqs = [s.prompt + s.tokens for s in batch]
        pre = _Prefixes(model, seqs, [(b, n) for b, n, _ in bridges], pad_id, enc)
        b_logp, b_mask = pre.logprobs([c for _, _, c in bridges])
        bl = bridge_nll(b_logp, cfg.gamma, b_mask)
        stats["bridge"] = float(bl.detach())
        loss = loss + cfg.beta * bl
    return loss, stats


def _save_optimizer(opt: torch.optim.Optimizer, path) -> dict:
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"{idx}.{name}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    save_file(tensors, str(path))
    return {"param_groups": sd["param_groups"]}


def _load_optimizer(opt: torch.optim.Optimizer, path, groups: list[dict], cfg: UpdateConfig) -> None:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    state: dict[int, dict] = {}
    for k, v in flat.items():
        idx, name = k.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": groups})
    for g in opt.param_groups:  # the config of this update wins over the saved hyperparameters
        g["lr"], g["weight_decay"] = cfg.learning_rate, cfg.weight_decay


def update(
    store: ArtifactStore,
    student: ModelSpec,
    rollouts: ArtifactRef,
    scores: ArtifactRef,
    cfg: UpdateConfig,
    seed: int,
    weights: ArtifactRef | None = None,
    teacher: ModelSpec | None = None,
    device: str = "auto",
    progress: bool = True,
) -> ArtifactRef:
    """One distillation update of `student`; returns the new checkpoint artifact.

    Runs inside a forked RNG seeded from `seed` (or restored from the parent checkpoint), so the result,
    saved RNG state included, depends only on the inputs, not on what the process did before.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(sha256_json(["update-rng", seed])[:15], 16))
        return _update(store, student, rollouts, scores, cfg, seed, weights, teacher, device, progress)


def _update(
    store: ArtifactStore,
    student: ModelSpec,
    rollouts: ArtifactRef,
    scores: ArtifactRef,
    cfg: UpdateConfig,
    seed: int,
    weights: ArtifactRef | None = None,
    teacher: ModelSpec | None = None,
    device: str = "auto",
    progress: bool = True,
) -> ArtifactRef:
    key = update_key(student, rollouts, scores, weights, teacher, cfg, seed)
    if (ref := store.lookup("update", key)) is not None:
        return ref
    if cfg.loss == "full_rkl" and teacher is None:
        raise ConfigError("update.loss: 'full_rkl' needs the teacher model (pass teacher=...)")
    from opd_tasks.hf import load_causal_lm, load_tokenizer, resolve_device

    dev = resolve_device(device)
    use_bridges = weights is not None and store.manifest(weights)["meta"].get("method") == "topd" and cfg.beta > 0
    seqs = load_sequences(store, rollouts, scores, weights, need_topk=cfg.loss == "topk_rkl", bridges=use_bridges)
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
    bar = tqdm(total=n_steps, desc="update", unit="step", disable=not progress, leave=False)
    for _ in range(cfg.epochs):
        g = torch.Generator().manual_seed(int(sha256_json([seed, trainer["global_epoch"]])[:15], 16))
        perm = torch.randperm(len(seqs), generator=g).tolist()
        for s0 in range(0, len(perm), per_step):
            step_seqs = [seqs[i] for i in perm[s0 : s0 + per_step]]
            n_tok = sum(len(s.tokens) for s in step_seqs)
            total, kl, weighted, main, bridge = 0.0, 0.0, 0.0, 0.0, 0.0
            for m0 in range(0, len(step_seqs), cfg.micro_batch_size):
                with autocast:
                    loss, st = micro_batch_loss(model, step_seqs[m0 : m0 + cfg.micro_batch_size], cfg,
                                                tok.pad_token_id, dev, t_model)
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
                bridge += st["bridge"] / n_tok
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            if not torch.isfinite(gnorm):
                raise TrainingError(f"update step {trainer['global_step']}: gradient norm is {gnorm.item()}; "
                                    "nothing was saved, the previous checkpoint stays the latest")
            opt.step()
            opt.zero_grad(set_to_none=True)
            rows.append({"step": trainer["global_step"], "loss": total, "pg_loss": main,
                         "bridge_loss": bridge if use_bridges else None, "kl": kl / n_tok,
                         "grad_norm": float(gnorm), "lr": cfg.learning_rate, "tokens_trained": n_tok,
                         "weighted_tokens": weighted})
            trainer["global_step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", kl=f"{kl / n_tok:.3f}")
        trainer["global_epoch"] += 1
    bar.close()

    model.eval()
    with store.writer("update", key) as w:
        save_checkpoint(w.path, model, tok, opt, trainer, seed)
        w.write_table("updates", pa.Table.from_pylist(rows))
        w.meta.update({"steps": len(rows), "sequences": len(seqs), "parent": student.sha256,
                       "mean_loss": sum(r["loss"] for r in rows) / len(rows)})
        return w.commit()


def save_checkpoint(out, model, tokenizer, opt: torch.optim.Optimizer, trainer: dict, seed: int) -> None:
    """Write model/ (safetensors + tokenizer) and state/ (optimizer, counters, RNG) under `out`."""
    mdir = out / CHECKPOINT_MODEL_DIR
    model.save_pretrained(mdir, safe_serialization=True)
    tokenizer.save_pretrained(mdir)
    sdir = out / CHECKPOINT_STATE_DIR
    sdir.mkdir()
    groups = _save_optimizer(opt, sdir / "optimizer.safetensors")
    (sdir / "trainer.json").write_text(json.dumps(
        {**trainer, "optimizer": groups, "rng_cpu": torch.get_rng_state().tolist(), "seed": seed}))


def load_training_state(student: ModelSpec, opt: torch.optim.Optimizer, cfg: UpdateConfig) -> dict:
    """Restore optimizer and RNG state from a checkpoint artifact; returns the step/epoch counters."""
    if student.checkpoint is None:
        return {"global_step": 0, "global_epoch": 0}
    sdir = student.dir.parent / CHECKPOINT_STATE_DIR
    saved = json.loads((sdir / "trainer.json").read_text())
    _load_optimizer(opt, sdir / "optimizer.safetensors", saved["optimizer"]["param_groups"], cfg)
    torch.set_rng_state(torch.tensor(saved["rng_cpu"], dtype=torch.uint8))
    return {"global_step": saved["global_step"], "global_epoch": saved["global_epoch"]}
