"""Stage 2, `score`: the teacher's log-prob of every sampled token, its top-k and its entropy.

The backend (`scoring.backend`: `hf` or `vllm`, opd_tasks/backends/) teacher-forces prompt + completion. Both
write the same `teacher_scores` table; `vllm` writes `teacher_entropy` as null, since vLLM returns only the top-k
of each distribution and the full-vocabulary entropy cannot be recovered from it (docs/scaling.md, vLLM).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.data import teacher_prompts
from opd_tasks.errors import ModelError
from opd_tasks.models import check_tokenizers_match
from opd_tasks.stages.inputs import ScoreInputs
from opd_tasks.stages.registry import Output, StageContext


def length_order(ctx: StageContext, x: ScoreInputs) -> list[int]:
    """The units of a scoring shard: the rollout's sequences shortest first (ties by row), the order in which
    `hf.score_sequences` batches them, so that a shard's batches are the unsharded stage's."""
    roll = ctx.store.read_table(x.rollouts, "rollouts", columns=["prompt_token_ids", "token_ids"])
    lengths = pc.add(pc.list_value_length(roll.column("prompt_token_ids")),
                     pc.list_value_length(roll.column("token_ids"))).to_pylist()
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def sequences_per_batch(x: ScoreInputs) -> int:
    return x.scoring.batch_size


def score(ctx: StageContext, x: ScoreInputs, rows: list[int] | None) -> dict[str, pa.Table]:
    """The `teacher_scores` rows of the sequences `rows` (None: every one), in row order."""
    from opd_tasks.backends import backend_for
    from opd_tasks.backends.loaded import LOADED

    backend = backend_for(x.scoring, ctx.device, "scoring.backend")  # refuses before any work if it cannot run
    t_tok = LOADED.tokenizer(x.teacher)
    s_tok = LOADED.tokenizer(x.student)
    try:
        check_tokenizers_match(t_tok, s_tok)
    except ModelError as e:
        raise ModelError(f"{e} (teacher {x.teacher.path}, student {x.student.path}); on-policy distillation "
                         "needs one shared tokenizer") from None
    roll = ctx.store.read_table(x.rollouts, "rollouts")
    roll = roll if rows is None else roll.take(sorted(rows))
    # the teacher reads its own prompt (its context + the student's) where it has a context, and scores exactly
    # the student's completion tokens
    prompts = teacher_prompts(roll)
    comps = roll.column("token_ids").to_pylist()
    scores = backend.score(x.teacher, prompts, comps, pad_token_id=t_tok.pad_token_id, top_k=x.scoring.top_k,
                           desc="score", progress=ctx.progress)
    lengths = np.array([len(c) for c in comps], dtype=np.int64)
    n = int(lengths.sum())
    k = next((len(row) for s in scores for row in s.topk_ids), x.scoring.top_k)
    if backend.full_entropy:
        entropy = pa.array(np.fromiter((e for s in scores for e in s.entropy), np.float32, count=n))
    else:  # no full-vocabulary entropy: null, never a top-k stand-in
        entropy = pa.nulls(n, pa.float32())
    pids = roll.column("prompt_id").to_pylist()
    sids = roll.column("sample_id").to_pylist()
    flat_ids = np.fromiter((i for s in scores for row in s.topk_ids for i in row), np.int32, count=n * k)
    flat_lp = np.fromiter((v for s in scores for row in s.topk_logprobs for v in row), np.float32, count=n * k)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    return {"teacher_scores": pa.table(
        {
            "prompt_id": pa.array(np.repeat(np.array(pids, dtype=object), lengths), pa.string()),
            "sample_id": pa.array(np.repeat(np.array(sids, dtype=np.int32), lengths), pa.int32()),
            "pos": pa.array(np.concatenate([np.arange(m) for m in lengths]) if n else [], pa.int32()),
            "token_id": pa.array(np.fromiter((t for c in comps for t in c), np.int32, count=n), pa.int32()),
            "teacher_logprob": pa.array(np.fromiter((v for s in scores for v in s.logprob), np.float32, count=n)),
            "teacher_entropy": entropy,
            "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids)),
            "topk_logprobs": pa.ListArray.from_arrays(offsets, pa.array(flat_lp)),
        }
    )}


def summarize(ctx: StageContext, x: ScoreInputs, tables: dict[str, pa.Table]) -> Output:
    """The scores with their summary: tokens, k, and the backend when it is not hf."""
    table = tables["teacher_scores"]
    k = next((len(row) for row in table.column("topk_ids").slice(0, 1).to_pylist()), x.scoring.top_k)
    backend = x.scoring.backend  # the backend's name: `hf` or `vllm`
    meta = {"tokens": table.num_rows, "top_k": k} | ({"backend": backend} if backend != "hf" else {})
    return Output(tables, meta)
