"""The `hf` backend: transformers models on CPU or GPU. Loading, generation with per-token log-probs, and
teacher-forced per-token log-probs / top-k / entropy over prompt + completion (`HfBackend` in
opd_tasks/backends/__init__.py puts the two behind the `Backend` interface). The prefix cache that TOPD's probes
and bridge continue from is in opd_tasks/backends/prefix_cache.py.

Conventions used by every stage:
- A sequence is `prompt_ids + completion_ids`. Teacher-forced passes use RIGHT padding (positions then
  start at 0 for every row, exactly as in generation, where transformers derives positions from the
  attention mask of the LEFT-padded prompts); padding never changes a per-token value.
- Log-probs are of the model's unmodified distribution (temperature 1, no top-p), which is what the update
  recomputes and what the teacher is scored with; sampling itself uses `temperature` / `top_p`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from opd_tasks.backends import Generated, TokenScores, as_token_ids, hf_prompts_per_batch
from opd_tasks.errors import ConfigError, ModelError
from opd_tasks.progress import bar

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device (set device: cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """A config dtype on `device`: "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_causal_lm(path: str | Path, device: torch.device, dtype: str = "auto", trust_remote_code: bool = False):
    """AutoModelForCausalLM from a local dir, in eval mode, on `device`. bf16 on CUDA when dtype='auto'."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show stage progress; per-load bars are noise
    torch_dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, SafetensorError) as e:  # truncated weights: permanent, not retried
        raise ModelError(f"cannot load model from {path}: {e}") from e
    return model.to(device).eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer from {path}: {e}") from e
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer at {path} has no EOS token")
    if tok.pad_token_id is None:
        log.warning("tokenizer at %s has no PAD token; using EOS (%r) as PAD", path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def stop_token_ids(tokenizer, model_dir: str | Path) -> list[int]:
    """Every token id that ends a completion of the model in `model_dir`: the tokenizer's EOS first, then each
    `eos_token_id` that the model's generation_config.json declares (one id or a list: Qwen3 lists two), without
    repeats. The one place this is decided: both backends stop at any of them and report `finish_reason` "stop"
    when a completion ends on one, and the probes' greedy continuations stop there too."""
    ids = [int(tokenizer.eos_token_id)]
    path = Path(model_dir) / "generation_config.json"
    try:
        declared = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except FileNotFoundError:
        declared = None
    except (OSError, ValueError, AttributeError) as e:
        raise ModelError(f"{path} is not a readable JSON object ({e}); re-save the model") from None
    declared = [] if declared is None else declared if isinstance(declared, list) else [declared]
    for t in declared:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ModelError(f"{path}: eos_token_id holds {t!r}; expected a token id or a list of token ids")
        if t not in ids:
            ids.append(t)
    return ids


# ----------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    want_logprobs: bool = True,
    desc: str = "generate",
    progress: bool = True,
    first_prompt: int = 0,
) -> list[Generated]:
    """Sample `n` completions per prompt (greedy when temperature == 0), batched with left padding.

    `eos_token_id`: the id, or the ids (`stop_token_ids`), that end a completion: it is cut after the first one
    it generates (finish_reason "stop"), else it is `max_new_tokens` long ("length").
    Each batch is seeded from `seed` and its index inside a forked RNG, so results do not depend on the
    caller's RNG state, and are reproducible on the CPU. `first_prompt`: where `prompts` start in the whole
    stage's prompts (a part's, opd_tasks/stages/registry.py; a multiple of the batch): batch indices, and so
    seeds, count from there, and a shard samples what the unsharded stage samples.
    """
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    stops = as_token_ids(eos_token_id)
    per_batch = hf_prompts_per_batch(batch_size, n)
    if first_prompt % per_batch:
        raise ValueError(f"first_prompt {first_prompt} is not on a batch boundary ({per_batch} prompts per batch)")
    out: list[Generated] = []
    batches = range(0, len(prompts), per_batch)
    for bi, start in enumerate(bar(batches, desc, "batches", progress)):
        chunk = prompts[start : start + per_batch]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        sample = temperature > 0
        kwargs = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            num_return_sequences=n if sample else 1,
            eos_token_id=stops,
            pad_token_id=pad_token_id,
            return_dict_in_generate=True,
            output_logits=want_logprobs,
        )
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        devices = [device.index] if device.type == "cuda" and device.index is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1_000_003 + first_prompt // per_batch + bi)
            res = model.generate(**kwargs)
        new = res.sequences[:, width:].cpu()
        lp = chosen_logprobs(res.logits, new) if want_logprobs else None
        del res
        reps = n if sample else 1
        for r in range(new.shape[0]):
            row = new[r].tolist()
            stop = next((j for j, t in enumerate(row) if t in stops), None)
            length, reason = (stop + 1, "stop") if stop is not None else (len(row), "length")
            for s_id in range(n if not sample else 1):
                out.append(
                    Generated(
                        prompt_index=start + r // reps,
                        sample_id=(r % reps) if sample else s_id,
                        token_ids=row[:length],
                        logprobs=lp[r, :length].tolist() if lp is not None else None,
                        finish_reason=reason,
                    )
                )
    return out


