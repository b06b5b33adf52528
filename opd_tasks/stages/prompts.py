"""Stage 0, `prompts`: the prompts of one iteration (or the eval set) as a `prompts` table.

`datasets` caches under `<root>/cache/datasets` unless HF_DATASETS_CACHE or HF_HOME is set (nothing in ~)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from opd_tasks.config import DataConfig
from opd_tasks.errors import DataError
from opd_tasks.models import ModelSpec
from opd_tasks.stages.registry import StageContext, StageInputs, stage
from storage.hashing import sha256_file
from storage.refs import ArtifactRef


def dataset_hash(data: DataConfig) -> str | None:
    """sha256 of a local dataset file (part of the key), None for the testbed or a hub id."""
    if data.source != "dataset" or data.path is None:
        return None
    p = Path(data.path).expanduser()
    return sha256_file(p) if p.is_file() else None


class PromptsInputs(StageInputs):
    """Prompts `offset .. offset + n` of `split`, tokenized with `tokenizer`'s tokenizer (the initial student's),
    at most `max_context` tokens each."""

    data: DataConfig
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


@stage("prompts", version=2, inputs=PromptsInputs, outputs=("prompts",), gpu=False)
def prompts(ctx: StageContext, x: PromptsInputs) -> ArtifactRef:
    """The prompts of one iteration's slice (or of the eval set), tokenized."""
    from opd_tasks.backends.loaded import LOADED
    from opd_tasks.data import datasets_cache_dir, load_prompts

    tok = LOADED.tokenizer(x.tokenizer)
    records = load_prompts(x.data, tok, split=x.split, n=x.n, seed=x.seed, offset=x.offset,
                           max_context=x.max_context, cache_dir=datasets_cache_dir(ctx.store.root))
    if not records:
        raise DataError(f"no prompts in split {x.split!r} of {x.data.path or 'the testbed'}")
    table = pa.table(
        {
            "prompt_id": [r.prompt_id for r in records],
            "prompt": [r.text for r in records],
            "prompt_token_ids": [list(r.token_ids) for r in records],
            "answer": [r.answer for r in records],
            "source": [r.source for r in records],
        }
    )
    return ctx.put_table("prompts", table, meta={"split": x.split, "n": x.n, "offset": x.offset})
