"""Near-future probes: greedy continuations of many prefixes by one or two models, and teacher forcing of a
given continuation after each prefix, all continuing from a `PrefixCache` (opd_tasks/backends/prefix_cache.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from opd_tasks.backends.prefix_cache import Encoded, PrefixCache
from opd_tasks.progress import bar


@torch.no_grad()
def probe_pair(
    teacher,
    student,
    sequences: Sequence[Sequence[int]],
    probes: Sequence[tuple[int, int]],
    k: int,
    *,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    batch_size: int = 64,
    cross: bool = True,
    progress: bool = False,
    student_encoded: Encoded | None = None,
    teacher_view: tuple[Sequence[Sequence[int]], Sequence[tuple[int, int]]] | None = None,
) -> dict[str, list]:
    """Near-future probes from each prefix `sequences[i][:n]` of `probes`: the teacher's and the student's greedy
    continuations (at most k tokens, up to and including the first of the stop ids `eos_token_id`) with their
    own raw-logit log-probs, and with `cross` each model's log-probs of the other's continuation. Per batch of
    probes each model encodes the probed sequences once; the prefixes are never re-encoded. `student_encoded`:
    the student's forward over every probed sequence has already run (all probes then form one batch).
    `teacher_view`: (sequences, probes) as the teacher reads them, the same positions after the teacher's own
    prompt (a context of its own); None: the teacher reads `sequences` too. Returns lists `c_t`, `t_on_t`, `c_s`,
    `s_on_s` and, with `cross`, `s_on_t`, `t_on_s`."""
    out: dict[str, list] = {key: [] for key in ("c_t", "t_on_t", "c_s", "s_on_s", "s_on_t", "t_on_s")}
    if student_encoded is not None:
        batch_size = max(1, len(probes))
    t_sequences, t_probes = teacher_view if teacher_view is not None else (sequences, probes)
    steps = range(0, len(probes), batch_size)
    for s0 in bar(steps, "probes", "batches", progress):
        chunk = list(probes[s0 : s0 + batch_size])
        pt = PrefixCache(teacher, t_sequences, list(t_probes[s0 : s0 + batch_size]), pad_token_id)
        c_t, t_on_t = pt.greedy(k, eos_token_id)
        ps = PrefixCache(student, sequences, chunk, pad_token_id, student_encoded)
        c_s, s_on_s = ps.greedy(k, eos_token_id)
        for key, val in (("c_t", c_t), ("t_on_t", t_on_t), ("c_s", c_s), ("s_on_s", s_on_s)):
            out[key] += val
        if cross:
            out["s_on_t"] += ps.score(c_t)
            out["t_on_s"] += pt.score(c_s)
    return out


@torch.no_grad()
def probe_greedy(model, sequences: Sequence[Sequence[int]], probes: Sequence[tuple[int, int]], k: int, *,
                 eos_token_id: int | Sequence[int], pad_token_id: int, batch_size: int = 64,
                 score: Sequence[Sequence[int]] | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """One model's side of `probe_pair`: its greedy continuations and their log-probs, or with `score` its
    log-probs of the given continuations after the same prefixes."""
    conts: list[list[int]] = []
    lps: list[list[float]] = []
    for s0 in range(0, len(probes), batch_size):
        pre = PrefixCache(model, sequences, list(probes[s0 : s0 + batch_size]), pad_token_id)
        if score is None:
            c, lp = pre.greedy(k, eos_token_id)
        else:
            c = [list(x) for x in score[s0 : s0 + batch_size]]
            lp = pre.score(c)
        conts += c
        lps += lp
    return conts, lps
