"""Stage 0, `prompts`: the prompts of one iteration (or the eval set) as a `prompts` table.

`datasets` caches under `<root>/cache/datasets` unless HF_DATASETS_CACHE or HF_HOME is set (nothing in ~)."""

from __future__ import annotations

import pyarrow as pa

from opd_tasks.errors import DataError
from opd_tasks.stages.inputs import PromptsInputs
from opd_tasks.stages.registry import Output, StageContext


def prompts(ctx: StageContext, x: PromptsInputs) -> Output:
    """The prompts of one iteration's slice (or of the eval set), tokenized."""
    from opd_tasks.backends.loaded import LOADED
    from opd_tasks.data import datasets_cache_dir, load_prompts

    tok = LOADED.tokenizer(x.tokenizer)
    records = load_prompts(x.data, tok, split=x.split, n=x.n, seed=x.seed, offset=x.offset,
                           max_context=x.max_context, cache_dir=datasets_cache_dir(ctx.store.root),
                           teacher_context=x.teacher_context)
    if not records:
        raise DataError(f"no prompts in split {x.split!r} of {x.data.path or 'the testbed'}")
    table = pa.table(
        {
            "prompt_id": [r.prompt_id for r in records],
            "prompt": [r.text for r in records],
            "prompt_token_ids": [list(r.token_ids) for r in records],
            "answer": [r.answer for r in records],
            "source": [r.source for r in records],
            "teacher_prompt_token_ids": pa.array([r.teacher_token_ids for r in records], pa.list_(pa.int32())),
        }
    )
    return Output({"prompts": table}, {"split": x.split, "n": x.n, "offset": x.offset})
