"""The prefix cache: continue many prefixes of a causal LM from one forward's keys/values (`PrefixCache`), and the
decoder-only forward it starts from (`encode`, `Encoded`, `output_logits`).

Layout conventions are those of `opd_tasks.backends.hf` (right-padded rows: row r's token j at position j).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from opd_tasks.backends import as_token_ids
from opd_tasks.errors import ConfigError, ModelError


def _cache_kwarg(model) -> str:
    """The forward() keyword of the KV cache: `cache` (transformers >= 5.2x) or `past_key_values` (before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
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
    head: see `output_logits`)."""
    dev = next(model.parameters()).device
    out = model.get_decoder()(input_ids=ids.to(dev), attention_mask=attn.to(dev), use_cache=use_cache)
    cache = (out["cache"] if "cache" in out else out.get("past_key_values")) if use_cache else None
    if use_cache and cache is None:
        raise ModelError(f"{type(model).__name__} returned no KV cache (gradient checkpointing on?); the probes "
                         "and the bridge loss continue from it")
    return Encoded(cache, out.last_hidden_state, row)


class PrefixCache:
    """The keys/values of many prefixes `sequences[i][:n]` of a causal LM, ready to continue from.

    This is what TOPD's near-future machinery stands on: the detectors continue each probed prefix greedily
    (`greedy`) or teacher-force given tokens after it (`score`, `logprobs`), and the update's bridge loss
    teacher-forces the teacher's continuation after each divergent prefix, all without encoding a prefix again.

    How: one decoder forward over each distinct sequence (causal attention, so a prefix's states do not depend
    on what follows it), then each probe's prefix is gathered out of that sequence's cache, left-padded to one
    width W (pad slots masked), together with the logits at the prefix's last position (they predict the first
    continuation token). `encoded` reuses a forward that already ran over the sequences (the analysis's student
    statistics pass, the update's main forward: under autograd the gradient then reaches that forward);
    without it, each probed sequence is encoded here, cut after its longest prefix.

    `greedy` and `score` restore the cache to the prefixes afterwards, so both can run in turn; after
    `logprobs` (which keeps the graph for a backward pass) call `restore` before continuing again. Needs every
    layer's full keys/values (a `DynamicLayer`): sliding-window caches are refused.
    """

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
        self.next_logits = output_logits(model, encoded.hidden[src, n - 1])
        self.pos = n[:, None]  # position of the first continuation token

    def restore(self) -> None:
        """Drop every continuation's keys/values, keeping the prefixes."""
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

    def greedy(self, k: int, eos: int | Sequence[int],
               only: Sequence[int] | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Greedy continuation of each prefix (at most k tokens, up to and including the first of the stop ids
        `eos`: `hf.stop_token_ids`), raw-logit log-probs; with `only`, of those probes alone (in that order).

        Probes that have emitted EOS leave the batch: once a quarter of the rows in it are finished, the cache,
        mask and positions keep only the running ones (rows never interact, so this changes no result)."""
        p_n, stops = len(self.lengths), set(as_token_ids(eos))
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
                        running[r] = tok not in stops
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
        autograd the gradient reaches the forward that encoded the prefixes. Call `restore` before using these
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
        self.restore()
        return [lp[p, : len(g)].cpu().tolist() for p, g in enumerate(given)]
