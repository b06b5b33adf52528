"""What each stage reads: one pydantic record per stage, and how its cache key is made from it.

A record holds what the stage reads and what its key is made of, and nothing that is not (no device, no progress
bar, no run name). Records round-trip through JSON, which is how the deployment executor sends them to a stage's
own flow run. This module imports no stage code: the stage table (opd_tasks/stages/__init__.py), the config
checks and the CLI read it without loading torch.

The key (`StageInputs.key_parts`, hashed by `storage.keys.cache_key` with the stage's name and version):
- an `ArtifactRef` (or None) is an input artifact: its sha256;
- a `ModelSpec` is an input model: the hash of its files (or of its checkpoint artifact), with its
  `trust_remote_code` when on (`ModelSpec.key_hash`);
- `seed` is the seed;
- any other field (a config section, a flag) is part of the config slice, as JSON;
- fields named in `unkeyed` are read but not keyed (each with its reason beside it).
A record overrides `key_parts` only to leave something out or add a content hash, and says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from opd_tasks.config import (
    AnalysisConfig,
    DataConfig,
    EvaluationConfig,
    GatesConfig,
    RolloutConfig,
    ScoringConfig,
    TeacherContextConfig,
    UpdateConfig,
)
from opd_tasks.method import Bridge, Return, TokenWeighting
from opd_tasks.models import ModelSpec
from storage.hashing import sha256_file, sha256_json
from storage.refs import ArtifactRef


class StageInputs(BaseModel):
    """A stage's inputs; its cache key is derived from the fields (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    unkeyed: ClassVar[frozenset[str]] = frozenset()

    def key_parts(self) -> tuple[dict[str, ArtifactRef | str | None], dict[str, Any], int | None]:
        """(input artifacts and models by content hash, config slice, seed)."""
        artifacts: dict[str, ArtifactRef | str | None] = {}
        config: dict[str, Any] = {}
        seed = None
        for name in type(self).model_fields:
            role, value = field_role(type(self), name), getattr(self, name)
            if role == "seed":
                seed = value
            elif role == "input":
                artifacts[name] = value.key_hash if isinstance(value, ModelSpec) else value
            elif role == "config":
                config[name] = key_slice(value) if isinstance(value, BaseModel) else value
        return artifacts, config, seed


def field_role(cls: type[StageInputs], name: str) -> str:
    """How field `name` enters the key: `unkeyed`, `seed`, `input` (an ArtifactRef or ModelSpec, by content hash;
    None when absent) or `config` (by value)."""
    if name in cls.unkeyed:
        return "unkeyed"
    if name == "seed":
        return "seed"
    ann = cls.model_fields[name].annotation
    return "input" if {ArtifactRef, ModelSpec} & {ann, *getattr(ann, "__args__", ())} else "config"


def key_slice(section: BaseModel) -> Any:
    """A config section as it enters a key: its own `key_slice()` if it has one (backend sections), else JSON."""
    own = getattr(section, "key_slice", None)
    return own() if callable(own) else section.model_dump(mode="json")


# ----------------------------------------------------------------------------------------- one record per stage


#: How the rows of a dataset become prompts (opd_tasks/data.py): 2 = each prompt once (`_unique_prompts`). Part of
#: a local dataset's key, so that a change of the rule changes the prompts' key, not the bytes under an old one.
ROWS_RULE = 2


def dataset_hash(data: DataConfig) -> str | None:
    """The hash of a local dataset file and of `ROWS_RULE` (part of the key), None for the testbed or a hub id."""
    if data.source != "dataset" or data.path is None:
        return None
    p = Path(data.path).expanduser()
    return sha256_json({"file": sha256_file(p), "rows_rule": ROWS_RULE}) if p.is_file() else None


class PromptsInputs(StageInputs):
    """Prompts `offset .. offset + n` of `split`, tokenized with `tokenizer`'s tokenizer (the initial student's),
    at most `max_context` tokens each."""

    data: DataConfig
    teacher_context: TeacherContextConfig = TeacherContextConfig()
    tokenizer: ModelSpec
    split: str
    n: int
    offset: int
    max_context: int | None
    seed: int

    def key_parts(self):
        """also the content hash of a local dataset file (`data.path`), never its path."""
        artifacts, config, seed = super().key_parts()
        artifacts["dataset"] = dataset_hash(self.data)
        return artifacts, config, seed


class RolloutInputs(StageInputs):
    """`rollout.samples_per_prompt` completions of each prompt by `student`; `checker` scores the answers."""

    student: ModelSpec
    prompts: ArtifactRef
    rollout: RolloutConfig
    checker: str
    seed: int


class ScoreInputs(StageInputs):
    """`teacher` scores `rollouts`; `student` is read only to check that the two share one tokenizer."""

    # the student's tokenizer is only compared, never used: the rollouts already pin the student
    unkeyed = frozenset({"student"})

    teacher: ModelSpec
    student: ModelSpec
    rollouts: ArtifactRef
    scoring: ScoringConfig


class GatesInputs(StageInputs):
    """The figures of the gates on `rollouts` and their `scores`; two of them re-score a sample with `student` and
    `teacher`."""

    student: ModelSpec
    teacher: ModelSpec
    rollouts: ArtifactRef
    scores: ArtifactRef
    gates: GatesConfig


class AnalyzeInputs(StageInputs):
    """`student`'s rollouts and `teacher`'s scores of them; `weighting` and `bridge` come from the method
    (opd_tasks/method.py); `label_roles`: the prompts are the testbed's, whose tokens have ground-truth roles."""

    student: ModelSpec
    teacher: ModelSpec
    rollouts: ArtifactRef
    scores: ArtifactRef
    analysis: AnalysisConfig
    weighting: TokenWeighting
    bridge: bool  # generate the teacher's bridge continuation at each divergent position
    label_roles: bool
    seed: int


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


class EvaluateInputs(StageInputs):
    """`model`'s answers to the `prompts` (the eval set), checked by `checker`, and their reverse KL to `teacher`;
    `as_teacher`: `model` is the teacher, answering the prompts with its own context (the headroom check)."""

    model: ModelSpec
    teacher: ModelSpec | None = None  # None: no reverse KL (a model evaluated on its own)
    as_teacher: bool = False
    prompts: ArtifactRef
    evaluation: EvaluationConfig
    checker: str
    seed: int

    def key_parts(self):
        """the seed only when the answers are sampled: a greedy evaluation gives the same answers under every seed,
        so the baseline and the teacher's evaluation are computed once for all the seeds of an experiment."""
        artifacts, config, seed = super().key_parts()
        return artifacts, config, seed if self.evaluation.sampled else None
