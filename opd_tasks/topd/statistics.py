"""The student's per-token statistics the analysis needs from one forward: its entropy, and the reverse KL to the
teacher on the teacher's top-k support (the `rkl_topk` loss signal)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from opd_tasks.training.sequences import ScoredSequence


@torch.no_grad()
def student_statistics(model, seqs: list[ScoredSequence], batch: int,
                       on_chunk: Callable[[int, list[ScoredSequence], object], None] | None = None,
                       keep_cache: bool = False) -> tuple[list[list[float]], list[list[float]]]:
    """Per token of each sequence: the student's entropy and the top-k reverse KL, from one decoder forward per
    chunk of `batch` sequences. `on_chunk(first, chunk, encoded)` is called after each chunk (the sequences from
    index `first`); with `keep_cache`, `encoded` is the chunk's `prefix_cache.Encoded` (hidden states and KV
    cache; its rows are the chunk's sequences 0..len(chunk)-1), so near-future probes can start from it instead of
    encoding the same sequences again, else None."""
    from opd_tasks.backends.hf import pack_right
    from opd_tasks.backends.prefix_cache import encode, output_logits
    from opd_tasks.training.losses import topk_rkl_per_token

    dev = next(model.parameters()).device
    ents, rkls = [], []
    for s0 in range(0, len(seqs), batch):
        chunk = seqs[s0 : s0 + batch]
        ids, attn, pred, _ = pack_right([s.prompt for s in chunk], [s.tokens for s in chunk], 0)
        enc = encode(model, ids, attn, {i: i for i in range(len(chunk))}, use_cache=keep_cache)
        idx = pred.to(dev)[:, :, None].expand(-1, -1, enc.hidden.shape[-1])
        logits = output_logits(model, enc.hidden.gather(1, idx))  # [B, T, V] at the completion tokens only
        logp = torch.log_softmax(logits, -1)
        ent = -(logp.exp() * logp).sum(-1).cpu()
        t = pred.shape[1]
        k = len(chunk[0].topk_ids[0])
        tid = torch.zeros((len(chunk), t, k), dtype=torch.long)
        tlp = torch.zeros((len(chunk), t, k))
        for i, s in enumerate(chunk):
            tid[i, : len(s.tokens)] = torch.tensor(s.topk_ids)
            tlp[i, : len(s.tokens)] = torch.tensor(s.topk_logprobs)
        rkl = topk_rkl_per_token(logits, tid.to(dev), tlp.to(dev)).cpu()
        encoded = enc if keep_cache else None  # without the cache, free the hidden states before on_chunk runs
        del logits, logp, idx, enc
        for i, s in enumerate(chunk):
            ents.append(ent[i, : len(s.tokens)].tolist())
            rkls.append(rkl[i, : len(s.tokens)].tolist())
        if on_chunk is not None:
            on_chunk(s0, chunk, encoded)
        del encoded
    return ents, rkls
