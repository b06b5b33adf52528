"""Stage 2, `score`: the teacher's log-prob of every sampled token, its top-k and its entropy.

Backends: `hf` (teacher forcing with transformers, CPU/GPU) and `vllm` (CUDA; `prompt_logprobs` over prompt +
completion in a child process, opd_tasks/vllm_backend.py, not yet run on a GPU in this repo). Both write the
same `teacher_scores` table; `vllm` writes `teacher_entropy` as null, since vLLM returns only the top-k of each
distribution and the full-vocabulary entropy cannot be recovered from it (docs/scaling.md, vLLM).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from opd_tasks.common import STAGE_VERSIONS, ModelSpec
from opd_tasks.config import ScoringConfig
from opd_tasks.errors import ModelError
from opd_tasks.models import check_tokenizers_match
from storage.keys import cache_key
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

log = logging.getLogger(__name__)

#: ScoringConfig fields read only by the vllm backend, added after hf scores were first keyed; an hf key leaves
#: them out, so that adding them changed no hf key (and invalidated no cached hf scores).
VLLM_ONLY_FIELDS = ("gpu_memory_utilization", "tensor_parallel_size", "max_model_len", "enforce_eager")


def score_key(teacher: ModelSpec, rollouts: ArtifactRef, cfg: ScoringConfig) -> str:
    slice_ = cfg.model_dump(mode="json")
    if cfg.backend == "hf":
        for name in VLLM_ONLY_FIELDS:
            del slice_[name]
    return cache_key("score", STAGE_VERSIONS["score"], {"teacher": teacher.sha256, "rollouts": rollouts},
                     slice_, None)


def score_teacher(
    store: ArtifactStore,
    teacher: ModelSpec,
    student: ModelSpec,
    rollouts: ArtifactRef,
    cfg: ScoringConfig,
    device: str = "auto",
    progress: bool = True,
) -> ArtifactRef:
    key = score_key(teacher, rollouts, cfg)
    if (ref := store.lookup("score", key)) is not None:
        return ref
    if cfg.backend == "vllm":  # refuse before any work when vLLM or a GPU is missing
        from opd_tasks.vllm_backend import require_vllm

        require_vllm("scoring.backend", device, cfg.tensor_parallel_size)
    from opd_tasks.hf import TokenScores, load_causal_lm, load_tokenizer, resolve_device, score_sequences

    t_tok = load_tokenizer(teacher.path, teacher.trust_remote_code)
    s_tok = load_tokenizer(student.path, student.trust_remote_code)
    try:
        check_tokenizers_match(t_tok, s_tok)
    except ModelError as e:
        raise ModelError(f"{e} (teacher {teacher.path}, student {student.path}); on-policy distillation "
                         "needs one shared tokenizer") from None
    roll = store.read_table(rollouts, "rollouts")
    prompts = roll.column("prompt_token_ids").to_pylist()
    comps = roll.column("token_ids").to_pylist()
    if cfg.backend == "vllm":
        from opd_tasks import vllm_backend

        recs, info = vllm_backend.score(
            teacher.path, prompts, comps, top_k=cfg.top_k, dtype=teacher.dtype,
            trust_remote_code=teacher.trust_remote_code, tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager, progress=progress,
        )
        log.info("vllm scoring: %s", info)
        scores = [TokenScores(logprob=r["logprob"], entropy=[], topk_ids=r["topk_ids"],
                              topk_logprobs=r["topk_logprobs"]) for r in recs]
    else:
        dev = resolve_device(device)
        model = load_causal_lm(teacher.path, dev, teacher.dtype, teacher.trust_remote_code)
        scores = score_sequences(model, prompts, comps, pad_token_id=t_tok.pad_token_id, top_k=cfg.top_k,
                                 batch_size=cfg.batch_size, desc="score", progress=progress)
    lengths = np.array([len(c) for c in comps], dtype=np.int64)
    n = int(lengths.sum())
    k = next((len(row) for s in scores for row in s.topk_ids), cfg.top_k)
    if cfg.backend == "vllm":  # no full-vocabulary entropy from vLLM: null, never a top-k stand-in
        entropy = pa.nulls(n, pa.float32())
    else:
        entropy = pa.array(np.fromiter((x for s in scores for x in s.entropy), np.float32, count=n))
    pids = roll.column("prompt_id").to_pylist()
    sids = roll.column("sample_id").to_pylist()
    flat_ids = np.fromiter((i for s in scores for row in s.topk_ids for i in row), np.int32, count=n * k)
    flat_lp = np.fromiter((x for s in scores for row in s.topk_logprobs for x in row), np.float32, count=n * k)
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    table = pa.table(
        {
            "prompt_id": pa.array(np.repeat(np.array(pids, dtype=object), lengths), pa.string()),
            "sample_id": pa.array(np.repeat(np.array(sids, dtype=np.int32), lengths), pa.int32()),
            "pos": pa.array(np.concatenate([np.arange(m) for m in lengths]) if n else [], pa.int32()),
            "token_id": pa.array(np.fromiter((t for c in comps for t in c), np.int32, count=n), pa.int32()),
            "teacher_logprob": pa.array(np.fromiter((x for s in scores for x in s.logprob), np.float32, count=n)),
            "teacher_entropy": entropy,
            "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(flat_ids)),
            "topk_logprobs": pa.ListArray.from_arrays(offsets, pa.array(flat_lp)),
        }
    )
    meta = {"tokens": n, "top_k": k} | ({"backend": "vllm"} if cfg.backend == "vllm" else {})
    return store.put_table("score", key, "teacher_scores", table, meta=meta)
