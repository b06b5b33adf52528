"""vLLM vs hf on one GPU, on the same batch: rollout and teacher-scoring throughput, and bf16 score parity.

    python -m bench.vllm_check --out results.json [--prompts 256] [--samples 8] [--max-new-tokens 64]

Needs vLLM (>= 0.11) and a CUDA GPU (run by scripts/gpu_check.sh when vLLM is importable). NOT YET RUN: no
machine of this project has had both. The testbed models in their default dtype (`auto` = bf16 on CUDA for
both backends). For each backend: completion tokens per second of generation alone and of the whole stage
(model load / engine start included: the vllm backend starts a fresh engine in a child process every stage).
Then the hf rollout's tokens scored by the teacher with both backends: their max / mean |diff| of the sampled
tokens' teacher log-probs and top-1 agreement (bf16 on both sides: not a pass/fail check; the float32 parity
tests are tests/gpu/test_backend_parity.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    args = ap.parse_args(argv)
    from opd_tasks.backends import vllm as vllm_backend
    from opd_tasks.backends.hf import generate, load_causal_lm, score_sequences
    from opd_tasks.config import DataConfig
    from opd_tasks.config_files import load_config
    from opd_tasks.pipeline import resolve_models
    from opd_tasks.stages import PROMPTS, PromptsInputs
    from storage.store import ArtifactStore

    vllm_backend.require_vllm("rollout.backend", "cuda")
    res: dict = {"torch": torch.__version__, "vllm": vllm_backend.vllm_version(), "python": platform.python_version(),
                 "gpu": torch.cuda.get_device_name(0), "prompts": args.prompts, "samples": args.samples,
                 "max_new_tokens": args.max_new_tokens, "dtype": "auto (bf16 on CUDA)"}
    models = resolve_models(load_config())
    teacher, student = models.teacher, models.initial_student
    with tempfile.TemporaryDirectory(prefix="opd-vllm-check-") as tmp:
        store = ArtifactStore(tmp)
        pref = PROMPTS(store, PromptsInputs(data=DataConfig(), tokenizer=student, split="train", n=args.prompts,
                                            offset=0, max_context=None, seed=0))
        prompts = store.read_table(pref, "prompts").column("prompt_token_ids").to_pylist()
    gen_kw = dict(n=args.samples, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, seed=0)

    # --- rollout: hf
    t0 = time.perf_counter()
    model = load_causal_lm(student.path, torch.device("cuda"), student.dtype)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    gens = generate(model, prompts, eos_token_id=2, pad_token_id=0, batch_size=512, progress=False, **gen_kw)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    del model
    hf_tokens = sum(len(g.token_ids) for g in gens)
    res["rollout_hf"] = {"tokens": hf_tokens, "load_s": t1 - t0, "generate_s": t2 - t1,
                         "generate_tokens_per_s": hf_tokens / (t2 - t1), "stage_tokens_per_s": hf_tokens / (t2 - t0)}
    # --- rollout: vllm (fresh engine in a child process, as the stage runs it)
    t0 = time.perf_counter()
    recs, meta = vllm_backend.generate(student.path, prompts, eos_token_id=2, dtype=student.dtype, progress=False,
                                       **gen_kw)
    t1 = time.perf_counter()
    v_tokens = sum(len(r["token_ids"]) for r in recs)
    res["rollout_vllm"] = {"tokens": v_tokens, "engine_start_s": meta["engine_seconds"],
                           "generate_s": meta["run_seconds"], "stage_s": t1 - t0,
                           "generate_tokens_per_s": v_tokens / meta["run_seconds"],
                           "stage_tokens_per_s": v_tokens / (t1 - t0)}
    # --- scoring the hf rollout's tokens with both backends
    p_all = [prompts[g.prompt_index] for g in gens]
    c_all = [g.token_ids for g in gens]
    t0 = time.perf_counter()
    tm = load_causal_lm(teacher.path, torch.device("cuda"), teacher.dtype)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    ref = score_sequences(tm, p_all, c_all, pad_token_id=0, top_k=args.top_k, batch_size=256, progress=False)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    del tm
    res["score_hf"] = {"tokens": hf_tokens, "load_s": t1 - t0, "score_s": t2 - t1,
                       "score_tokens_per_s": hf_tokens / (t2 - t1), "stage_tokens_per_s": hf_tokens / (t2 - t0)}
    t0 = time.perf_counter()
    got, meta = vllm_backend.score(teacher.path, p_all, c_all, top_k=args.top_k, dtype=teacher.dtype,
                                   progress=False)
    t1 = time.perf_counter()
    res["score_vllm"] = {"tokens": hf_tokens, "engine_start_s": meta["engine_seconds"],
                         "score_s": meta["run_seconds"], "stage_s": t1 - t0,
                         "score_tokens_per_s": hf_tokens / meta["run_seconds"],
                         "stage_tokens_per_s": hf_tokens / (t1 - t0)}
    a = np.concatenate([np.asarray(r.logprob) for r in ref])
    b = np.concatenate([np.asarray(r["logprob"]) for r in got])
    top1 = [x[0] == y[0] for r, g in zip(ref, got, strict=True) for x, y in zip(r.topk_ids, g["topk_ids"],
                                                                                 strict=True)]
    res["score_parity_bf16"] = {"max_abs": float(np.abs(a - b).max()), "mean_abs": float(np.abs(a - b).mean()),
                                "top1_agreement": float(np.mean(top1))}
    for name in ("rollout_hf", "rollout_vllm", "score_hf", "score_vllm"):
        r = res[name]
        rate = r.get("generate_tokens_per_s", r.get("score_tokens_per_s"))
        print(f"{name}: {rate:,.0f} tokens/s ({r['stage_tokens_per_s']:,.0f} tokens/s with load / engine start)",
              flush=True)
    print("score parity (bf16, vllm vs hf):", res["score_parity_bf16"], flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
