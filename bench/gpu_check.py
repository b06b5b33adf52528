"""GPU check (`bash scripts/gpu_check.sh` runs it on a CUDA machine): the pipeline on CUDA with its gates, the
teacher's re-score repeatability per dtype, and the throughput, model FLOP utilisation and peak memory of the
rollout, scoring and update at real Qwen3 shapes (random weights, nothing downloaded).

    python -m bench.gpu_check --out DIR/gpu_check.json [--iterations 2] [--shapes 1.7B,8B] [--parts ...]
    python -m bench.gpu_check --out /tmp/g.json --device cpu --shapes tiny --prompts 8   # the CPU smoke run

Parts (`--parts`, default all; the JSON is rewritten after each, so a run cut short keeps what it measured; a
part that fails is recorded as {"error": ...} and the others still run; the exit status is 1 when one failed):
- `pipeline`: the testbed models through the plain driver on `--device`, OPD then TOPD, `--iterations` each, with
  the gates on (their figures, thresholds and verdicts per iteration in the JSON; a failed gate stops that run and
  is recorded, not raised); seconds and completion tokens/s per stage; the teacher's log-probs on the same tokens
  on the CPU in fp32 vs the device in fp32 and bf16; sampling log-probs vs an fp32 teacher-forced recompute.
- `repeat`: the testbed teacher's re-score repeatability in bfloat16 and float32 (`repeatability`).
- `shapes`: for each of `--shapes` (Qwen3 1.7B and 8B shapes, or `tiny`: hidden 64, 2 layers and the real
  vocabulary, for the CPU smoke run), randomly initialised: rollout (the hf backend's `generate`, bf16),
  teacher-forced scoring (`score_sequences`, bf16), the re-score repeatability in bf16 and fp32, and the update
  (`micro_batch_loss` forward + backward + clip + AdamW step, float32 weights under bf16 autocast on CUDA, as
  opd_tasks/stages/update.py runs it), each with seconds, tokens/s, MFU and peak GPU memory
  (`torch.cuda.max_memory_allocated`, reset before each). The update is skipped where float32 weights, gradients
  and AdamW's two moments (16 bytes a parameter) exceed 80% of the GPU (the 8B shape on one 141 GB H200); the
  JSON says so.

MFU: model FLOPs / seconds / the GPU's bf16 dense peak (`BF16_PEAK`, looked up by `torch.cuda.get_device_name`;
null on the CPU or an unlisted GPU), with 2 N FLOPs per processed token for inference and 6 N for training, N the
parameters that multiply (`flop_params`: the output head counted, the input embedding lookup not); processed
tokens are prompt and completion tokens (attention's quadratic term is left out: short sequences).

Repeatability (`repeatability`): the same sequences scored twice by the same model in one dtype: batch size 1 vs
all sequences in one batch (`completion_logprobs`, opd_tasks/training/logprobs.py), and what the gates stage
compares, the score stage's `score_sequences` at `scoring.batch_size` vs the gates' `completion_logprobs` at
`gates.batch_size`. Each with max and mean |diff| and the gate's limit for that dtype (`repeat_limit`,
opd_tasks/stages/gates.py: 1e-3 in float32, 0.5 in 16-bit).

Needs torch, transformers (with tokenizers, safetensors), numpy, pyarrow, pydantic, pyyaml and rich; not Prefect,
DuckDB or datasets.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from bench.real_shape import ENDOFTEXT, EOS_IDS, QWEN3_1_7B, QWEN3_8B, SMALL, Shape, qwen3_config

SHAPES = {"tiny": SMALL, "1.7B": QWEN3_1_7B, "8B": QWEN3_8B}
PARTS = ("pipeline", "repeat", "shapes")
#: bf16 dense (no sparsity) tensor-core peak FLOP/s by GPU: the first entry whose key is in the device name
#: (NVIDIA's data sheets: H100 SXM and H200 989 TFLOPS, H100 PCIe 756 TFLOPS).
BF16_PEAK = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12))
#: The update is measured only where float32 weights + gradients + AdamW moments (16 B/parameter) fit in this share
#: of the GPU's memory, leaving the rest for activations, logits and the allocator.
UPDATE_FIT = 0.8
FLOPS_RULE = ("2 N FLOPs per processed token for inference (rollout: prompt + generated tokens; scoring: prompt + "
              "completion tokens), 6 N for the update; N = flop_params (output head counted, input embedding lookup "
              "not); attention's quadratic term not counted")
GiB = 2**30


# ------------------------------------------------------------------------------------------------ helpers


def flop_params(shape: Shape) -> int:
    """The parameters that multiply each token: all but an untied input embedding (a lookup)."""
    return shape.params() - (0 if shape.tied else shape.vocab * shape.hidden)


def bf16_peak(device: torch.device) -> tuple[float | None, str]:
    """(the device's bf16 dense peak FLOP/s or None, where that came from)."""
    if device.type != "cuda":
        return None, f"device {device.type}: no peak, MFU is null"
    name = torch.cuda.get_device_name(device)
    for key, flops in BF16_PEAK:
        if key in name:
            return flops, f"{name}: the {key} bf16 dense peak, {flops / 1e12:.0f} TFLOPS (BF16_PEAK)"
    return None, f"{name} is not in BF16_PEAK (bench/gpu_check.py): MFU is null"


@contextmanager
def measured(device: torch.device, into: dict) -> Iterator[None]:
    """Seconds of the block (CUDA synchronised at both ends) and its peak allocated GPU memory (the peak is reset
    when it starts; what was already allocated, e.g. the weights, counts in it); peak_gib is null off CUDA."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        into["allocated_before_gib"] = torch.cuda.memory_allocated(device) / GiB
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize(device)
    into["seconds"] = time.perf_counter() - t0
    into["peak_gib"] = torch.cuda.max_memory_allocated(device) / GiB if cuda else None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    return flops / seconds / peak if peak else None


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def update_skipped(shape: Shape, gpu_bytes: int | None) -> str | None:
    """Why the update of `shape` is not measured on a GPU of `gpu_bytes` (None: the CPU, always measured), or None:
    float32 weights, gradients and AdamW's two moments (16 B a parameter) must fit in UPDATE_FIT of it."""
    need = 16 * shape.params()
    if gpu_bytes is None or need <= UPDATE_FIT * gpu_bytes:
        return None
    return (f"float32 weights, gradients and AdamW moments need {need / GiB:.0f} GiB (16 B x "
            f"{shape.params() / 1e9:.2f} B parameters), more than {UPDATE_FIT:.0%} of this GPU's {gpu_bytes / GiB:.0f} "
            "GiB before activations: the update is not measured at this shape on one GPU")


def random_model(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised Qwen3ForCausalLM of `shape` (bench.real_shape.qwen3_config), created on `device` in
    `dtype` (no float32 copy first: the 8B shape would need 32 GB for it), in eval mode."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(qwen3_config(shape))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _abs_diff(a: list[list[float]], b: list[list[float]]) -> np.ndarray:
    flat = [np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) for x, y in zip(a, b, strict=True)]
    return np.concatenate(flat) if flat else np.zeros(0)


def _figures(d: np.ndarray) -> dict:
    return {"max_abs": float(d.max()) if d.size else 0.0, "mean_abs": float(d.mean()) if d.size else 0.0}


def repeatability(model, prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                  score_batch: int | None = None) -> dict:
    """The same sequences scored twice by `model` in its own dtype (see the module docstring): `max_abs` and
    `mean_abs` are batch size 1 vs all in one batch; `gate` is the score stage's pass vs the gates' re-score, the
    figure `teacher_repeat_diff` takes the max of; each against the gate's limit for the dtype."""
    from opd_tasks.backends.hf import score_sequences
    from opd_tasks.config import GatesConfig, ScoringConfig
    from opd_tasks.stages.gates import repeat_limit
    from opd_tasks.training.logprobs import completion_logprobs

    gates, scoring = GatesConfig(), ScoringConfig()
    score_batch = score_batch or scoring.batch_size
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    limit = repeat_limit(gates, dtype)
    n = len(prompts)
    one = completion_logprobs(model, prompts, completions, pad_token_id=pad_token_id, batch_size=1)
    every = completion_logprobs(model, prompts, completions, pad_token_id=pad_token_id, batch_size=n)
    scored = score_sequences(model, prompts, completions, pad_token_id=pad_token_id, top_k=scoring.top_k,
                             batch_size=score_batch, progress=False)
    rescored = completion_logprobs(model, prompts, completions, pad_token_id=pad_token_id,
                                   batch_size=gates.batch_size)
    shape_diff, gate_diff = _abs_diff(one, every), _abs_diff([s.logprob for s in scored], rescored)
    out = {"dtype": dtype, "sequences": n, "tokens": int(shape_diff.size), "batch_sizes": [1, n],
           **_figures(shape_diff), "limit": limit}
    out["within_limit"] = None if limit is None else out["max_abs"] <= limit
    gate = {"batch_sizes": [score_batch, gates.batch_size], **_figures(gate_diff)}
    gate["within_limit"] = None if limit is None else gate["max_abs"] <= limit
    out["gate"] = gate
    return out


# ------------------------------------------------------------------------------------------------ parts


def pipeline_part(device: str, iterations: int, prompts: int, root: Path) -> dict:
    """OPD and TOPD on the testbed with the gates on; then CPU-vs-device parity on the OPD run's first rollouts."""
    from opd_tasks.backends.hf import load_causal_lm, score_sequences
    from opd_tasks.config_files import load_config
    from opd_tasks.errors import DataError
    from opd_tasks.pipeline import resolve_models, run_plain
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    runs: dict = {}
    for method in ("opd", "topd"):
        cfg = load_config(None, [f"method={method}", f"device={device}", f"root={root / method}",
                                 f"name=gpu-{method}", f"iterations={iterations}",
                                 f"data.prompts_per_iteration={prompts}", "rollout.samples_per_prompt=8",
                                 "rollout.batch_size=512", "scoring.batch_size=256", "gates.enabled=true"])
        t0 = time.perf_counter()
        error, out = None, None
        try:
            out = run_plain(cfg, log=lambda m: print(m, flush=True), progress=False)
        except DataError as e:  # a failed gate (or bad data): recorded, the other method still runs
            error = str(e)
        store = ArtifactStore(cfg.resolved_root())
        lineage = RunLineage(store.layout, cfg.name)
        gates = []
        for i in range(iterations):
            entry = lineage.get(i, "gates")
            if entry is not None:
                meta = store.manifest(entry.ref)["meta"]
                gates.append({"iteration": i, "passed": meta["passed"], "teacher_dtype": meta["teacher_dtype"],
                              "sampled_sequences": meta["sampled_sequences"], "gates": meta["gates"]})
        run: dict = {"error": error, "gates": gates, "total_s": time.perf_counter() - t0}
        if out is not None:
            tokens = [sum(len(t) for t in store.read_table(r.stages["rollout"].ref, "rollouts",
                                                           columns=["token_ids"]).column("token_ids").to_pylist())
                      for r in out.iterations]
            # completion tokens per second of each stage, iterations after the first (CUDA start-up excluded)
            pairs = list(zip(out.iterations, tokens, strict=True))
            later = pairs[1:] or pairs
            run.update({
                "tokens_per_iteration": tokens,
                "stage_tokens_per_s": {k: float(np.median([n / r.stages[k].seconds for r, n in later]))
                                       for k in ("rollout", "score", "gates", "analyze", "update")
                                       if k in out.iterations[0].stages},
                "baseline": out.baseline_accuracy,
                "accuracy": [r.accuracy for r in out.iterations],
                "seconds_per_iteration": [sum(s.seconds for s in r.stages.values()) for r in out.iterations],
                "stage_seconds": [{k: round(s.seconds, 3) for k, s in r.stages.items()} for r in out.iterations],
            })
        runs[method] = run
        print(f"{method}: {json.dumps(run)}", flush=True)
    res: dict = {"iterations": iterations, "prompts_per_iteration": prompts, "samples_per_prompt": 8, "runs": runs}
    if all("seconds_per_iteration" in r for r in runs.values()):
        med = {m: float(np.median(r["seconds_per_iteration"])) for m, r in runs.items()}
        res["topd_over_opd"] = med["topd"] / med["opd"]

    # Parity: the same rollout tokens scored by the teacher on the CPU (fp32) and the device (fp32 and bf16).
    store = ArtifactStore(root / "opd")
    entry = RunLineage(store.layout, "gpu-opd").get(0, "rollout")
    if entry is None:
        res["parity"] = {"error": "the OPD run has no rollouts at iteration 0"}
        return res
    roll = store.read_table(entry.ref, "rollouts")
    prompts_, comps = roll.column("prompt_token_ids").to_pylist()[:128], roll.column("token_ids").to_pylist()[:128]
    models = resolve_models(load_config())
    parity, ref_lp = {}, None
    for name, dev, dtype in (("cpu-fp32", "cpu", "float32"), (f"{device}-fp32", device, "float32"),
                             (f"{device}-bf16", device, "bfloat16")):
        m = load_causal_lm(models.teacher.path, torch.device(dev), dtype)
        sc = score_sequences(m, prompts_, comps, pad_token_id=0, top_k=8, batch_size=64, progress=False)
        lp = np.concatenate([np.asarray(s.logprob) for s in sc])
        if ref_lp is None:
            ref_lp = lp
        else:
            parity[f"{name}_vs_cpu"] = {"max_abs": float(np.abs(lp - ref_lp).max()),
                                        "mean_abs": float(np.abs(lp - ref_lp).mean())}
    # Sampling log-probs (the rollout's, in the student's dtype) vs a float32 teacher-forced recompute.
    sm = load_causal_lm(models.initial_student.path, torch.device(device), "float32")
    sc = score_sequences(sm, prompts_, comps, pad_token_id=0, top_k=1, batch_size=64, progress=False)
    samp = np.concatenate([np.asarray(x) for x in roll.column("logprobs").to_pylist()[:128]])
    rec = np.concatenate([np.asarray(s.logprob) for s in sc])
    parity["sampling_vs_fp32_recompute"] = {"max_abs": float(np.abs(samp - rec).max()),
                                            "mean_abs": float(np.abs(samp - rec).mean())}
    res["parity"] = parity
    return res


def _release_loaded() -> None:
    """Free the models the pipeline's stages keep loaded in this process (opd_tasks/backends/loaded.py), so that
    they count in no later part's memory."""
    from opd_tasks.backends.loaded import LOADED

    LOADED.release()


def repeat_part(device: torch.device, prompts: int) -> dict:
    """The testbed teacher's repeatability in bfloat16 and float32 on sequences its student sampled there."""
    from opd_tasks.backends.hf import generate, load_causal_lm
    from opd_tasks.config import DataConfig, RolloutConfig
    from opd_tasks.config_files import load_config
    from opd_tasks.pipeline import resolve_models
    from opd_tasks.stages import PROMPTS, PromptsInputs
    from storage.store import ArtifactStore

    models = resolve_models(load_config())
    with tempfile.TemporaryDirectory(prefix="opd-gpu-repeat-") as tmp:
        store = ArtifactStore(tmp)
        ref = PROMPTS(store, PromptsInputs(data=DataConfig(), tokenizer=models.initial_student, split="train",
                                           n=prompts, offset=0, max_context=None, seed=0))
        ptoks = store.read_table(ref, "prompts").column("prompt_token_ids").to_pylist()
    student = load_causal_lm(models.initial_student.path, device, "float32")
    gens = generate(student, ptoks, eos_token_id=2, pad_token_id=0, n=2, temperature=1.0,
                    max_new_tokens=RolloutConfig().max_new_tokens, batch_size=256, progress=False)
    del student
    seq_prompts, comps = [ptoks[g.prompt_index] for g in gens], [g.token_ids for g in gens]
    out = {"model": "testbed:teacher", "device": str(device)}
    for dtype in ("bfloat16", "float32"):
        teacher = load_causal_lm(models.teacher.path, device, dtype)
        out[dtype] = repeatability(teacher, seq_prompts, comps, pad_token_id=0)
        del teacher
        free(device)
    return out


def shape_part(name: str, shape: Shape, device: torch.device, peak: float | None, sequences: int,
               prompt_tokens: int, new_tokens: int, micro_batch: int, update_steps: int, score_passes: int,
               seed: int = 0) -> dict:
    """Rollout, scoring, repeatability and update of a random model of `shape` (see the module docstring)."""
    from opd_tasks.backends.hf import generate, score_sequences
    from opd_tasks.config import ScoringConfig, UpdateConfig
    from opd_tasks.training.objective import micro_batch_loss
    from opd_tasks.training.sequences import ScoredSequence

    n_flop = flop_params(shape)
    res: dict = {"shape": asdict(shape), "params": shape.params(), "flop_params": n_flop, "sequences": sequences,
                 "prompt_tokens": prompt_tokens, "max_new_tokens": new_tokens}
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, ENDOFTEXT, (sequences, prompt_tokens), generator=g).tolist()
    stops, pad = list(EOS_IDS), ENDOFTEXT

    t0 = time.perf_counter()
    model = random_model(shape, device, torch.bfloat16, seed)
    res["build_bf16_s"] = time.perf_counter() - t0
    # rollout: the hf backend's generate (sampled tokens' log-probs included, as the rollout stage asks)
    generate(model, prompts[:2], eos_token_id=stops, pad_token_id=pad, max_new_tokens=2, batch_size=2,
             progress=False)  # warm-up: kernels, allocator
    r: dict = {"dtype": "bfloat16", "batch_size": sequences}
    with measured(device, r):
        gens = generate(model, prompts, eos_token_id=stops, pad_token_id=pad, n=1, temperature=1.0,
                        max_new_tokens=new_tokens, batch_size=sequences, seed=seed, progress=False)
    gens.sort(key=lambda x: x.prompt_index)
    comps = [x.token_ids for x in gens]
    generated = sum(len(c) for c in comps)
    processed = sequences * prompt_tokens + generated
    r.update(generated_tokens=generated, tokens_per_s=generated / r["seconds"],
             mfu=mfu(2 * n_flop * processed, r["seconds"], peak))
    res["rollout"] = r
    print(f"{name} rollout: {json.dumps(r)}", flush=True)

    # scoring: the hf backend's score_sequences at scoring.batch_size, `score_passes` passes after a warm-up
    score_batch = ScoringConfig().batch_size
    s: dict = {"dtype": "bfloat16", "batch_size": score_batch, "passes": score_passes}
    score_sequences(model, prompts[:1], comps[:1], pad_token_id=pad, top_k=8, batch_size=1, progress=False)
    with measured(device, s):
        for _ in range(score_passes):
            scored = score_sequences(model, prompts, comps, pad_token_id=pad, top_k=8, batch_size=score_batch,
                                     progress=False)
    s.update(tokens=score_passes * processed, completion_tokens=score_passes * generated,
             tokens_per_s=score_passes * processed / s["seconds"],
             completion_tokens_per_s=score_passes * generated / s["seconds"],
             mfu=mfu(2 * n_flop * score_passes * processed, s["seconds"], peak))
    res["score"] = s
    print(f"{name} score: {json.dumps(s)}", flush=True)
    res["repeat"] = {"bfloat16": repeatability(model, prompts, comps, pad, score_batch)}
    del model
    free(device)

    t0 = time.perf_counter()
    model = random_model(shape, device, torch.float32, seed)
    res["build_fp32_s"] = time.perf_counter() - t0
    res["repeat"]["float32"] = repeatability(model, prompts, comps, pad, score_batch)
    print(f"{name} repeat: {json.dumps(res['repeat'])}", flush=True)

    # update: float32 weights, bf16 autocast on CUDA, the project's loss, clip, AdamW (opd_tasks/stages/update.py)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    if (why := update_skipped(shape, total)) is not None:
        res["update"] = {"skipped": why}
        print(f"{name} update: {why}", flush=True)
    else:
        cfg = UpdateConfig(micro_batch_size=micro_batch, grad_accumulation=math.ceil(sequences / micro_batch))
        seqs = [ScoredSequence(prompt_id=str(i), sample_id=0, prompt=p, tokens=gen.token_ids,
                               sampling_logprobs=gen.logprobs, teacher_logprobs=sc.logprob,
                               trainer_logprobs=gen.logprobs)
                for i, (p, gen, sc) in enumerate(zip(prompts, gens, scored, strict=True))]
        n_tok = sum(len(q.tokens) for q in seqs)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        bf16 = cfg.bf16 and device.type == "cuda"  # as the update stage: autocast on CUDA only
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

        def step(net) -> None:
            for m0 in range(0, len(seqs), micro_batch):
                with autocast:
                    loss, _ = micro_batch_loss(net, seqs[m0 : m0 + micro_batch], cfg, None, pad, device)
                loss = loss / n_tok
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{name} update: the loss is {loss.item()} (not finite)")
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(model)  # warm-up; allocates AdamW's moments
        u: dict = {"weights": "float32", "autocast": "bfloat16" if bf16 else None, "micro_batch_size": micro_batch,
                   "sequences_per_step": sequences, "steps": update_steps, "loss": cfg.loss}
        with measured(device, u):
            for _ in range(update_steps):
                step(model)
        u.update(tokens=update_steps * processed, completion_tokens=update_steps * n_tok,
                 tokens_per_s=update_steps * processed / u["seconds"],
                 completion_tokens_per_s=update_steps * n_tok / u["seconds"],
                 mfu=mfu(6 * n_flop * update_steps * processed, u["seconds"], peak))
        res["update"] = u
        del opt, params
        print(f"{name} update: {json.dumps(u)}", flush=True)
    del model
    free(device)
    return res


