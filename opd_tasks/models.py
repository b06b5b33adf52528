"""Models: resolve a config `ModelRef` to local files with a content hash (`ResolvedModel`), the `ModelSpec` that
stages take (a local directory plus that hash), and loading through the Auto classes.

`testbed:teacher`, `testbed:student` and `testbed:tokenizer` name the committed testbed assets
(opd_tasks/testbed/assets/). Any other path is a local directory; only a path of the shape `org/name` with no
such local directory is a hub id, fetched with `huggingface_hub.snapshot_download` (at `revision`) when the
machine has internet. `imported:<name>` names a model `opd models import` wrote under the storage root
(opd_tasks/model_import.py). `trust_remote_code` is taken from the ref and is off by default. The hash is
`storage.hashing.sha256_tree` of the local files (it is what goes into cache keys, never the path).

Before a model is hashed or loaded, `check_model_dir` reads what is cheap to check (config.json present, the
JSON and vocab files UTF-8 JSON/text, each safetensors header and size) so that a damaged directory is a
`ModelError` naming the file, not a traceback from deep in transformers (ModelError is never retried).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from opd_tasks.config import ModelRef
from opd_tasks.errors import ModelError
from opd_tasks.model_import import IMPORTED_PREFIX, RECORD, imported_dir, read_record
from storage.hashing import sha256_json, sha256_tree
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

#: A hub model id: `org/name` exactly (a path of any other shape is only ever a local directory).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")


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
    def from_checkpoint(cls, store: ArtifactStore, ref: ArtifactRef, parent: ModelSpec | None = None) -> ModelSpec:
        """The model of checkpoint `ref`; `parent`, the spec it was trained from, passes on its trust_remote_code
        and dtype (a custom-code student stays loadable after its first update)."""
        base = store.checkpoint_dir(ref, needs=(f"{CHECKPOINT_MODEL_DIR}/",))  # verifies every file's hash
        carried = {"trust_remote_code": parent.trust_remote_code, "dtype": parent.dtype} if parent else {}
        return cls(path=str(base / CHECKPOINT_MODEL_DIR), sha256=ref.sha256, checkpoint=ref, **carried)

    def in_store(self, store: ArtifactStore) -> ModelSpec:
        """This spec with its files in `store`'s root. A checkpoint spec's path is where the process that made it
        found the checkpoint; a stage in another process or pod, with a root of its own, re-resolves it here,
        which pulls the checkpoint from the store's remote when only the remote has it (and verifies it). A spec
        already pointing into `store`'s copy, or a config model (`spec_of`), is returned as it is."""
        if self.checkpoint is None:
            return self
        here = store.layout.artifact_dir(self.checkpoint.stage, self.checkpoint.key) / CHECKPOINT_MODEL_DIR
        if Path(self.path) == here and here.is_dir():
            return self
        return ModelSpec.from_checkpoint(store, self.checkpoint, parent=self)

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @property
    def key_hash(self) -> str:
        """What a cache key holds for this model: the hash of its files, and whether its own code runs (a model
        loaded with its code and the same files loaded as a built-in class may compute different things; off, the
        default, adds nothing, so no key changes)."""
        if not self.trust_remote_code:
            return self.sha256
        return sha256_json({"sha256": self.sha256, "trust_remote_code": True})


class ResolvedModel(BaseModel):
    """A model ref made concrete: where its files are and what they hash to."""

    path: str  # the ref's path as written (e.g. "testbed:teacher" or a hub id)
    local_dir: str
    revision: str | None = None
    sha256: str
    trust_remote_code: bool = False


