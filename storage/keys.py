"""Cache keys of stages (DESIGN.md section 3).

key = sha256 of (stage name, stage code version, each input artifact's sha256, the config slice the stage
reads, the seed). No flow-run id, no run name, no iteration number, no paths: a new run with the same inputs
hits the cache, and moving the storage root does not change any key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from storage.errors import ConfigError
from storage.hashing import sha256_json
from storage.refs import ArtifactRef

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _input_hash(name: str, value: ArtifactRef | str | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, ArtifactRef):
        return value.sha256
    if isinstance(value, str) and _HEX64.match(value):
        return value
    raise ConfigError(
        f"cache-key input {name!r} must be an ArtifactRef or a sha256 hex digest, got {value!r} "
        "(never pass a bare path: hash the content)"
    )


def cache_key(
    stage: str,
    code_version: str | int,
    inputs: Mapping[str, ArtifactRef | str | None],
    config: BaseModel | Mapping[str, Any] | None,
    seed: int | None,
) -> str:
    """The content key of one stage execution (64 hex digits)."""
    cfg = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config or {})
    return sha256_json(
        {
            "stage": stage,
            "code_version": str(code_version),
            "inputs": {k: _input_hash(k, v) for k, v in sorted(inputs.items())},
            "config": cfg,
            "seed": seed,
        }
    )
