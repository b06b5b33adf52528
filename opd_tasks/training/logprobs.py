"""Teacher-forced log-probs of given completions under a model, computing only what is used.

`completion_logprobs` is what the gates' re-scores and the update's recomputed old log-probs run: the decoder over
a batch of `batch_size` right-padded sequences (`pack_right` layout), then the output head at one sequence's
completion positions at a time. So the largest tensor alive is one sequence's [T, V] float32 logits, never the
batch's [B, L, V] logits over every position (at vocabulary 151,936 and 64 sequences of 1,300 tokens those are
50 GB). Sequences are taken in length order so that a batch pads little; the result is in the input order.
`reverse_kl` (evaluation's divergence from the teacher) works the same way, with a student and a teacher that
each read their own prompt: both decoders over the batch, then one sequence at a time both output heads and the
divergence on the student's device, so the largest tensors alive are that sequence's two [T, V] log-prob tensors
and only the [T] result leaves the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch


@torch.no_grad()
def completion_logprobs(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                        pad_token_id: int, batch_size: int, autocast=None) -> list[list[float]]:
    """log p(completion token j | prompt, completion[:j]) for every sequence, as float32 values in lists.

    `autocast`: a context manager the forward runs under (the trainer's `torch.autocast`); None: the model's own
    dtype. The model is used as it is (call `.eval()` first for the policy's log-probs without dropout)."""
    from opd_tasks.backends.hf import pack_right
    from opd_tasks.backends.prefix_cache import encode, output_logits

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(completions[i]))
    out: list[list[float]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start : start + batch_size] if completions[i]]
        if not idx:
            continue
        ids, attn, pred, _ = pack_right([prompts[i] for i in idx], [completions[i] for i in idx], pad_token_id)
        with autocast if autocast is not None else nullcontext():
            hidden = encode(model, ids, attn, {}, use_cache=False).hidden
            for r, i in enumerate(idx):
                n = len(completions[i])
                logits = output_logits(model, hidden[r, pred[r, :n].to(device)])  # [n, V] float32
                target = torch.tensor(completions[i], dtype=torch.long, device=device)
                out[i] = torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1).tolist()
        del hidden
    return out


@torch.no_grad()
def reverse_kl(student, teacher, student_prompts: Sequence[Sequence[int]], teacher_prompts: Sequence[Sequence[int]],
               completions: Sequence[Sequence[int]], *, pad_token_id: int, batch_size: int) -> list[list[float]]:
    """The exact reverse KL at every completion token: KL(p_S(. | s_prompt, y_<j) || p_T(. | t_prompt, y_<j)),
    summed over the whole vocabulary, in nats, for every sequence (an empty completion: []). The student reads its
    own prompt and the teacher its own (its context + the student's prompt; the same ids without a context), and
    both read exactly the completion's tokens. Teacher-forced: no sampling noise at a position, so a greedy answer's
    divergence is measured as exactly as a sampled one's (which prefixes are visited is the decoding's choice)."""
    from opd_tasks.backends.hf import pack_right
    from opd_tasks.backends.prefix_cache import encode, output_logits
    from opd_tasks.errors import ModelError
    from opd_tasks.training.losses import full_rkl_per_token

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[list[float]] = [[] for _ in completions]
    order = sorted(range(len(completions)), key=lambda i: len(teacher_prompts[i]) + len(completions[i]))
    for start in range(0, len(order), batch_size):
        idx = [i for i in order[start : start + batch_size] if completions[i]]
        if not idx:
            continue
        comps = [completions[i] for i in idx]
        encoded = []  # per model: (the model, its device, its decoder's hidden states, the completion positions)
        for model, prompts in ((student, student_prompts), (teacher, teacher_prompts)):
            device = next(model.parameters()).device
            ids, attn, pred, _ = pack_right([prompts[i] for i in idx], comps, pad_token_id)
            encoded.append((model, device, encode(model, ids.to(device), attn.to(device), {}, use_cache=False).hidden,
                            pred))
        (s_model, s_dev, s_hidden, s_pred), (t_model, t_dev, t_hidden, t_pred) = encoded
        for r, (i, c) in enumerate(zip(idx, comps, strict=True)):
            ls = output_logits(s_model, s_hidden[r, s_pred[r, : len(c)].to(s_dev)])
            lt = output_logits(t_model, t_hidden[r, t_pred[r, : len(c)].to(t_dev)]).to(s_dev)
            if ls.shape[-1] != lt.shape[-1]:
                raise ModelError(f"the reverse KL needs one vocabulary: the student's output layer has "
                                 f"{ls.shape[-1]} rows and the teacher's {lt.shape[-1]}")
            out[i] = full_rkl_per_token(ls, lt).cpu().tolist()
        del encoded, s_hidden, t_hidden
    return out
