"""Shared pieces of the stages: the model spec that goes into cache keys, stage code versions, and
regrouping token-grain tables into per-sequence arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from storage.refs import ArtifactRef
from storage.store import ArtifactStore

#: Bump a stage's version when its code changes what it writes: the new version gets new cache keys.
STAGE_VERSIONS: dict[str, int] = {
    "prompts": 1,
    "rollout": 1,
    "score": 1,
    "gates": 1,
    # analyze 3: probes continue from cached prefixes, xent self terms from generation; 4: head at ends;
    # 5: the student's probes reuse its statistics pass, finished probes leave the batch; 6: whether the bridge
    # is trained is part of the key (swap generates continuations only then)
    "analyze": 6,
    "update": 2,  # 2: the bridge loss continues from the main forward's keys/values
    "evaluate": 1,
}

CHECKPOINT_MODEL_DIR = "model"
CHECKPOINT_STATE_DIR = "state"


class ModelSpec(BaseModel):
    """A model as stages see it: a local directory plus the hash of its content (for cache keys).

    Made from a config `ModelRef` by `opd_tasks.models.resolve_model` or from a checkpoint artifact by
    `ModelSpec.from_checkpoint`. JSON-serialisable, so it can be a Prefect task parameter.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    sha256: str
    trust_remote_code: bool = False
    dtype: str = "auto"
    checkpoint: ArtifactRef | None = None  # set when the model is a checkpoint artifact (has optimizer state)

    @classmethod
    def from_checkpoint(cls, store: ArtifactStore, ref: ArtifactRef, dtype: str = "auto") -> ModelSpec:
        base = store.checkpoint_dir(ref)  # verifies every file's hash
        return cls(path=str(base / CHECKPOINT_MODEL_DIR), sha256=ref.sha256, dtype=dtype, checkpoint=ref)

    @property
    def dir(self) -> Path:
        return Path(self.path)


def seq_keys(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table.column("prompt_id").to_pylist(), table.column("sample_id").to_pylist(), strict=True))


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


def scored_rollouts(store: ArtifactStore, rollouts: ArtifactRef, scores: ArtifactRef, score_columns: list[str]):
    """Join rollouts with their teacher scores, one sequence at a time.

    Yields (prompt_id, sample_id, prompt_token_ids, token_ids, sampling logprobs, {column: per-token values})
    for every rollout with at least one completion token; DataError if the scores do not cover a rollout.
    """
    from opd_tasks.errors import DataError

    roll = store.read_table(rollouts, "rollouts")
    cols = ["teacher_logprob", *[c for c in score_columns if c != "teacher_logprob"]]
    sc = group_tokens(store.read_table(scores, "teacher_scores", columns=["prompt_id", "sample_id", "pos", *cols]),
                      cols)
    for pid, sid, p, toks, lps in zip(*(roll.column(c).to_pylist() for c in
                                        ("prompt_id", "sample_id", "prompt_token_ids", "token_ids", "logprobs")),
                                      strict=True):
        if not toks:
            continue
        s = sc.get((pid, sid))
        if s is None or len(s["teacher_logprob"]) != len(toks):
            raise DataError(f"teacher scores {scores.short()} do not cover rollout ({pid!r}, {sid}): "
                            f"expected {len(toks)} tokens")
        yield pid, sid, p, toks, lps, s
