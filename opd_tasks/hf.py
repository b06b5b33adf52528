"""The `hf` backend: transformers models on CPU or GPU. Generation with per-token log-probs, and
teacher-forced per-token log-probs / top-k / entropy over prompt + completion.

Conventions used by every stage:
- A sequence is `prompt_ids + completion_ids`. Teacher-forced passes use RIGHT padding (positions then
  start at 0 for every row, exactly as in generation, where transformers derives positions from the
  attention mask of the LEFT-padded prompts); padding never changes a per-token value.
- Log-probs are of the model's unmodified distribution (temperature 1, no top-p), which is what the update
  recomputes and what the teacher is scored with; sampling itself uses `temperature` / `top_p`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from opd_tasks.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but torch sees no CUDA device (set device: cpu or auto)")
    return torch.device(device)


def load_causal_lm(path: str | Path, device: torch.device, dtype: str = "auto", trust_remote_code: bool = False):
    """AutoModelForCausalLM from a local dir, in eval mode, on `device`. bf16 on CUDA when dtype='auto'."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show stage progress; per-load bars are noise
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
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


# ----------------------------------------------------------------------------------- generation


@dataclass
class Generated:
    """One sampled completion."""

    prompt_index: int
    sample_id: int
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" (EOS generated, included in token_ids) or "length"


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int,
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
) -> list[Generated]:
    """Sample `n` completions per prompt (greedy when temperature == 0), batched with left padding.

    Each batch is seeded with `seed + batch index` inside a forked RNG, so results do not depend on the
    caller's RNG state, and are reproducible on the CPU.
    """
    if max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = next(model.parameters()).device
    per_batch = max(1, batch_size // n)
    out: list[Generated] = []
    batches = range(0, len(prompts), per_batch)
    for bi, start in enumerate(tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False)):
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
            eos_token_id=eos_token_id,
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
            torch.manual_seed(seed * 1_000_003 + bi)
            res = model.generate(**kwargs)
        new = res.sequences[:, width:].cpu()
        lp = None
        if want_logprobs:
            logits = torch.stack(res.logits, dim=1).float()  # [rows, steps, V], raw (unprocessed) logits
            lp = torch.log_softmax(logits, dim=-1).gather(-1, new[:, : logits.shape[1], None].to(logits.device))
            lp = lp.squeeze(-1).cpu()
        reps = n if sample else 1
        for r in range(new.shape[0]):
            row = new[r].tolist()
            if eos_token_id in row:
                length, reason = row.index(eos_token_id) + 1, "stop"
            else:
                length, reason = len(row), "length"
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


@dataclass
class TokenScores:
    """Per completion token of one sequence."""

    logprob: list[float]
    entropy: list[float]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]


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
    for start in tqdm(steps, desc=desc, unit="batch", disable=not progress, leave=False):
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


# ------------------------------------------------------------------------------ probes from cached prefixes


def _cache_kwarg(model) -> str:
    """The forward() keyword of the KV cache: `cache` (transformers >= 5.2x) or `past_key_values` (before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    """The causal LM's logits from decoder hidden states [N, H] (output head, and Gemma-style final logit
    soft-capping where the config has it), as float32."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class Encoded:
    """One decoder forward over right-padded rows (`pack_right` layout: row r's token j at position j): the
    last hidden states [B, L, H] and the KV cache. `row` maps a sequence index to its row."""

    cache: object
    hidden: torch.Tensor
    row: dict[int, int]


def encode(model, ids: torch.Tensor, attn: torch.Tensor, row: dict[int, int], use_cache: bool = True) -> Encoded:
    """The decoder alone over a right-padded batch, with its KV cache unless `use_cache` is False (no output
    head: see `_head`)."""
    dev = next(model.parameters()).device
    out = model.get_decoder()(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=use_cache)
    cache = (out["cache"] if "cache" in out else out.get("past_key_values")) if use_cache else None
    if use_cache and cache is None:
        raise ModelError(f"{type(model).__name__} returned no KV cache (gradient checkpointing on?); the probes "
                         "and the bridge loss continue from it")
    return Encoded(cache, out.last_hidden_state, row)


