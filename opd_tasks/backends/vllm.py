"""The `vllm` backend of the rollout and scoring stages: `vllm.LLM` on CUDA, same outputs as the `hf` backend.

NOT RUN AGAINST REAL vLLM IN THIS REPOSITORY YET. The code was written against the source of vLLM 0.11.0 (the
tag of the worker image, docker/Dockerfile) and checked only by unit tests of the mapping functions on
hand-built objects shaped like vLLM's outputs; the parity tests against `hf` (tests/gpu/) skip where vLLM or a
CUDA GPU is missing, which has been everywhere so far. See docs/scaling.md, section "vLLM".

Design:
- Each stage call builds a fresh engine over the model directory in a CHILD PROCESS (multiprocessing `spawn`),
  runs, writes its results and exits, so that all GPU memory is returned between stages and the new student
  weights of every iteration are what the engine loads. Only JSON goes in (`job.json`: token ids, sampling
  settings) and an Arrow IPC file plus JSON come back; nothing is pickled from disk.
- No engine process outlives a call: the engine core runs inside the child (`VLLM_ENABLE_V1_MULTIPROCESSING=0`),
  the child leads its own process group, shuts the engine down after writing its result, and the parent kills
  the whole group (tensor-parallel workers included) before it reaps the child, however the child ended. The
  parent waits at most JOB_TIMEOUT_S for the call, and EXIT_GRACE_S after the result or error is written.
- Prompts go in as token ids (`TokensPrompt`), never re-tokenized; vLLM's tokenizer is not even loaded
  (`skip_tokenizer_init=True`, `detokenize=False`): every EOS id the model declares (`hf.stop_token_ids`) is
  passed as a stop token id, and text is decoded by the caller with the model's own tokenizer, as for `hf`.
- Memory: the KV cache is capped at what the job can use when that is small (`kv_cache_cap`; a tiny model would
  otherwise get millions of blocks), `max_model_len` defaults to the job's longest sequence, and scoring runs
  at most SCORE_MAX_BATCHED_TOKENS tokens per step (its `prompt_logprobs` are outside vLLM's profiling).
- Log-probs are of the model's raw distribution (`logprobs_mode="raw_logprobs"`, vLLM V1's default, set
  explicitly): log-softmax of the unmodified logits, before temperature / top-p. That is what `hf.generate`
  records (`output_logits`, raw) and what the update recomputes.
- `generation_config="vllm"`: the model's generation_config.json sampling defaults are ignored, as `hf`
  ignores them (its `max_new_tokens` would otherwise cap every request). Its EOS ids are among the stop ids
  anyway, so whatever vLLM adds from it stops nowhere that `hf` does not.
- dtype: ModelSpec.dtype, with "auto" = bfloat16, which is what `hf.load_causal_lm` uses on CUDA.
- Teacher scoring uses `prompt_logprobs=k` over prompt + completion (one generated token, discarded). vLLM
  gives no full-vocabulary entropy, so `teacher_entropy` is written as null (the column is nullable; nothing
  downstream computes with it; docs/scaling.md).

The pure functions (`rollout_records`, `score_record`, `topk_at`, the Arrow (de)serialisers, `request_seed`,
`engine_kwargs`, `kv_cache_need`, `kv_cache_cap`) take plain values or duck-typed objects with vLLM's attribute
names and are unit-tested (tests/unit/test_vllm_backend.py, tests/unit/test_vllm_backend_process.py). vLLM itself
is imported only inside the child process.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from opd_tasks.errors import ConfigError, ModelError, TransientError

#: The vLLM release whose source this module was written against (not run: see the module docstring).
CHECKED_VLLM = "0.11.0"
#: Oldest release accepted: V1 engine only (V0 returned temperature-processed log-probs), `logprobs_mode`.
MIN_VLLM = (0, 11)
#: vLLM's own default cap on returned log-probs per token (`max_logprobs`); raised to top_k when larger.
VLLM_DEFAULT_MAX_LOGPROBS = 20
#: Seconds a child may take to exit after it has written its result (or its error) before its process group is
#: killed: engine shutdown has been known to hang, and the result is complete by then.
EXIT_GRACE_S = 60.0
#: Seconds a whole engine call (start, requests, result) may take before the child's process group is killed and
#: the call fails with a TransientError.
JOB_TIMEOUT_S = 6 * 3600.0
#: Tokens per engine step when scoring (`max_num_batched_tokens`; chunked prefill splits longer sequences).
#: `prompt_logprobs` turn every scheduled token's logits into fp32 log-probs outside vLLM's memory profiling,
#: about 8 bytes x vocabulary per token: 2.5 GB per 2,048 tokens at Qwen3's vocabulary of 151,936.
SCORE_MAX_BATCHED_TOKENS = 2048
#: The most sequences vLLM V1 runs at once by default (`max_num_seqs`, on the largest GPUs): the KV cache that a
#: job needs is sized for at most this many.
VLLM_MAX_NUM_SEQS = 1024
#: Tokens per KV-cache block (vLLM's default on CUDA).
KV_BLOCK_TOKENS = 16
#: The KV cache is capped at what the job needs only where that need is at most this share of what vLLM could
#: give it (gpu_memory_utilization x GPU memory - weights); elsewhere vLLM sizes it (a cap above the real budget
#: would fail at allocation, since `num_gpu_blocks_override` replaces vLLM's own figure).
KV_CAP_SHARE = 0.5

_DTYPES = {"auto": "bfloat16", "bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


# ----------------------------------------------------------------------------------- availability


def _release(version: str) -> tuple[int, ...] | None:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release
    except InvalidVersion:
        return None


def vllm_version() -> str | None:
    """The installed vLLM's version, or None when `import vllm` cannot succeed (checked without importing)."""
    if importlib.util.find_spec("vllm") is None:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return "unknown"


