"""Stage 1, `rollout`: the student samples completions; per token the sampled id and its log-prob.

Backends behind one interface: `hf` (transformers `generate`, CPU/GPU; opd_tasks/hf.py) and `vllm` (CUDA;
`vllm.LLM` in a child process, opd_tasks/vllm_backend.py, not yet run on a GPU in this repo). Both write the
same `rollouts` table, ordered by (prompt_id, sample_id), with the sampled tokens' raw (temperature-1) log-probs.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from opd_tasks.checkers import CHECKERS
from opd_tasks.common import STAGE_VERSIONS, ModelSpec
from opd_tasks.config import RolloutConfig
from storage.keys import cache_key
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

log = logging.getLogger(__name__)

#: RolloutConfig fields read only by the vllm backend and added after hf rollouts were first keyed; an hf key
#: leaves them out, so that adding them changed no hf key (and invalidated no cached hf rollout).
VLLM_ONLY_FIELDS = ("max_model_len", "enforce_eager")


def rollout_key(student: ModelSpec, prompts: ArtifactRef, cfg: RolloutConfig, seed: int, checker: str) -> str:
    slice_ = cfg.model_dump(mode="json") | {"checker": checker}
    if cfg.backend == "hf":
        for name in VLLM_ONLY_FIELDS:
            del slice_[name]
    return cache_key("rollout", STAGE_VERSIONS["rollout"], {"student": student.sha256, "prompts": prompts},
                     slice_, seed)


def rollout(
    store: ArtifactStore,
    student: ModelSpec,
    prompts: ArtifactRef,
    cfg: RolloutConfig,
    seed: int,
    checker: str = "testbed",
    device: str = "auto",
    progress: bool = True,
) -> ArtifactRef:
    key = rollout_key(student, prompts, cfg, seed, checker)
    if (ref := store.lookup("rollout", key)) is not None:
        return ref
    if cfg.backend == "vllm":  # refuse before any work when vLLM or a GPU is missing
        from opd_tasks.vllm_backend import require_vllm

        require_vllm("rollout.backend", device, cfg.tensor_parallel_size)
    from opd_tasks.hf import Generated, generate, load_causal_lm, load_tokenizer, resolve_device

    check = CHECKERS[checker]
    ptab = store.read_table(prompts, "prompts")
    prompt_ids = ptab.column("prompt_id").to_pylist()
    prompt_tokens = ptab.column("prompt_token_ids").to_pylist()
    answers = ptab.column("answer").to_pylist()
    tok = load_tokenizer(student.path, student.trust_remote_code)
    if cfg.backend == "vllm":
        from opd_tasks import vllm_backend

        recs, info = vllm_backend.generate(
            student.path,
            prompt_tokens,
            eos_token_id=tok.eos_token_id,
            n=cfg.samples_per_prompt,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=seed,
            dtype=student.dtype,
            trust_remote_code=student.trust_remote_code,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            progress=progress,
        )
        log.info("vllm rollout: %s", info)
        gens = [Generated(**r) for r in recs]
    else:
        dev = resolve_device(device)
        model = load_causal_lm(student.path, dev, student.dtype, student.trust_remote_code)
        gens = generate(
            model,
            prompt_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            n=cfg.samples_per_prompt,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            seed=seed,
            desc="rollout",
            progress=progress,
        )
    texts = [tok.decode(g.token_ids, skip_special_tokens=True) for g in gens]
    table = pa.table(
        {
            "prompt_id": [prompt_ids[g.prompt_index] for g in gens],
            "sample_id": pa.array([g.sample_id for g in gens], pa.int32()),
            "prompt_token_ids": pa.array([prompt_tokens[g.prompt_index] for g in gens], pa.list_(pa.int32())),
            "token_ids": pa.array([g.token_ids for g in gens], pa.list_(pa.int32())),
            "logprobs": pa.array([g.logprobs for g in gens], pa.list_(pa.float32())),
            "text": texts,
            "finish_reason": [g.finish_reason for g in gens],
            "reward": pa.array(
                [float(check(t, answers[g.prompt_index])) if answers[g.prompt_index] is not None else None
                 for g, t in zip(gens, texts, strict=True)],
                pa.float32(),
            ),
        }
    )
    meta = {"sequences": len(gens), "tokens": sum(len(g.token_ids) for g in gens),
            "stopped": sum(g.finish_reason == "stop" for g in gens)}
    return store.put_table("rollout", key, "rollouts", table, meta=meta)
