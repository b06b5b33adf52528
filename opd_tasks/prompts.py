"""Stage 0, `prompts`: the prompts of one iteration (or the eval set) as a `prompts` table."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from opd_tasks.common import STAGE_VERSIONS, ModelSpec
from opd_tasks.config import DataConfig
from opd_tasks.errors import DataError
from storage.hashing import sha256_file
from storage.keys import cache_key
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


def dataset_hash(data: DataConfig) -> str | None:
    """sha256 of a local dataset file (part of the key), None for the testbed or a hub id."""
    if data.source != "dataset" or data.path is None:
        return None
    p = Path(data.path).expanduser()
    return sha256_file(p) if p.is_file() else None


def prompts_key(data: DataConfig, tokenizer_model: ModelSpec, split: str, n: int, offset: int, seed: int,
                max_context: int | None = None) -> str:
    slice_ = {"data": data.model_dump(mode="json"), "split": split, "n": n, "offset": offset,
              "max_context": max_context}
    return cache_key("prompts", STAGE_VERSIONS["prompts"],
                     {"tokenizer": tokenizer_model.sha256, "dataset": dataset_hash(data)}, slice_, seed)


def prepare_prompts(
    store: ArtifactStore,
    data: DataConfig,
    tokenizer_model: ModelSpec,
    split: str,
    n: int,
    offset: int,
    seed: int,
    max_context: int | None = None,
) -> ArtifactRef:
    """Prompts `offset .. offset+n` of `split`, tokenized with `tokenizer_model`'s tokenizer."""
    from opd_tasks.data import load_prompts
    from opd_tasks.hf import load_tokenizer

    key = prompts_key(data, tokenizer_model, split, n, offset, seed, max_context)
    if (ref := store.lookup("prompts", key)) is not None:
        return ref
    tok = load_tokenizer(tokenizer_model.path, tokenizer_model.trust_remote_code)
    records = load_prompts(data, tok, split=split, n=n, seed=seed, offset=offset, max_context=max_context)
    if not records:
        raise DataError(f"no prompts in split {split!r} of {data.path or 'the testbed'}")
    table = pa.table(
        {
            "prompt_id": [r.prompt_id for r in records],
            "prompt": [r.text for r in records],
            "prompt_token_ids": [list(r.token_ids) for r in records],
            "answer": [r.answer for r in records],
            "source": [r.source for r in records],
        }
    )
    return store.put_table("prompts", key, "prompts", table, meta={"split": split, "n": n, "offset": offset})