def require_vllm(field: str, device: str, tensor_parallel_size: int = 1) -> None:
    """ConfigError naming `field` (e.g. `rollout.backend`) and every missing piece, unless vLLM >= 0.11 is
    installed and torch sees at least `tensor_parallel_size` CUDA devices. Cheap: imports neither vLLM nor
    creates a CUDA context; called before a stage does any work."""
    section = field.split(".")[0]
    problems = []
    if device == "cpu":
        problems.append("device is 'cpu', and vLLM runs on CUDA GPUs only (set device: auto or cuda)")
    ver = vllm_version()
    if ver is None:
        problems.append("the vLLM package is not importable here (install the extra: pip install "
                        "'opd-pipeline[vllm]'; vLLM pins its own torch version)")
    elif (rel := _release(ver)) is not None and rel[:2] < MIN_VLLM:
        problems.append(f"vLLM {ver} is installed, but this backend needs vLLM >= "
                        f"{'.'.join(map(str, MIN_VLLM))} (the V1 engine with logprobs_mode; written against "
                        f"{CHECKED_VLLM})")
    if device != "cpu":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            problems.append("torch sees no CUDA device")
        elif count < tensor_parallel_size:
            problems.append(f"{section}.tensor_parallel_size is {tensor_parallel_size} but torch sees only "
                            f"{count} CUDA device(s)")
    if problems:
        raise ConfigError(f"{field}: 'vllm' cannot run here: " + "; ".join(problems)
                          + f". Use {field}: hf (CPU or CUDA) instead.")


# ----------------------------------------------------------------------------------- pure pieces