class _Prefixes:
    """Keys/values of probe prefixes `sequences[i][:n]`, left-padded to one width W, from one forward over each
    distinct sequence (causal attention: a prefix's states do not depend on what follows it), plus the logits at
    each prefix's last position (they predict the first continuation token). `greedy` and `score` continue from
    the prefixes; each restores the cache to the prefixes afterwards, so both can run in turn.

    `encoded` reuses a forward that already ran over the sequences (e.g. the analysis's student statistics
    pass); without it, each probed sequence is encoded here, cut after its longest prefix."""

    def __init__(self, model, sequences: Sequence[Sequence[int]], probes: Sequence[tuple[int, int]], pad: int,
                 encoded: Encoded | None = None):
        from transformers import DynamicCache

        self.model, self.pad = model, pad
        self.device = device = next(model.parameters()).device
        self.ckw = _cache_kwarg(model)
        self.lengths = lengths = [n for _, n in probes]
        if min(lengths) < 1:
            raise ConfigError("a probe prefix must hold at least one token")
        if any(n > len(sequences[i]) for i, n in probes):
            raise ConfigError("a probe prefix is longer than its sequence")
        if encoded is None:
            rows = sorted({i for i, _ in probes})
            need: dict[int, int] = {}
            for i, n in probes:  # nothing after a row's longest prefix is encoded
                need[i] = max(need.get(i, 0), n)
            seqs = [list(sequences[i][: need[i]]) for i in rows]
            width = max(len(q) for q in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            attn = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, q in enumerate(seqs):
                ids[r, : len(q)] = torch.tensor(q, dtype=torch.long)
                attn[r, : len(q)] = 1
            # The decoder alone: its last hidden states, the output head applied only at the prefix ends below
            # (full logits over every position would be rows x length x vocabulary floats).
            encoded = encode(model, ids, attn, {i: r for r, i in enumerate(rows)})
        elif any(i not in encoded.row for i, _ in probes):
            raise ConfigError("a probed sequence is not in the given encoding")
        full = encoded.cache
        if any(type(layer).__name__ != "DynamicLayer" for layer in full.layers):
            raise ConfigError(
                f"{type(model).__name__}: the probes need every layer's full keys/values (a DynamicLayer); this "
                f"model's cache has {sorted({type(x).__name__ for x in full.layers})} (sliding-window attention?)")
        self.w = w = max(lengths)
        n = torch.tensor(lengths, device=device)
        src = torch.tensor([encoded.row[i] for i, _ in probes], device=device)
        # left-aligned gather: slot j of probe p holds position j - (w - n_p) of its sequence (pad slots masked)
        j = torch.arange(w, device=device)[None, :]
        offset = j - (w - n)[:, None]
        self.mask = (offset >= 0).long()
        index = offset.clamp(min=0)
        data = []
        for layer in full.layers:
            k, v = layer.keys[src], layer.values[src]  # [P, H, L, D]
            gi = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            keep = self.mask[:, None, :, None].to(k.dtype)
            data.append((k.gather(2, gi) * keep, v.gather(2, gi) * keep))
        self.cache = DynamicCache(ddp_cache_data=data)
        self.next_logits = _head(model, encoded.hidden[src, n - 1])
        self.pos = n[:, None]  # position of the first continuation token

    def _restore(self) -> None:
        extra = self.cache.get_seq_length() - self.w
        if extra > 0:
            self.cache.crop(-extra)  # drop the continuation's keys/values, keep the prefixes

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, start: int, pos: torch.Tensor | None = None):
        t = ids.shape[1]
        pos = self.pos if pos is None else pos
        return self.model(input_ids=ids, attention_mask=mask, **{self.ckw: self.cache},
                          position_ids=pos + start + torch.arange(t, device=self.device)[None],
                          cache_position=torch.arange(self.w + start, self.w + start + t, device=self.device),
                          use_cache=True)

    def greedy(self, k: int, eos: int, only: Sequence[int] | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy continuation of each prefix (at most k tokens, up to and including EOS), raw-logit log-probs;
        with `only`, of those probes alone (in that order).

        Probes that have emitted EOS leave the batch: once a quarter of the rows in it are finished, the cache,
        mask and positions keep only the running ones (rows never interact, so this changes no result)."""
        p_n = len(self.lengths)
        tokens: list[list[int]] = [[] for _ in range(p_n)]
        logps: list[list[float]] = [[] for _ in range(p_n)]
        saved = [(layer.keys, layer.values) for layer in self.cache.layers]
        rows = list(range(p_n)) if only is None else list(only)  # the probe held by each row of the running batch
        running = [True] * len(rows)  # per row of the running batch
        mask, logits, pos = self.mask, self.next_logits, self.pos
        if only is not None:
            if not rows:
                return [], []
            idx = torch.tensor(rows, device=self.device)
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]
            mask, logits, pos = mask[idx], logits[idx], pos[idx]
        try:
            for j in range(k):
                lp = torch.log_softmax(logits, -1)
                nxt = lp.argmax(-1)
                chosen = lp.gather(-1, nxt[:, None]).squeeze(-1).cpu().tolist()
                for r, tok in enumerate(nxt.cpu().tolist()):
                    if running[r]:
                        tokens[rows[r]].append(tok)
                        logps[rows[r]].append(chosen[r])
                        running[r] = tok != eos
                if not any(running) or j == k - 1:
                    break
                if 4 * (len(rows) - sum(running)) >= len(rows):  # compact: keep the running rows only
                    keep = [r for r in range(len(rows)) if running[r]]
                    idx = torch.tensor(keep, device=self.device)
                    for layer in self.cache.layers:
                        layer.keys, layer.values = layer.keys[idx], layer.values[idx]
                    mask, pos = mask[idx], pos[idx]
                    rows, running = [rows[r] for r in keep], [True] * len(keep)
                inp = torch.tensor([[tokens[p][-1] if run else self.pad] for p, run in zip(rows, running, strict=True)],
                                   device=self.device)
                mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long, device=self.device)], 1)
                logits = self._forward(inp, mask, j, pos).logits[:, -1].float()
        finally:
            for layer, (keys, values) in zip(self.cache.layers, saved, strict=True):
                layer.keys, layer.values = keys, values  # the prefixes again, for every probe
        if only is not None:
            return [tokens[p] for p in only], [logps[p] for p in only]
        return tokens, logps

    def logprobs(self, given: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs [P, T] of the tokens `given[p]` after prefix p (teacher forcing) and their mask [P, T]. Under
        autograd the gradient reaches the forward that encoded the prefixes. Call `_restore` before using these
        prefixes again."""
        if min(len(g) for g in given) < 1:
            raise ConfigError("cannot score an empty continuation")
        p_n, t = len(given), max(len(g) for g in given)
        ids = torch.full((p_n, t), self.pad, dtype=torch.long)
        valid = torch.zeros((p_n, t))
        for p, g in enumerate(given):
            ids[p, : len(g)] = torch.tensor(list(g), dtype=torch.long)
            valid[p, : len(g)] = 1.0
        ids = ids.to(self.device)
        lp = torch.log_softmax(self.next_logits, -1).gather(-1, ids[:, :1])
        if t > 1:
            mask = torch.cat([self.mask, torch.ones((p_n, t - 1), dtype=torch.long, device=self.device)], 1)
            logits = self._forward(ids[:, :-1], mask, 0).logits.float()
            lp = torch.cat([lp, torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)], 1)
        return lp, valid.to(self.device)

    def score(self, given: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-probs of the tokens `given[p]` after prefix p (teacher forcing)."""
        lp, _ = self.logprobs(given)
        self._restore()
        return [lp[p, : len(g)].cpu().tolist() for p, g in enumerate(given)]


@torch.no_grad()
def probe_pair(
    teacher,
    student,
    sequences: Sequence[Sequence[int]],
    probes: Sequence[tuple[int, int]],
    k: int,
    *,
    eos_token_id: int,
    pad_token_id: int,
    batch_size: int = 64,
    cross: bool = True,
    progress: bool = False,
    student_encoded: Encoded | None = None,
) -> dict[str, list]:
    """Near-future probes from each prefix `sequences[i][:n]` of `probes`: the teacher's and the student's greedy
    continuations (at most k tokens, up to and including EOS) with their own raw-logit log-probs, and with
    `cross` each model's log-probs of the other's continuation. Per batch of probes each model encodes the probed
    sequences once; the prefixes are never re-encoded. `student_encoded`: the student's forward over every probed
    sequence has already run (all probes then form one batch). Returns lists `c_t`, `t_on_t`, `c_s`, `s_on_s`
    and, with `cross`, `s_on_t`, `t_on_s`."""
    out: dict[str, list] = {key: [] for key in ("c_t", "t_on_t", "c_s", "s_on_s", "s_on_t", "t_on_s")}
    if student_encoded is not None:
        batch_size = max(1, len(probes))
    steps = range(0, len(probes), batch_size)
    for s0 in tqdm(steps, desc="probes", unit="batch", disable=not progress, leave=False):
        chunk = list(probes[s0 : s0 + batch_size])
        pt = _Prefixes(teacher, sequences, chunk, pad_token_id)
        c_t, t_on_t = pt.greedy(k, eos_token_id)
        ps = _Prefixes(student, sequences, chunk, pad_token_id, student_encoded)
        c_s, s_on_s = ps.greedy(k, eos_token_id)
        for key, val in (("c_t", c_t), ("t_on_t", t_on_t), ("c_s", c_s), ("s_on_s", s_on_s)):
            out[key] += val
        if cross:
            out["s_on_t"] += ps.score(c_t)
            out["t_on_s"] += pt.score(c_s)
    return out


@torch.no_grad()
def probe_greedy(model, sequences: Sequence[Sequence[int]], probes: Sequence[tuple[int, int]], k: int, *,
                 eos_token_id: int, pad_token_id: int, batch_size: int = 64,
                 score: Sequence[Sequence[int]] | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """One model's side of `probe_pair`: its greedy continuations and their log-probs, or with `score` its
    log-probs of the given continuations after the same prefixes."""
    conts: list[list[int]] = []
    lps: list[list[float]] = []
    for s0 in range(0, len(probes), batch_size):
        pre = _Prefixes(model, sequences, list(probes[s0 : s0 + batch_size]), pad_token_id)
        if score is None:
            c, lp = pre.greedy(k, eos_token_id)
        else:
            c = [list(x) for x in score[s0 : s0 + batch_size]]
            lp = pre.score(c)
        conts += c
        lps += lp
    return conts, lps
