"""What computed an artifact: the versions of the libraries whose numerics or bytes it depends on, and the device.

Every artifact's manifest records this as its `provenance` (storage/store.py), outside its sha256: a patch release
of a library that computes the same bytes gives the same artifact and the same downstream cache keys. Where a
release may compute different numbers (a new minor version of torch or transformers), a cache hit made under it is
still reused, with one warning that names both versions (`drift`, the stage runner in opd_tasks/pipeline.py);
`opd run --refresh STAGE` recomputes. docs/operations.md ("What is in a cache key") says what is keyed and what not.
"""

from __future__ import annotations

import platform
import sys
from functools import cache
from importlib.metadata import PackageNotFoundError, version

#: The files `save_pretrained` stamps with the writing library's version (`"transformers_version": "5.25.0"`): a
#: checkpoint keeps its source's stamp (opd_tasks/training/checkpoint.py), an import drops it (model_import.py).
VERSION_STAMPED = ("config.json", "generation_config.json")
VERSION_FIELD = "transformers_version"

#: The libraries a manifest names: what computes tensors (torch, transformers, vllm) and writes Parquet (pyarrow).
LIBRARIES = ("torch", "transformers", "pyarrow", "vllm")
#: Those whose minor version, when it differs from a cache hit's, is worth a warning (their kernels compute it).
WATCHED = ("torch", "transformers")


@cache
def _installed(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    """Python and each of LIBRARIES that this process computes with; vllm only where it was loaded (the vllm
    backend imports it; an hf-only process never does)."""
    out = {"python": platform.python_version(), "opd_pipeline": _installed("opd-pipeline") or "unknown"}
    for lib in LIBRARIES:
        if lib == "vllm" and "vllm" not in sys.modules:
            continue
        if (v := _installed(lib)) is not None:
            out[lib] = v
    return out


def device_label(device: str) -> str:
    """The device a stage asked for, as computed on: `cuda:0 (NVIDIA H100 80GB HBM3)` or
    `cpu (AVX512, 2 threads)` (on the CPU the float results depend on the kernel family and thread count)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        d = torch.device(device)
        index = d.index if d.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def provenance(device: str) -> dict[str, str]:
    """The manifest's `provenance` of an artifact computed here on `device`."""
    return {**library_versions(), "device": device_label(device)}


def _minor(v: str) -> tuple[str, ...]:
    return tuple(v.split("+")[0].split(".")[:2])


def drift(recorded: dict | None) -> list[tuple[str, str, str]]:
    """(library, the artifact's version, this process's) for each of WATCHED whose major.minor differs between a
    stored artifact's provenance and this environment; empty for an artifact without provenance (made before it
    was recorded)."""
    if not recorded:
        return []
    here = library_versions()
    return [(lib, recorded[lib], here[lib]) for lib in WATCHED
            if recorded.get(lib) and here.get(lib) and _minor(recorded[lib]) != _minor(here[lib])]


def describe(recorded: dict | None) -> str:
    """One line for a manifest's provenance: `torch 2.13.0+cpu, transformers 5.25.0, ... on cpu (AVX512, 2 threads)`."""
    if not recorded:
        return "not recorded (made before manifests recorded it)"
    libs = ", ".join(f"{lib} {recorded[lib]}" for lib in ("python", *LIBRARIES, "opd_pipeline") if lib in recorded)
    return f"{libs} on {recorded.get('device', 'an unrecorded device')}"


def environments(manifests) -> list[tuple[str, int]]:
    """(`describe` line, how many artifacts) for each distinct provenance among `manifests`, most common first."""
    from collections import Counter

    counts = Counter(describe(m.get("provenance")) for m in manifests)
    return counts.most_common()