def chosen_logprobs(step_logits: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Log-prob [rows, steps] (on the CPU) of each generated token under its step's raw logits: `step_logits` is
    transformers' `output_logits` (one [rows, V] tensor per step), `tokens` [rows, >= steps] the generated ids.
    One step at a time, so no [rows, steps, V] copy is ever made: the memory beyond the logits transformers keeps
    is one step's log-softmax."""
    if not step_logits:
        return torch.empty(tokens.shape[0], 0)
    out = torch.empty(tokens.shape[0], len(step_logits), dtype=torch.float32, device=step_logits[0].device)
    for j, logits in enumerate(step_logits):
        lp = torch.log_softmax(logits.float(), dim=-1)
        out[:, j] = lp.gather(-1, tokens[:, j, None].to(lp.device)).squeeze(-1)
    return out.cpu()


# ------------------------------------------------------------------------------ teacher forcing


def pack_right(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + completion` batch.

    Returns input_ids [B, L], attention_mask [B, L], and for the completion tokens a gather index
    `pred_index` [B, T] (the position whose logits predict completion token j: len(prompt) + j - 1) and a
    mask `comp_mask` [B, T] (1 where j < len(completion)), with T the longest completion.
    """
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(lengths)
    t_max = max(1, max(len(c) for c in completions))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    pred = torch.zeros((len(prompts), t_max), dtype=torch.long)
    cmask = torch.zeros((len(prompts), t_max), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        if not p:
            raise ConfigError(f"sequence {i} has an empty prompt: teacher forcing needs at least one prompt token")
        seq = list(p) + list(c)
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, : len(seq)] = 1
        j = torch.arange(len(c))
        pred[i, : len(c)] = len(p) + j - 1
        cmask[i, : len(c)] = True
    return ids, attn, pred, cmask


def completion_logits(model, ids: torch.Tensor, attn: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] that predict each completion token (float32)."""
    logits = model(input_ids=ids, attention_mask=attn).logits
    idx = pred.to(logits.device)[:, :, None].expand(-1, -1, logits.shape[-1])
    return logits.gather(1, idx).float()


@torch.no_grad()
def score_sequences(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    top_k: int,
    batch_size: int = 64,
    desc: str = "score",
    progress: bool = True,
) -> list[TokenScores]:
    """Teacher-forced log-prob of each completion token, the top-k ids/log-probs and the entropy."""
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    k = min(top_k, vocab)
    out: list[TokenScores] = []
    # Sort by length so batches pad little; restore the order at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
    results: dict[int, TokenScores] = {}
    steps = range(0, len(order), batch_size)
    for start in bar(steps, desc, "batches", progress):
        idx = order[start : start + batch_size]
        ids, attn, pred, cmask = pack_right([prompts[i] for i in idx], [completions[i] for i in idx], pad_token_id)
        logits = completion_logits(model, ids.to(device), attn.to(device), pred)
        logp = torch.log_softmax(logits, dim=-1)
        targets = torch.zeros_like(pred)
        for r, i in enumerate(idx):
            c = completions[i]
            targets[r, : len(c)] = torch.tensor(c, dtype=torch.long)
        tok_lp = logp.gather(-1, targets.to(logp.device)[:, :, None]).squeeze(-1).cpu()
        ent = -(logp.exp() * logp).sum(-1).cpu()
        top_lp, top_id = logp.topk(k, dim=-1)
        top_lp, top_id = top_lp.cpu(), top_id.cpu()
        for r, i in enumerate(idx):
            n_tok = len(completions[i])
            results[i] = TokenScores(
                logprob=tok_lp[r, :n_tok].tolist(),
                entropy=ent[r, :n_tok].tolist(),
                topk_ids=top_id[r, :n_tok].tolist(),
                topk_logprobs=top_lp[r, :n_tok].tolist(),
            )
    out = [results[i] for i in range(len(prompts))]
    return out