def engine_kwargs(
    model_path: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    enforce_eager: bool = False,
    seed: int = 0,
    max_logprobs: int = 0,
    max_num_batched_tokens: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM(...)` (JSON-able). See the module docstring for why each is set."""
    if dtype not in _DTYPES:
        raise ConfigError(f"model dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    kw: dict[str, Any] = {
        "model": str(model_path),
        "skip_tokenizer_init": True,
        "trust_remote_code": bool(trust_remote_code),
        "dtype": _DTYPES[dtype],
        "tensor_parallel_size": int(tensor_parallel_size),
        "gpu_memory_utilization": float(gpu_memory_utilization),
        "enforce_eager": bool(enforce_eager),
        "seed": int(seed),
        "max_logprobs": max(VLLM_DEFAULT_MAX_LOGPROBS, int(max_logprobs)),
        "logprobs_mode": "raw_logprobs",
        "generation_config": "vllm",
    }
    if max_model_len is not None:
        kw["max_model_len"] = int(max_model_len)
    if max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = int(max_num_batched_tokens)
    return kw


def kv_bytes_per_token(config: Mapping[str, Any], dtype: str) -> int | None:
    """Bytes of keys and values one token takes in the KV cache over all layers, from a config.json (standard
    decoder fields; `text_config` for multimodal ones), in the engine's dtype. None for a config without them."""
    cfg = config.get("text_config") or config
    try:
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        layers = int(cfg["num_hidden_layers"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES[_DTYPES[dtype]]


def kv_cache_need(bytes_per_token: int | None, *, sequences: int, max_len: int) -> dict[str, int] | None:
    """The most KV cache a job can use: `sequences` sequences (at most VLLM_MAX_NUM_SEQS at once) of up to
    `max_len` tokens, in whole blocks: {"blocks", "bytes"}. None when the bytes per token are unknown."""
    if bytes_per_token is None or sequences < 1:
        return None
    blocks = min(sequences, VLLM_MAX_NUM_SEQS) * -(-max_len // KV_BLOCK_TOKENS)
    return {"blocks": blocks, "bytes": blocks * KV_BLOCK_TOKENS * bytes_per_token}


def kv_cache_cap(need: Mapping[str, int] | None, budget_bytes: float) -> dict[str, int]:
    """Engine keywords that cap the KV cache at the job's `need` (`kv_cache_need`) when it is small: at most
    KV_CAP_SHARE of `budget_bytes`, what vLLM could give the cache. Without a cap vLLM fills its whole
    `gpu_memory_utilization` share with KV blocks: millions for a tiny model, and FlexAttention (vLLM's fallback
    for head sizes below 32, like the testbed's 16) then builds a [requests, blocks] int64 table every step."""
    if need is None or need["bytes"] > KV_CAP_SHARE * budget_bytes:
        return {}
    return {"num_gpu_blocks_override": int(need["blocks"])}


def _job_engine(model_dir: str, dtype: str, sequences: int, max_len: int, max_model_len: int | None,
                **engine: Any) -> tuple[dict[str, Any], dict[str, int] | None]:
    """The engine keywords of a job over `sequences` sequences of at most `max_len` tokens, and its KV need:
    `max_model_len` is the configured one, else `max_len` (the engine then sizes nothing for longer ones)."""
    kw = engine_kwargs(model_dir, dtype=dtype, max_model_len=max_model_len or max_len, **engine)
    need = kv_cache_need(kv_bytes_per_token(_model_config(model_dir), dtype), sequences=sequences,
                         max_len=kw["max_model_len"])
    return kw, need


def request_seed(seed: int, prompt_index: int, n: int) -> int:
    """Seed of prompt `prompt_index`'s request. vLLM gives its i-th of n samples `seed + i`
    (`ParentRequest`), so consecutive prompts are spaced by n and no two samples of a run share a seed."""
    return (seed * 1_000_003 + prompt_index * n) % (2**62)


def rollout_params(*, n: int, temperature: float, top_p: float, max_new_tokens: int,
                   stop_ids: Sequence[int]) -> dict[str, Any]:
    """`SamplingParams` keywords shared by a rollout's requests (the seed is set per request).

    Greedy (temperature 0): vLLM requires n == 1, and the one completion is repeated as samples 0..n-1 like
    `hf.generate` does. `logprobs=0` returns the sampled token's log-prob only. `stop_ids`: every id that ends
    a completion (`hf.stop_token_ids`), so a completion stops on the same ids in both backends."""
    greedy = temperature == 0
    return {
        "n": 1 if greedy else int(n),
        "temperature": float(temperature),
        "top_p": 1.0 if greedy else float(top_p),
        "top_k": 0,
        "max_tokens": int(max_new_tokens),
        "logprobs": 0,
        "stop_token_ids": [int(t) for t in stop_ids],
        "detokenize": False,
        "skip_special_tokens": False,
    }


def score_params(top_k: int) -> dict[str, Any]:
    """`SamplingParams` keywords of a teacher-forced scoring request over prompt + completion: the k most
    likely tokens and the actual next token at every position (`prompt_logprobs`), and one greedy token that
    is thrown away (vLLM generates at least one)."""
    return {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": int(top_k), "detokenize": False}


def sampled_logprobs(token_ids: Sequence[int], step_logprobs: Sequence[Mapping[int, Any]] | None) -> list[float]:
    """Log-prob of each sampled token from vLLM's per-step `{token_id: Logprob}` dicts."""
    if step_logprobs is None:
        raise ModelError("unexpected vLLM output: no log-probs although logprobs=0 was requested")
    if len(step_logprobs) != len(token_ids):
        raise ModelError(f"unexpected vLLM output: {len(step_logprobs)} log-prob steps for {len(token_ids)} "
                         "sampled tokens")
    out = []
    for j, (tok, step) in enumerate(zip(token_ids, step_logprobs, strict=True)):
        entry = step.get(tok)
        if entry is None:
            raise ModelError(f"unexpected vLLM output: the log-probs of step {j} do not hold the sampled token "
                             f"{tok} (they hold {sorted(step)})")
        out.append(float(entry.logprob))
    return out


def finish_reason(token_ids: Sequence[int], vllm_reason: str | None, stop_ids: Sequence[int]) -> str:
    """"stop" (one of the stop ids generated, the last token) or "length", as `hf.generate` reports them."""
    if inside := sorted({t for t in token_ids[:-1] if t in stop_ids}):
        raise ModelError(f"unexpected vLLM output: stop token(s) {inside} inside a completion, not at its end")
    if token_ids and token_ids[-1] in stop_ids:
        return "stop"
    if vllm_reason == "length":
        return "length"
    raise ModelError(f"unexpected vLLM output: finish_reason {vllm_reason!r} without a stop token "
                     f"({list(stop_ids)}) at the end")


def rollout_records(outputs: Sequence[Any], *, n: int, greedy: bool,
                    stop_ids: Sequence[int]) -> list[dict[str, Any]]:
    """vLLM `RequestOutput`s (one per prompt, in prompt order) -> one record per (prompt, sample):
    {prompt_index, sample_id, token_ids, logprobs, finish_reason}, ordered by (prompt_index, sample_id)."""
    recs = []
    want = 1 if greedy else n
    for i, out in enumerate(outputs):
        comps = sorted(out.outputs, key=lambda c: c.index)
        if len(comps) != want:
            raise ModelError(f"unexpected vLLM output: prompt {i} has {len(comps)} completions, expected {want}")
        for c in comps:
            toks = [int(t) for t in c.token_ids]
            if not toks:
                raise ModelError(f"unexpected vLLM output: prompt {i} has an empty completion")
            lps = sampled_logprobs(toks, c.logprobs)
            reason = finish_reason(toks, c.finish_reason, stop_ids)
            for sid in (range(n) if greedy else [int(c.index)]):
                recs.append({"prompt_index": i, "sample_id": sid, "token_ids": toks, "logprobs": lps,
                             "finish_reason": reason})
    return recs


def topk_at(entries: Mapping[int, Any], k: int) -> tuple[list[int], list[float]]:
    """The top-k (ids, log-probs), most likely first, of one position's `{token_id: Logprob}` dict.

    vLLM puts the actual (sampled / prompt) token first with its vocabulary rank, then the top-k with ranks
    1..k; when the actual token is also in the top-k the two entries merge into one with its top-k rank.
    A token outside the top-k has rank >= k + 1 (rank = how many tokens have a log-prob >= its own), so the
    entries with rank <= k are exactly the top-k, whatever the dict's order."""
    top = sorted((e.rank, int(tid), float(e.logprob)) for tid, e in entries.items()
                 if e.rank is not None and e.rank <= k)
    if len(top) != k or [r for r, _, _ in top] != list(range(1, k + 1)):
        raise ModelError(f"unexpected vLLM output: top-{k} ranks {[r for r, _, _ in top]} at a position "
                         f"(entries {sorted(entries)})")
    return [t for _, t, _ in top], [lp for _, _, lp in top]


def score_record(prompt_logprobs: Sequence[Mapping[int, Any] | None] | None, prompt_len: int,
                 completion: Sequence[int], k: int) -> dict[str, list]:
    """One scored sequence from vLLM's `prompt_logprobs` over prompt + completion (entry 0 is None, entry t
    holds the distribution that predicts token t): per completion token its log-prob and the top-k."""
    total = prompt_len + len(completion)
    if prompt_logprobs is None or len(prompt_logprobs) != total:
        got = None if prompt_logprobs is None else len(prompt_logprobs)
        raise ModelError(f"unexpected vLLM output: {got} prompt log-prob entries for a sequence of {total} tokens")
    if prompt_len < 1:
        raise ConfigError("a sequence has an empty prompt: teacher forcing needs at least one prompt token")
    logprob, ids, lps = [], [], []
    for j, tok in enumerate(completion):
        step = prompt_logprobs[prompt_len + j]
        if step is None or tok not in step:
            raise ModelError(f"unexpected vLLM output: no log-prob of completion token {j} ({tok})")
        logprob.append(float(step[tok].logprob))
        i, lp = topk_at(step, k)
        ids.append(i)
        lps.append(lp)
    return {"logprob": logprob, "topk_ids": ids, "topk_logprobs": lps}


_ROLLOUT_SCHEMA = pa.schema([
    ("prompt_index", pa.int32()), ("sample_id", pa.int32()), ("token_ids", pa.list_(pa.int32())),
    ("logprobs", pa.list_(pa.float32())), ("finish_reason", pa.string()),
])
_SCORE_SCHEMA = pa.schema([
    ("logprob", pa.list_(pa.float32())), ("topk_ids", pa.list_(pa.list_(pa.int32()))),
    ("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
])


def rollout_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Records of `rollout_records` as the Arrow table the child writes."""
    return pa.table({f.name: pa.array([r[f.name] for r in records], f.type) for f in _ROLLOUT_SCHEMA},
                    schema=_ROLLOUT_SCHEMA)


def score_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Records of `score_record` (one per input sequence, in order) as the Arrow table the child writes."""
    return pa.table({f.name: pa.array([r[f.name] for r in records], f.type) for f in _SCORE_SCHEMA},
                    schema=_SCORE_SCHEMA)


def _check_schema(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    if not table.schema.equals(schema):
        raise ModelError(f"vLLM child returned a {what} table with schema {table.schema}, expected {schema}")
    return table


# ----------------------------------------------------------------------------------- the child process


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _model_config(model_dir: str) -> dict[str, Any]:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _weight_bytes(model_dir: str) -> int:
    """Bytes of the weight files: an upper bound on the weights in memory (bf16 from fp32 files is half)."""
    return sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.suffix in (".safetensors", ".bin"))


def _engine_for(job: dict[str, Any]) -> dict[str, Any]:
    """In the child: the job's engine keywords plus the KV-cache cap (`kv_cache_cap`), which needs the GPU's size."""
    import torch

    engine = dict(job["engine"])
    if job.get("kv_need") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        budget = total * engine["gpu_memory_utilization"] - _weight_bytes(engine["model"])
        engine |= kv_cache_cap(job["kv_need"], budget)
    return engine


def _run_job(llm: Any, job: dict[str, Any]) -> pa.Table:
    """In the child: run the job's requests on the engine and map the outputs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    use_tqdm = bool(job.get("progress", False))

    def run(start: int, stop: int, params: Any) -> list:
        chunk = job["prompts"][start:stop]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in chunk], params, use_tqdm=use_tqdm)
        if len(outputs) != len(chunk):
            raise ModelError(f"unexpected vLLM output: {len(outputs)} results for {len(chunk)} prompts")
        for i, (out, p) in enumerate(zip(outputs, chunk, strict=True)):
            if out.prompt_token_ids is not None and list(out.prompt_token_ids) != p:
                raise ModelError(f"unexpected vLLM output: result {start + i} is not for prompt {start + i}")
        return outputs

    total = len(job["prompts"])
    if job["kind"] == "rollout":
        outputs = run(0, total, [SamplingParams(**job["params"], seed=int(s)) for s in job["seeds"]])
        return rollout_table(rollout_records(outputs, n=job["n"], greedy=job["greedy"], stop_ids=job["stop_ids"]))
    # In chunks: vLLM's prompt log-probs are Python objects (k + 1 per token); each chunk is mapped to plain lists
    # and dropped before the next one runs.
    params, recs, step = SamplingParams(**job["params"]), [], int(job.get("chunk", 1024))
    for start in range(0, total, step):
        outputs = run(start, min(total, start + step), params)
        recs += [score_record(o.prompt_logprobs, plen, p[plen:], job["top_k"]) for o, p, plen in
                 zip(outputs, job["prompts"][start:start + step], job["prompt_lens"][start:start + step],
                     strict=True)]
        del outputs
    return score_table(recs)


def _shutdown(llm: Any) -> None:
    """Best effort: stop the engine's own processes now. Whatever survives is killed with the child's process
    group by the parent."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - the parent kills the process group next anyway
        pass


def _child_main(workdir: str) -> None:
    """Entry point of the spawned child: job.json in, result.arrow + meta.json (or error.json) out.

    The child leads its own process group, so that the parent can kill it together with every process vLLM
    started (the engine core, tensor-parallel workers) whatever way the child ends. The engine is shut down only
    after the result (or the error) is written: a hang there costs at most the parent's EXIT_GRACE_S."""
    os.setpgrp()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs in this process, not in another
    d, llm, code = Path(workdir), None, 0
    try:
        job = json.loads((d / "job.json").read_text())
        import vllm

        t0 = time.perf_counter()
        engine = _engine_for(job)
        llm = vllm.LLM(**engine)
        t1 = time.perf_counter()
        table = _run_job(llm, job)
        meta = {"vllm": vllm.__version__, "engine_seconds": t1 - t0, "run_seconds": time.perf_counter() - t1,
                "num_gpu_blocks_override": engine.get("num_gpu_blocks_override")}
        with pa.OSFile(str(d / "result.arrow.tmp"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        os.replace(d / "result.arrow.tmp", d / "result.arrow")
        _write_json(d / "meta.json", meta)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        _write_json(d / "error.json", {"type": type(e).__name__, "message": str(e),
                                       "traceback": traceback.format_exc()[-4000:]})
        code = 1
    finally:
        if llm is not None:
            _shutdown(llm)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: vLLM's exit handlers have hung; the parent cleans up the group


#: Child exception types that retrying cannot fix (a model vLLM cannot load, a bad argument); any other
#: failure (CUDA out of memory, a crashed worker, a killed child) is a TransientError and may be retried.
_PERMANENT = {"ValueError", "TypeError", "NotImplementedError", "KeyError", "ModelError", "ConfigError"}


def _free_parent_cuda_cache() -> None:
    """Return this process's cached CUDA blocks (from an earlier `hf` stage) so that the engine can take its
    `gpu_memory_utilization` share: vLLM refuses to start when less memory is free."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the child's process group. Called while the child is not yet reaped (a
    zombie at worst), so that its pid, which names the group, cannot have been reused."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left, or the child died before making its group
        pass


def _wait(proc: Any, d: Path) -> str | None:
    """Wait for the child to exit, without reaping it. Returns None when it exited by itself, or why it is to be
    killed: it outlived EXIT_GRACE_S after writing its result or error, or the job outlived JOB_TIMEOUT_S."""
    deadline, done_at = time.monotonic() + JOB_TIMEOUT_S, None
    while not mp_connection.wait([proc.sentinel], timeout=1.0):
        now = time.monotonic()
        if done_at is None and ((d / "meta.json").exists() or (d / "error.json").exists()):
            done_at = now
        if done_at is not None and now - done_at > EXIT_GRACE_S:
            return f"did not exit within {EXIT_GRACE_S:g} s of writing its result"
        if now > deadline:
            return f"timed out after {JOB_TIMEOUT_S:g} s"
    return None


def run_job(job: dict[str, Any], what: str) -> tuple[pa.Table, dict[str, Any]]:
    """Run `job` in a fresh spawned child; return its result table and meta (timings, vLLM version).

    However the call ends (result, error, crash, timeout, an exception in this process), the child's process
    group is killed before the child is reaped: no engine process outlives the call and keeps the GPU."""
    _free_parent_cuda_cache()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix=f"opd-vllm-{what}-") as tmp:
        d = Path(tmp)
        _write_json(d / "job.json", job)
        proc = ctx.Process(target=_child_main, args=(tmp,), name=f"opd-vllm-{what}", daemon=False)
        proc.start()
        killed = None
        try:
            killed = _wait(proc, d)
        finally:
            _kill_group(proc.pid)
            proc.join()
        if (d / "error.json").exists():
            err = json.loads((d / "error.json").read_text())
            msg = (f"vLLM {what} failed in its child process: {err['type']}: {err['message']}\n"
                   f"{err['traceback']}")
            if err["type"] in _PERMANENT and "memory" not in err["message"].lower():
                raise ModelError(msg)
            raise TransientError(msg)
        if not (d / "meta.json").exists():
            why = (f"was killed because it {killed}" if killed else
                   f"exited with code {proc.exitcode} (killed from outside? out of host memory?)")
            raise TransientError(f"vLLM {what}: the child process {why}, without a result")
        with pa.OSFile(str(d / "result.arrow"), "rb") as src:  # read into memory: the directory goes next
            table = pa.ipc.open_file(src).read_all()
        return table, json.loads((d / "meta.json").read_text())


# ----------------------------------------------------------------------------------- the two entry points


def _vocab_size(model_dir: str) -> int | None:
    cfg = _model_config(model_dir)
    v = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return int(v) if v else None


def generate(
    model_dir: str,
    prompts: Sequence[Sequence[int]],
    *,
    eos_token_id: int | Sequence[int],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    enforce_eager: bool = False,
    progress: bool = True,
    first_prompt: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`n` sampled completions per prompt with the sampled tokens' raw log-probs, like `hf.generate`; each ends at
    the first of the ids `eos_token_id` (`hf.stop_token_ids`). `first_prompt`: where `prompts` start in the
    stage's prompts (a shard's): each request's seed is that of its prompt in the whole stage.

    Returns (records ordered by (prompt_index, sample_id) with keys prompt_index, sample_id, token_ids,
    logprobs, finish_reason; meta with the child's timings)."""
    from opd_tasks.backends import as_token_ids

    if any(len(p) == 0 for p in prompts):
        raise ConfigError("a prompt is empty: vLLM needs at least one prompt token")
    if not prompts:
        return [], {}
    stop_ids = as_token_ids(eos_token_id)
    params = rollout_params(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                            stop_ids=stop_ids)
    engine, need = _job_engine(model_dir, dtype, sequences=len(prompts) * params["n"],
                               max_len=max(len(p) for p in prompts) + max_new_tokens, max_model_len=max_model_len,
                               trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                               gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, seed=seed)
    job = {
        "kind": "rollout", "engine": engine, "kv_need": need,
        "prompts": [[int(t) for t in p] for p in prompts],
        "params": params,
        "seeds": [request_seed(seed, first_prompt + i, n) for i in range(len(prompts))],
        "n": int(n), "greedy": temperature == 0, "stop_ids": stop_ids, "progress": progress,
    }
    table, meta = run_job(job, "rollout")
    table = _check_schema(table, _ROLLOUT_SCHEMA, "rollout")
    recs = table.to_pylist()
    want = len(prompts) * n
    if len(recs) != want:
        raise ModelError(f"vLLM rollout returned {len(recs)} completions, expected {want}")
    return recs, meta


def score(
    model_dir: str,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    top_k: int,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.85,
    max_model_len: int | None = None,
    enforce_eager: bool = True,
    progress: bool = True,
) -> tuple[list[dict[str, list]], dict[str, Any]]:
    """Teacher-forced log-prob of every completion token and the top-k (k = min(top_k, vocabulary)), like
    `hf.score_sequences` but without the entropy. Returns (one record per sequence, in order, with keys
    logprob, topk_ids, topk_logprobs; meta)."""
    if len(prompts) != len(completions):
        raise ConfigError(f"{len(prompts)} prompts but {len(completions)} completions")
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"sequence {i} has an empty prompt: teacher forcing needs at least one prompt token")
    vocab = _vocab_size(model_dir)
    k = min(top_k, vocab) if vocab else top_k
    out: list[dict[str, list] | None] = [None] * len(prompts)
    todo = [i for i, c in enumerate(completions) if len(c) > 0]
    for i, c in enumerate(completions):
        if not c:
            out[i] = {"logprob": [], "topk_ids": [], "topk_logprobs": []}
    meta: dict[str, Any] = {}
    if todo:
        seqs = [[int(t) for t in prompts[i]] + [int(t) for t in completions[i]] for i in todo]
        engine, need = _job_engine(model_dir, dtype, sequences=len(seqs), max_len=max(map(len, seqs)) + 1,
                                   max_model_len=max_model_len, trust_remote_code=trust_remote_code,
                                   tensor_parallel_size=tensor_parallel_size,
                                   gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                   seed=0, max_logprobs=k, max_num_batched_tokens=SCORE_MAX_BATCHED_TOKENS)
        job = {
            "kind": "score", "engine": engine, "kv_need": need,
            "prompts": seqs,
            "prompt_lens": [len(prompts[i]) for i in todo],
            "params": score_params(k),
            "top_k": k,
            "progress": progress,
        }
        table, meta = run_job(job, "score")
        table = _check_schema(table, _SCORE_SCHEMA, "score")
        rows = table.to_pylist()
        if len(rows) != len(todo):
            raise ModelError(f"vLLM scoring returned {len(rows)} sequences, expected {len(todo)}")
        for i, row in zip(todo, rows, strict=True):
            if len(row["logprob"]) != len(completions[i]):
                raise ModelError(f"vLLM scoring: sequence {i} has {len(row['logprob'])} scores for "
                                 f"{len(completions[i])} tokens")
            out[i] = row
    return [r for r in out if r is not None], meta