# ------------------------------------------------------------------------------------------------ driver


def _choices(flag: str, text: str, allowed) -> list[str]:
    """A comma-separated `flag` value, each item one of `allowed` (SystemExit naming the flag otherwise)."""
    items = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in items if p not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: {bad or text!r} not among {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for the smoke run")
    ap.add_argument("--parts", type=lambda t: _choices("--parts", t, PARTS), default=list(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--iterations", type=int, default=2, help="pipeline: iterations of each method")
    ap.add_argument("--prompts", type=int, default=64, help="pipeline: prompts per iteration; repeat: prompts")
    ap.add_argument("--root", default=None, help="pipeline: a new or empty directory for the runs (default: a "
                    "temporary one; cached stages would time nothing)")
    ap.add_argument("--shapes", type=lambda t: _choices("--shapes", t, SHAPES), default=["1.7B", "8B"],
                    help=f"comma-separated subset of "
                    f"{','.join(SHAPES)} (tiny: hidden 64, 2 layers, the real vocabulary)")
    ap.add_argument("--sequences", type=int, default=None, help="shapes: sequences (default 16; 4 on the CPU)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="shapes: prompt tokens (default 128; CPU 16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="shapes: new tokens (default 256; 8 on the CPU)")
    ap.add_argument("--micro-batch", type=int, default=None, help="shapes: update micro-batch (default 8; CPU 2)")
    ap.add_argument("--update-steps", type=int, default=2, help="shapes: timed optimizer steps after a warm-up one")
    ap.add_argument("--score-passes", type=int, default=3, help="shapes: timed scoring passes after a warm-up")
    args = ap.parse_args(argv)
    import transformers

    from opd_tasks.backends.hf import resolve_device
    from opd_tasks.config import GatesConfig

    device = resolve_device(args.device)
    cpu = device.type == "cpu"
    for k, gpu_default, cpu_default in (("sequences", 16, 4), ("prompt_tokens", 128, 16), ("new_tokens", 256, 8),
                                        ("micro_batch", 8, 2)):
        if getattr(args, k) is None:
            setattr(args, k, cpu_default if cpu else gpu_default)
    peak, peak_source = bf16_peak(device)
    gates = GatesConfig()
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / GiB if device.type == "cuda"
        else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "bf16_peak_flops": peak,
        "bf16_peak_source": peak_source, "flops_rule": FLOPS_RULE,
        "gate_limits": {"max_teacher_repeat_diff": gates.max_teacher_repeat_diff,
                        "max_teacher_repeat_diff_16bit": gates.max_teacher_repeat_diff_16bit},
        "parts": args.parts, "seconds": {}, "errors": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(res, indent=1) + "\n")

    def run_part(key: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            res[key] = fn()
        except Exception as e:  # noqa: BLE001 - recorded; the other parts still run (exit status 1 at the end)
            traceback.print_exc()
            res[key] = {"error": f"{type(e).__name__}: {e}"}
            res["errors"][key] = res[key]["error"]
        finally:
            free(device)
        res["seconds"][key] = round(time.perf_counter() - t0, 1)
        save()

    if "pipeline" in args.parts:
        if args.root is not None and Path(args.root).exists() and any(Path(args.root).iterdir()):
            raise SystemExit(f"--root {args.root} is not empty: its cached stages would time nothing; give a new "
                             "directory, or none for a temporary one")
        with tempfile.TemporaryDirectory(prefix="opd-gpu-check-") as tmp:
            root = Path(args.root) if args.root is not None else Path(tmp)
            run_part("pipeline", lambda: pipeline_part(str(device), args.iterations, args.prompts, root))
        _release_loaded()
        for method, run in res["pipeline"].get("runs", {}).items():
            if run["error"]:  # a failed gate stops a run: a finding that the exit status reports too
                res["errors"][f"pipeline {method}"] = run["error"]
        save()
    if "repeat" in args.parts:
        run_part("teacher_repeat", lambda: repeat_part(device, min(args.prompts, 32)))
    if "shapes" in args.parts:
        res["shapes"] = {}
        for name in args.shapes:
            def one(name: str = name) -> dict:
                return shape_part(name, SHAPES[name], device, peak, args.sequences, args.prompt_tokens,
                                  args.new_tokens, args.micro_batch, args.update_steps, args.score_passes)

            run_part(f"shape {name}", one)
            res["shapes"][name] = res.pop(f"shape {name}")
            save()
    print(summary(res), flush=True)
    print(f"wrote {out}", flush=True)
    return res


def _fmt(x: float | None, spec: str) -> str:
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def summary(res: dict) -> str:
    """A few lines: the gates of each run, the repeatability per dtype, the throughput table."""
    lines = [f"== gpu_check on {res['gpu'] or res['device']} (bf16 peak: {res['bf16_peak_source']})"]
    for method, run in res.get("pipeline", {}).get("runs", {}).items():
        verdicts = ", ".join(f"it{g['iteration']} {'pass' if g['passed'] else 'FAIL'} (repeat "
                             f"{g['gates']['teacher_repeat_diff']['value']:.3g} <= "
                             f"{g['gates']['teacher_repeat_diff']['threshold']}, {g['teacher_dtype']})"
                             for g in run["gates"])
        lines.append(f"pipeline {method}: accuracy {run.get('accuracy')}; gates: {verdicts or 'none ran'}"
                     + (f"; ERROR {run['error']}" if run["error"] else ""))
    repeats = [("testbed", res.get("teacher_repeat", {}))] + [(k, v.get("repeat", {}))
                                                             for k, v in res.get("shapes", {}).items()]
    for model, rep in repeats:
        for dtype in ("bfloat16", "float32"):
            if dtype in rep:
                r = rep[dtype]
                lines.append(f"repeat {model} {dtype}: batch 1 vs {r['sequences']}: max {r['max_abs']:.3g} mean "
                             f"{r['mean_abs']:.3g}; score vs gates re-score max {r['gate']['max_abs']:.3g} "
                             f"(limit {r['limit']})")
    if res.get("shapes"):
        lines.append("shape  stage    tokens/s     MFU   peak GiB   (tokens/s: rollout generated tokens; score and "
                     "update prompt + completion tokens)")
        for name, sh in res["shapes"].items():
            if "error" in sh:
                lines.append(f"{name:6} ERROR {sh['error']}")
                continue
            for stage in ("rollout", "score", "update"):
                st = sh[stage]
                if "skipped" in st:
                    lines.append(f"{name:6} {stage:7} skipped: {st['skipped']}")
                else:
                    lines.append(f"{name:6} {stage:7} {st['tokens_per_s']:10,.0f} {_fmt(st['mfu'], '7.1%')} "
                                 f"{_fmt(st['peak_gib'], '9.1f')}")
    for key, err in res["errors"].items():
        lines.append(f"FAILED {key}: {err}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