def _local_dir(ref: ModelRef, root: Path | None = None) -> Path:
    if ref.path.startswith(IMPORTED_PREFIX):
        from storage.layout import default_root

        local = imported_dir(Path(root) if root is not None else default_root(), ref.path[len(IMPORTED_PREFIX):])
        if not (local / RECORD).is_file():
            raise ModelError(f"model {ref.path!r}: nothing imported at {local.absolute()}; import it first with "
                             "`opd models import SOURCE` (make real imports SmolLM2-135M-Instruct)")
        return local
    if ref.path.startswith("testbed:"):
        if ref.path not in TESTBED_REFS:
            raise ModelError(f"unknown testbed model {ref.path!r}; use one of {sorted(TESTBED_REFS)}")
        local = TESTBED_ASSETS / TESTBED_REFS[ref.path]
        if not (local / "config.json").is_file() and not (local / "tokenizer.json").is_file():
            raise ModelError(
                f"testbed model {ref.path!r}: {local} is missing; build it with "
                + ("`opd bootstrap --fork --replace-shipped`" if "/" in TESTBED_REFS[ref.path]
                   else "`opd bootstrap --replace-shipped`")
            )
        return local
    local = Path(ref.path).expanduser()
    if local.is_dir():
        return local
    where = local.absolute()
    if local.exists():
        raise ModelError(f"model path {ref.path!r} is a file ({where}); models.*.path must be a model directory")
    if not _HUB_ID.match(ref.path):
        raise ModelError(f"model directory {where} does not exist (model path {ref.path!r}); fix models.*.path "
                         "(a hub model is named 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.path, revision=ref.revision))
    except Exception as e:  # noqa: BLE001 - any hub failure is a model error with its cause
        raise ModelError(
            f"model {ref.path!r} is not a local directory (looked at {where}) and not fetchable from the hub: it "
            f"could not be fetched at revision {ref.revision!r} ({type(e).__name__}: {e}); fix models.*.path, or "
            "check the hub id, the revision and the network (HF_HUB_OFFLINE)"
        ) from e


#: Text files of a model directory besides its *.json files (tokenizer vocabularies).
_TEXT_FILES = ("merges.txt", "vocab.txt")


def check_model_dir(local: Path, need_config: bool = True, trust_remote_code: bool = False) -> None:
    """ModelError naming the file and what to do: config.json missing (when `need_config`), a JSON or vocab file
    that is not UTF-8 or not JSON, a safetensors file whose header is corrupt or whose data is cut short, a shard
    that a `*.safetensors.index.json` names but that is missing, a model or tokenizer that ships its own code
    (an `auto_map` in config.json or tokenizer_config.json) when `trust_remote_code` is off: transformers would
    then load it as a built-in class, or fail, instead of running the code the model was made for. Reads the
    headers only, not the weights."""
    if need_config and not (local / "config.json").is_file():
        raise ModelError(f"model directory {local} has no config.json, so it is not a transformers model; point "
                         "models.*.path at the directory save_pretrained wrote, or re-download the model")
    redo = "re-download or re-save the model"
    for f in sorted(p for p in local.iterdir() if p.is_file()):
        if f.suffix == ".json" or f.name in _TEXT_FILES:
            try:
                text = f.read_text(encoding="utf-8")
                content = json.loads(text) if f.suffix == ".json" else None
            except UnicodeDecodeError as e:
                raise ModelError(f"{f} is not UTF-8 (byte {e.start}: {e.reason}); {redo}") from None
            except json.JSONDecodeError as e:
                raise ModelError(f"{f} is not valid JSON ({e}); {redo}") from None
            if (f.name in ("config.json", "tokenizer_config.json") and isinstance(content, dict)
                    and content.get("auto_map") and not trust_remote_code):
                raise ModelError(f"{f} names the model's own code (auto_map: {sorted(content['auto_map'])}), and "
                                 "opd runs a model's code only when its config says so: set trust_remote_code: "
                                 "true on this model (models.teacher / models.student) if you trust the code")
            if f.name.endswith(".safetensors.index.json") and isinstance(content, dict):
                missing = sorted({s for s in content.get("weight_map", {}).values() if not (local / s).is_file()})
                if missing:
                    raise ModelError(f"{f} names weight shards missing from {local}: {missing}; {redo}")
        elif f.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(f), framework="numpy"):
                    pass
            except Exception as e:  # noqa: BLE001 - SafetensorError (truncated, bad header) or OSError
                raise ModelError(f"{f} is not a valid safetensors file ({e}): truncated or corrupt; {redo}") from None


def resolve_model(ref: ModelRef, need_config: bool = False, root: Path | None = None) -> ResolvedModel:
    """The local directory, revision and content hash of a model ref, its files checked (`check_model_dir`;
    config.json required when `need_config`; an imported model's hash against its import record). ModelError
    names a missing path or a damaged file. `root`: the storage root `imported:` names resolve under."""
    local = _local_dir(ref, root)
    check_model_dir(local, need_config, ref.trust_remote_code)
    try:
        digest = sha256_tree(local)
    except OSError as e:  # e.g. a hub cache symlink whose blob is gone, a file we may not read
        raise ModelError(f"cannot read {e.filename} of model {ref.path!r} ({e.strerror}); re-download the model "
                         "or fix the file's permissions") from e
    record = read_record(local)
    if record is not None and record.get("content_sha256") != digest:
        raise ModelError(f"model {ref.path!r} ({local}) changed since it was imported: its files hash to "
                         f"{digest[:12]}, the import recorded {str(record.get('content_sha256'))[:12]}; import it "
                         "again (remove the directory first)")
    return ResolvedModel(
        path=ref.path,
        local_dir=str(local),
        revision=ref.revision,
        sha256=digest,
        trust_remote_code=ref.trust_remote_code,
    )


def spec_of(ref: ModelRef, root: Path | None = None) -> ModelSpec:
    """The `ModelSpec` of a config model ref (resolved to local files, checked and hashed)."""
    r = resolve_model(ref, need_config=True, root=root)
    return ModelSpec(path=r.local_dir, sha256=r.sha256, trust_remote_code=r.trust_remote_code, dtype=ref.dtype)


def load_tokenizer(ref: ModelRef, root: Path | None = None) -> Any:
    """AutoTokenizer of the ref (`opd_tasks.backends.hf.load_tokenizer`: EOS required, PAD = EOS when missing)."""
    from opd_tasks.backends.hf import load_tokenizer as load_tokenizer_dir

    local = _local_dir(ref, root)
    check_model_dir(local, need_config=False, trust_remote_code=ref.trust_remote_code)
    return load_tokenizer_dir(local, ref.trust_remote_code)


def load_model(ref: ModelRef, device: str = "cpu", dtype: str | None = None, root: Path | None = None) -> Any:
    """AutoModelForCausalLM of the ref on `device`, in eval mode (`opd_tasks.backends.hf.load_causal_lm`).

    `dtype` overrides `ref.dtype`; "auto" means float32 on CPU and bfloat16 on CUDA.
    """
    import torch

    from opd_tasks.backends.hf import load_causal_lm

    local = _local_dir(ref, root)
    check_model_dir(local, trust_remote_code=ref.trust_remote_code)
    return load_causal_lm(local, torch.device(device), dtype or ref.dtype, ref.trust_remote_code)


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


def cache_remote_code_under(root: str | Path) -> None:
    """Keep the modules of `trust_remote_code` models under `<root>/cache/modules`, not ~/.cache/huggingface, unless
    the user set HF_MODULES_CACHE or HF_HOME. transformers reads the variable once, when it is imported, so this
    takes effect only in a process that has not imported it yet (a run calls it before any stage: `open_run`); in
    one that has, nothing changes."""
    if os.environ.get("HF_MODULES_CACHE") or os.environ.get("HF_HOME") or "transformers" in sys.modules:
        return
    os.environ["HF_MODULES_CACHE"] = str(Path(root).resolve() / "cache" / "modules")
