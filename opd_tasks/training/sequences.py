"""The scored sequence: one rollout joined with its teacher scores, the record the gates, the analysis and the update
all work on; and regrouping token-grain tables into per-sequence lists. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.errors import DataError
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


@dataclass
class ScoredSequence:
    """One rollout with a completion, and what the teacher said about each of its tokens.

    `teacher_entropy` and the top-k are present when they were read (`scored_sequences(columns=...)`); the update
    adds the analysis's per-token `weights` (None: every weight 1), its `bridges`: (completion position, the
    teacher's continuation from there) at divergent positions, and `trainer_logprobs`: the sampled tokens'
    log-probs recomputed by the trainer before its first step.
    """

    prompt_id: str
    sample_id: int
    prompt: list[int]
    tokens: list[int]
    sampling_logprobs: list[float]
    teacher_logprobs: list[float]
    teacher_entropy: list[float] | None = None
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    weights: list[float] | None = None
    bridges: list[tuple[int, list[int]]] = field(default_factory=list)
    trainer_logprobs: list[float] | None = None
    teacher_prompt: list[int] | None = None  # the teacher's prompt when it has a context of its own

    @property
    def teacher_input(self) -> list[int]:
        """The prompt the teacher reads: its context + the student's prompt, or the student's prompt."""
        return self.teacher_prompt if self.teacher_prompt is not None else self.prompt

    def old_logprobs(self, source: str) -> list[float]:
        """The old log-probs `update.old_logprobs` names: `recompute` (the trainer's) or `sampler`."""
        if source == "sampler":
            return self.sampling_logprobs
        if source != "recompute":
            raise ValueError(f"update.old_logprobs must be 'recompute' or 'sampler', not {source!r}")
        if self.trainer_logprobs is None:
            raise ValueError(f"rollout ({self.prompt_id!r}, {self.sample_id}): update.old_logprobs is 'recompute' "
                             "but the trainer's log-probs were not computed")
        return self.trainer_logprobs


def group_tokens(table: pa.Table, columns: list[str]) -> dict[tuple[str, int], dict[str, list]]:
    """Token-grain table -> {(prompt_id, sample_id): {column: values in pos order}}."""
    if table.num_rows == 0:
        return {}
    t = table.sort_by([("prompt_id", "ascending"), ("sample_id", "ascending"), ("pos", "ascending")])
    pid = t.column("prompt_id").to_numpy(zero_copy_only=False)
    sid = t.column("sample_id").to_numpy()
    change = np.ones(len(pid), dtype=bool)
    change[1:] = (pid[1:] != pid[:-1]) | (sid[1:] != sid[:-1])
    starts = np.flatnonzero(change).tolist() + [len(pid)]
    cols = {c: t.column(c).to_pylist() for c in columns}
    out: dict[tuple[str, int], dict[str, list]] = {}
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        out[(str(pid[a]), int(sid[a]))] = {c: v[a:b] for c, v in cols.items()}
    return out


#: The optional `teacher_scores` columns a ScoredSequence carries (each a field of the same name).
SCORE_COLUMNS = ("teacher_entropy", "topk_ids", "topk_logprobs")


def scored_sequences(store: ArtifactStore, rollouts: ArtifactRef, scores: ArtifactRef,
                     columns: tuple[str, ...] = (), rows: list[int] | None = None) -> list[ScoredSequence]:
    """Every rollout with at least one completion token (of the rollout rows `rows`, default all), in row order,
    joined with its teacher scores (the teacher log-probs, plus the score `columns` asked for: teacher_entropy,
    topk_ids, topk_logprobs). DataError if the scores do not cover a rollout."""
    unknown = set(columns) - set(SCORE_COLUMNS)
    if unknown:
        raise ValueError(f"unknown score columns {sorted(unknown)}; choose from {SCORE_COLUMNS}")
    roll = store.read_table(rollouts, "rollouts")
    cols = ["teacher_logprob", *columns]
    scored = store.read_table(scores, "teacher_scores", columns=["prompt_id", "sample_id", "pos", *cols])
    if rows is not None:  # only those rollouts, and only their scores are turned into Python lists
        roll = roll.take(pa.array(sorted(rows), pa.int64()))
        scored = scored.filter(pc.is_in(sequence_keys(scored), value_set=sequence_keys(roll).combine_chunks()))
    by_seq = group_tokens(scored, cols)
    out = []
    for pid, sid, prompt, toks, lps, tprompt in zip(*(roll.column(c).to_pylist() for c in (
            "prompt_id", "sample_id", "prompt_token_ids", "token_ids", "logprobs", "teacher_prompt_token_ids")),
            strict=True):
        if not toks:
            continue
        s = by_seq.get((pid, sid))
        if s is None or len(s["teacher_logprob"]) != len(toks):
            raise DataError(f"teacher scores {scores.short()} do not cover rollout ({pid!r}, {sid}): "
                            f"expected {len(toks)} tokens")
        out.append(ScoredSequence(pid, sid, prompt, toks, lps, s["teacher_logprob"],
                                  **{c: s[c] for c in columns}, teacher_prompt=tprompt))
    return out


def sequence_keys(table: pa.Table) -> pa.ChunkedArray:
    """One string per row naming its sequence: prompt_id and sample_id."""
    return pc.binary_join_element_wise(table.column("prompt_id"), pc.cast(table.column("sample_id"), pa.string()),
                                       "\x1f")


def attach_analysis(store: ArtifactStore, seqs: list[ScoredSequence], analysis: ArtifactRef,
                    bridges: bool) -> None:
    """Set each sequence's `weights` from the analysis's `tokens` table and, with `bridges`, its bridges: the
    teacher continuations the analysis probed at its `divergent` positions. DataError if a sequence is missing."""
    tokens = store.read_table(analysis, "tokens", columns=["prompt_id", "sample_id", "pos", "weight", "regime"])
    weights = group_tokens(tokens, ["weight"])
    by_seq: dict[tuple[str, int], list[tuple[int, list[int]]]] = {}
    if bridges:
        divergent = {(a, b, c) for a, b, c, r in zip(*(tokens.column(x).to_pylist() for x in
                                                       ("prompt_id", "sample_id", "pos", "regime")), strict=True)
                     if r == "divergent"}
        probes = store.read_table(analysis, "probes",
                                  columns=["prompt_id", "sample_id", "pos", "teacher_continuation"])
        for a, b, c, cont in zip(*(probes.column(x).to_pylist() for x in
                                   ("prompt_id", "sample_id", "pos", "teacher_continuation")), strict=True):
            if (a, b, c) in divergent and cont:
                by_seq.setdefault((a, b), []).append((c, cont))
    for s in seqs:
        got = weights.get((s.prompt_id, s.sample_id))
        if got is None or len(got["weight"]) != len(s.tokens):
            raise DataError(f"token weights of analysis {analysis.short()} do not cover rollout "
                            f"({s.prompt_id!r}, {s.sample_id})")
        s.weights = got["weight"]
        s.bridges = sorted(by_seq.get((s.prompt_id, s.sample_id), []))


def old_logprobs_table(seqs) -> pa.Table:
    """The `old_logprobs` table: per trained token, the sampler's and the trainer's log-prob."""
    return pa.table({
        "prompt_id": [s.prompt_id for s in seqs for _ in s.tokens],
        "sample_id": pa.array([s.sample_id for s in seqs for _ in s.tokens], pa.int32()),
        "pos": pa.array([p for s in seqs for p in range(len(s.tokens))], pa.int32()),
        "sampling_logprob": pa.array([v for s in seqs for v in s.sampling_logprobs], pa.float32()),
        "trainer_logprob": pa.array([v for s in seqs for v in s.trainer_logprobs], pa.float32()),
    })
