"""Models: resolve a config `ModelRef` to local files with a content hash (`ResolvedModel`), the `ModelSpec` that
stages take (a local directory plus that hash), and loading through the Auto classes.

`testbed:teacher`, `testbed:student` and `testbed:tokenizer` name the committed testbed assets
(opd_tasks/testbed/assets/). Any other path is a local directory, or else a hub id that is fetched with
`huggingface_hub.snapshot_download` (at `revision`) when the machine has internet. `trust_remote_code` is
taken from the ref and is off by default. The hash is `storage.hashing.sha256_tree` of the local files (it
is what goes into cache keys, never the path).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from opd_tasks.config import ModelRef
from opd_tasks.errors import ModelError
from storage.hashing import sha256_tree
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

TESTBED_ASSETS = Path(__file__).resolve().parent / "testbed" / "assets"
TESTBED_REFS = {"testbed:teacher": "teacher", "testbed:student": "student", "testbed:tokenizer": "tokenizer",
                # the mechanism switch's models (data.testbed.fork; `opd bootstrap --fork` builds them)
                "testbed:teacher-fork": "fork/teacher", "testbed:student-consequential": "fork/student-consequential",
                "testbed:student-harmless": "fork/student-harmless"}


#: A checkpoint artifact (the update stage's output) holds the model here (`save_pretrained`: weights, config,
#: tokenizer) and the optimizer, counters and RNG state under CHECKPOINT_STATE_DIR (opd_tasks/training/checkpoint.py).
CHECKPOINT_MODEL_DIR = "model"
CHECKPOINT_STATE_DIR = "state"


class ModelSpec(BaseModel):
    """A model as stages see it: a local directory plus the hash of its content (what cache keys hold).

    Made from a config `ModelRef` by `spec_of(ref)` or from a checkpoint artifact by `ModelSpec.from_checkpoint`.
    JSON-serialisable, so it can be a Prefect task parameter.
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


class ResolvedModel(BaseModel):
    """A model ref made concrete: where its files are and what they hash to."""

    path: str  # the ref's path as written (e.g. "testbed:teacher" or a hub id)
    local_dir: str
    revision: str | None = None
    sha256: str
    trust_remote_code: bool = False


def _local_dir(ref: ModelRef) -> Path:
    if ref.path.startswith("testbed:"):
        if ref.path not in TESTBED_REFS:
            raise ModelError(f"unknown testbed model {ref.path!r}; use one of {sorted(TESTBED_REFS)}")
        local = TESTBED_ASSETS / TESTBED_REFS[ref.path]
        if not (local / "config.json").is_file() and not (local / "tokenizer.json").is_file():
            raise ModelError(
                f"testbed model {ref.path!r}: {local} is missing; build it with "
                + ("`opd bootstrap --fork`" if "/" in TESTBED_REFS[ref.path] else "`opd bootstrap`")
            )
        return local
    local = Path(ref.path).expanduser()
    if local.is_dir():
        return local
    looks_local = ref.path.startswith(("/", ".", "~")) or ref.path.count("/") > 1 or local.exists()
    if looks_local:
        raise ModelError(f"model directory {local} does not exist (model path {ref.path!r})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.path, revision=ref.revision))
    except Exception as e:  # noqa: BLE001 - any hub failure is a model error with its cause
        raise ModelError(
            f"model {ref.path!r} is not a local directory and could not be fetched from the hub "
            f"(revision {ref.revision!r}): {type(e).__name__}: {e}"
        ) from e


def resolve_model(ref: ModelRef) -> ResolvedModel:
    """The local directory, revision and content hash of a model ref. ModelError names a missing path."""
    local = _local_dir(ref)
    return ResolvedModel(
        path=ref.path,
        local_dir=str(local),
        revision=ref.revision,
        sha256=sha256_tree(local),
        trust_remote_code=ref.trust_remote_code,
    )


def spec_of(ref: ModelRef) -> ModelSpec:
    """The `ModelSpec` of a config model ref (resolved to local files and hashed)."""
    r = resolve_model(ref)
    return ModelSpec(path=r.local_dir, sha256=r.sha256, trust_remote_code=r.trust_remote_code, dtype=ref.dtype)


def load_tokenizer(ref: ModelRef) -> Any:
    """AutoTokenizer of the ref (`opd_tasks.backends.hf.load_tokenizer`: EOS required, PAD = EOS when missing)."""
    from opd_tasks.backends.hf import load_tokenizer as load_tokenizer_dir

    return load_tokenizer_dir(_local_dir(ref), ref.trust_remote_code)


def load_model(ref: ModelRef, device: str = "cpu", dtype: str | None = None) -> Any:
    """AutoModelForCausalLM of the ref on `device`, in eval mode (`opd_tasks.backends.hf.load_causal_lm`).

    `dtype` overrides `ref.dtype`; "auto" means float32 on CPU and bfloat16 on CUDA.
    """
    import torch

    from opd_tasks.backends.hf import load_causal_lm

    return load_causal_lm(_local_dir(ref), torch.device(device), dtype or ref.dtype, ref.trust_remote_code)


def check_tokenizers_match(teacher_tok: Any, student_tok: Any) -> None:
    """ModelError naming what differs: vocab size, vocab content, or the BOS/EOS/PAD ids."""
    problems = []
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(tv) != len(sv):
        problems.append(f"vocab size: teacher {len(tv)} vs student {len(sv)}")
    diff = sorted(set(tv.items()) ^ set(sv.items()), key=lambda kv: kv[1])
    if diff:
        shown = ", ".join(f"{tok!r}: teacher {tv.get(tok)} vs student {sv.get(tok)}" for tok in dict(diff[:5]))
        problems.append(f"vocab content: {len(diff)} differing (token, id) entries, e.g. {shown}")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        t, s = getattr(teacher_tok, name, None), getattr(student_tok, name, None)
        if t != s:
            problems.append(f"{name}: teacher {t} vs student {s}")
    if problems:
        raise ModelError("teacher and student tokenizers differ: " + "; ".join(problems))
