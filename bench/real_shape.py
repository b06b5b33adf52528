"""Real shapes on the CPU: randomly initialised weights of the Qwen3-0.6B shape (vocabulary 151,936, two EOS ids
in generation_config.json, a chat template in the tokenizer config; nothing downloaded), one iteration of each
method on a handful of short prompts with the plain driver, and each stage's peak memory next to the memory model
(`memory_model`, the one docs/scaling.md "Memory per stage" tabulates for the Qwen example).

    python -m bench real_shape [--methods opd topd] [--prompts 4] [--keep DIR]

Writes bench/results/real_shape.json. tests/e2e/test_real_vocab_slow.py runs the same path (`build_pair`,
`overrides`) with a small hidden size and the real vocabulary.

The random models: the two Qwen3 EOS ids (`<|im_end|>` 151645, the tokenizer's EOS; `<|endoftext|>` 151643, also
the PAD) are made likely (`build_model`: one hidden unit of the final norm scaled up, the two EOS rows of the tied
embedding aligned with it, calibrated on the model's own hidden states), so that rollouts end on either, as a real
model's do; with plain random weights a rollout over 151,936 ids would never stop. The tokenizer is the testbed's
word-level vocabulary (so the testbed's prompts encode as usual) padded with filler tokens to the Qwen ids, with
Qwen's special tokens at Qwen's ids.

Each stage loads and frees its own models here (`OPD_MODELS_IN_MEMORY=0`, opd_tasks/backends/loaded.py), so that a
stage's peak is its own, as in a stage that runs in a pod of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

VOCAB = 151_936
ENDOFTEXT, IM_START, IM_END = 151_643, 151_644, 151_645
EOS_IDS = (IM_END, ENDOFTEXT)  # generation_config.json's order in Qwen3
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GiB = 2**30


@dataclass(frozen=True)
class Shape:
    """A decoder's shape (Qwen3 configs)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    vocab: int = VOCAB

    def params(self) -> int:
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        layer = attn + 3 * self.hidden * self.intermediate + 2 * self.hidden + 2 * self.head_dim
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * layer + self.hidden


QWEN3_0_6B = Shape(hidden=1024, intermediate=3072, layers=28, heads=16, kv_heads=8, head_dim=128, tied=True)
QWEN3_1_7B = Shape(hidden=2048, intermediate=6144, layers=28, heads=16, kv_heads=8, head_dim=128, tied=True)
QWEN3_8B = Shape(hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128, tied=False)
#: The slow test's: the real vocabulary, a small body.
SMALL = Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, tied=True)

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Sizes:
    """What a stage's memory depends on besides the shapes: sequences, lengths, batch sizes, dtypes."""

    sequences: int  # rollouts per iteration
    prompt_tokens: int
    completion_tokens: int  # rollout.max_new_tokens
    eval_prompts: int
    eval_tokens: int  # evaluation.max_new_tokens
    rollout_batch: int
    score_batch: int
    gates_batch: int
    analysis_batch: int
    micro_batch: int
    eval_batch: int
    student_dtype: str = "float32"
    teacher_dtype: str = "float32"
    update_bf16: bool = False  # the update's bf16 autocast (update.bf16 on CUDA): 16-bit activations


def memory_model(student: Shape, teacher: Shape, n: Sizes) -> dict[str, float]:
    """Peak bytes each stage adds to the process, the dominant terms of the code as it is (CPU or one GPU):

    - weights W = params x bytes of the dtype the stage loads;
    - KV cache: 2 x layers x kv_heads x head_dim x bytes per token;
    - logits: one [b, t, V] float32 tensor is b x t x V x 4 bytes; the stages' copies are counted per stage;
    - update activations (autograd's saved tensors, no recomputation): 34 x hidden bytes per token and layer in
      16-bit (Korthikanti et al. 2022, without the attention-score term that fused attention does not keep),
      twice that in float32.
    Not counted: the process itself (Python, torch: about 0.5 GiB), allocator slack, the swap/probe detectors'
    continuations (small at their batch sizes).
    """
    V, f32 = student.vocab, 4

    def w(s: Shape, dtype: str) -> float:
        return s.params() * BYTES[dtype]

    def kv(s: Shape, b: int, t: int, dtype: str) -> float:
        return 2 * s.layers * s.kv_heads * s.head_dim * b * t * BYTES[dtype]

    def logits(b: int, t: int) -> float:
        return b * t * V * f32

    seq = n.prompt_tokens + n.completion_tokens
    br, bs, ba, bu = (min(x, n.sequences) for x in (n.rollout_batch, n.score_batch, n.analysis_batch, n.micro_batch))
    be = min(n.eval_batch, n.eval_prompts)
    sd, td = n.student_dtype, n.teacher_dtype
    return {
        # generate: the KV cache; transformers keeps every step's [b, V] float32 logits (output_logits); the
        # sampled tokens' log-probs are taken one step at a time
        "rollout": w(student, sd) + kv(student, br, seq, sd) + logits(br, n.completion_tokens),
        # teacher forcing: the forward's logits at every position (the model's dtype), then the completion
        # positions' float32 logits, their log-softmax and its exp (the entropy)
        "score": w(teacher, td) + logits(bs, seq) * BYTES[td] / f32 + 3 * logits(bs, n.completion_tokens),
        # one model at a time (the student in float32, then the teacher), one sequence's logits and log-softmax
        "gates": max(w(student, "float32"), w(teacher, td)) + 2 * logits(1, n.completion_tokens),
        # swap detector: both models; the student statistics' logits, log-softmax and its exp for a batch
        "analyze": w(student, sd) + w(teacher, td) + 3 * logits(ba, n.completion_tokens),
        # float32 weights, gradients and two AdamW moments; a micro-batch's activations and its completion logits,
        # their log-softmax (kept for backward) and its gradient
        "update": 16 * student.params() + (34 if n.update_bf16 else 68) * student.hidden * student.layers * bu * seq
        + 3 * logits(bu, n.completion_tokens),
        "evaluate": w(student, sd) + kv(student, be, n.prompt_tokens + n.eval_tokens, sd) + 2 * logits(be, 1),
    }


# ------------------------------------------------------------------------------------------- models on disk


def qwen3_config(shape: Shape):
    """A transformers Qwen3Config of `shape` with Qwen3's special ids (BOS/PAD <|endoftext|>, EOS <|im_end|>)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, tie_word_embeddings=shape.tied,
                       max_position_embeddings=40_960, bos_token_id=ENDOFTEXT, eos_token_id=IM_END,
                       pad_token_id=ENDOFTEXT)


def build_tokenizer(out: Path):
    """The testbed's word-level vocabulary, padded with filler tokens to the Qwen ids, Qwen's special tokens at
    Qwen's ids, every id up to the vocabulary decodable; saved with a chat template. Returns the tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from opd_tasks.testbed.tokenizer import PRETOKENIZE_PATTERN, SPECIALS, UNK, vocabulary

    words = [t for t in vocabulary() if t not in SPECIALS] + [UNK]
    specials = {ENDOFTEXT: "<|endoftext|>", IM_START: "<|im_start|>", IM_END: "<|im_end|>"}
    tokens = words + [f"<|x{i}|>" for i in range(len(words), ENDOFTEXT)] + list(specials.values())
    tokens += [f"<|x{i}|>" for i in range(len(tokens), VOCAB)]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=UNK, additional_special_tokens=["<|im_start|>"], padding_side="left",
                                   clean_up_tokenization_spaces=False, model_max_length=40_960)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, shape: Shape, seed: int, eos_rate: float = 0.15, eos_logit: float = 13.0) -> None:
    """A randomly initialised Qwen3 causal LM of `shape` with the testbed-padded tokenizer, saved like a hub
    snapshot (float32 safetensors, config.json, generation_config.json with both EOS ids). On about `eos_rate` of
    the steps after the first, an EOS logit reaches `eos_logit` (about log V: then it is a likely token)."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(qwen3_config(shape))
    tok = build_tokenizer(out)
    text = tok.apply_chat_template([{"role": "user", "content": "Q 12 + 34 = ?"}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    with torch.no_grad():  # see the module docstring: make the two EOS ids likely, but not at the first step
        # Unit 0 of the final hidden state: its value at the first step (every prompt ends with the chat template's
        # "<|im_start|>assistant\n", so about one value) and over random continuations (what later steps see).
        after = torch.cat([prompt.expand(4, -1), torch.randint(0, ENDOFTEXT, (4, 32))], 1)
        unit = model.model(input_ids=after).last_hidden_state[:, :, 0]
        first, later = unit[0, prompt.shape[1] - 1], unit[:, prompt.shape[1]:].flatten()
        sign = -1.0 if first > later.median() else 1.0  # the EOS rows point away from the first step's value
        top = torch.quantile(sign * later, 1 - eos_rate)
        scale = eos_logit / float(top) if top > 0 else eos_logit
        gain = 20.0
        model.model.norm.weight[0] *= gain
        head = model.get_output_embeddings().weight
        head[ENDOFTEXT, 0], head[IM_END, 0] = sign * scale / gain, 0.95 * sign * scale / gain
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=ENDOFTEXT, eos_token_id=list(EOS_IDS), pad_token_id=ENDOFTEXT, do_sample=True,
                     temperature=0.6, top_p=0.95, top_k=20).save_pretrained(out)


def build_pair(base: Path, shape: Shape) -> tuple[Path, Path]:
    """(teacher dir, student dir): two random models of `shape` (seeds 1 and 0)."""
    teacher, student = base / "teacher", base / "student"
    build_model(teacher, shape, seed=1)
    build_model(student, shape, seed=0)
    return teacher, student


def overrides(teacher: Path, student: Path, root: Path, method: str, prompts: int = 4, max_new_tokens: int = 16
              ) -> list[str]:
    """The run config of one iteration of `method` on the pair: testbed prompts in the chat template, short
    completions. The truncation and top-k coverage gates are off (random models), the other two on."""
    return [f"models.teacher.path={teacher}", f"models.student.path={student}", f"root={root}", f"name={method}",
            f"method={method}", "device=cpu", "iterations=1", "data.chat_template=true",
            f"data.prompts_per_iteration={prompts}", "rollout.samples_per_prompt=2",
            f"rollout.max_new_tokens={max_new_tokens}", f"evaluation.max_new_tokens={max_new_tokens}",
            f"data.eval_size={prompts}", "gates.max_truncated=null", "gates.min_topk_coverage=null",
            "gates.min_headroom=null", "update.learning_rate=1e-5"]  # random models: no teacher is better


# ------------------------------------------------------------------------------------------- peak memory


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def run_measured(cfg) -> tuple[object, list[dict]]:
    """The plain driver's loop (`run_distillation` with the plain executor), noting around each computed stage the
    process's resident memory before it and its peak during it (Linux: VmHWM, reset through /proc/self/clear_refs).
    """
    from opd_tasks.pipeline import LocalExecutor, StageRunner, opened_run, run_distillation

    stages: list[dict] = []

    class Measured(LocalExecutor):
        def run(self, stage, ctx, inputs, parts):
            before = _status_kb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
            t0 = time.perf_counter()
            out = super().run(stage, ctx, inputs, parts)
            peak = _status_kb("VmHWM")
            stages.append({"stage": stage.name, "iteration": ctx.iteration,
                           "seconds": round(time.perf_counter() - t0, 2), "rss_before_gib": before / 2**20,
                           "peak_gib": peak / 2**20, "added_gib": (peak - before) / 2**20})
            return out

    with opened_run(cfg) as (store, lineage, _):
        result = run_distillation(StageRunner(store, lineage, cfg, Measured(), progress=False, log=print), cfg)
    return result, stages


def rollout_facts(root: Path, method: str) -> dict:
    """What the rollouts did with the two EOS ids: how each ended, and any declared EOS id inside a completion
    before its end (a stop that generation missed)."""
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    store = ArtifactStore(root)
    ref = RunLineage(store.layout, method).get(0, "rollout").ref
    t = store.read_table(ref, "rollouts").to_pylist()
    return {"sequences": len(t), "finish": {r: sum(x["finish_reason"] == r for x in t) for r in ("stop", "length")},
            "last_token": {str(e): sum(x["token_ids"][-1:] == [e] for x in t) for e in EOS_IDS},
            "eos_inside": sum(any(i in EOS_IDS for i in x["token_ids"][:-1]) for x in t),
            "prompt_tokens": max(len(x["prompt_token_ids"]) for x in t),
            "completion_tokens": max(len(x["token_ids"]) for x in t)}


def sizes_of(cfg, prompt_tokens: int, sequences: int) -> Sizes:
    return Sizes(sequences=sequences, prompt_tokens=prompt_tokens, completion_tokens=cfg.rollout.max_new_tokens,
                 eval_prompts=cfg.data.eval_size, eval_tokens=cfg.evaluation.max_new_tokens,
                 rollout_batch=cfg.rollout.batch_size, score_batch=cfg.scoring.batch_size,
                 gates_batch=cfg.gates.batch_size, analysis_batch=cfg.analysis.batch_size,
                 micro_batch=cfg.update.micro_batch_size, eval_batch=cfg.evaluation.batch_size,
                 student_dtype="float32", teacher_dtype="float32")


def qwen_example() -> dict[str, float]:
    """The memory model for configs/qwen3-1.7b-from-8b.yaml (prompts of about 276 tokens assumed), GiB."""
    from opd_tasks.config import RunConfig

    n = Sizes(sequences=64 * 8, prompt_tokens=276, completion_tokens=1024, eval_prompts=500, eval_tokens=1024,
              rollout_batch=32, score_batch=8, gates_batch=RunConfig().gates.batch_size, analysis_batch=16,
              micro_batch=4, eval_batch=RunConfig().evaluation.batch_size, student_dtype="float32",
              teacher_dtype="bfloat16", update_bf16=True)
    return {k: round(v / GiB, 1) for k, v in memory_model(QWEN3_1_7B, QWEN3_8B, n).items()}


def qwen_per_gpu(gpus: tuple[int, ...] = (1, 2, 4, 8)) -> dict[int, dict[str, float]]:
    """GiB per GPU of the Qwen example (`qwen_example`) on `gpus` GPUs, per stage, with the scale-out as built:
    rollout, score, analyze and evaluate in one shard per GPU (each shard a whole stage on its own batches: the
    same memory, 1/N of the rows); gates on one GPU; the update in FSDP2 over N ranks (`update.world_size`): the
    16 bytes per parameter divided by N, plus the parameters FSDP gathers at once in float32 (the root's tied
    embedding and two decoder layers: the one computing and the one prefetched), plus each rank's micro-batch
    activations and logits, as on one GPU."""
    one = qwen_example()
    s = QWEN3_1_7B
    layer = (s.params() - s.vocab * s.hidden - s.hidden) / s.layers
    state = 16 * s.params() / GiB
    gathered = (s.vocab * s.hidden + 2 * layer) * 4 / GiB
    per_rank = one["update"] - state  # activations and logits of one micro-batch
    return {n: {**one, "update": round(state / n + per_rank + (gathered if n > 1 else 0.0), 1)} for n in gpus}


def main(argv: list[str] | None = None) -> dict:
    from bench.common import save
    from opd_tasks.config_files import load_config
    from storage.store import ArtifactStore

    ap = argparse.ArgumentParser(prog="python -m bench real_shape")
    ap.add_argument("--methods", nargs="+", default=["opd", "topd"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--keep", default=None, help="build the models and roots here and keep them (default: a temp dir)")
    args = ap.parse_args(argv)
    os.environ["OPD_MODELS_IN_MEMORY"] = "0"  # see the module docstring
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="opd-real-shape-"))
    t0 = time.perf_counter()
    teacher, student = build_pair(base / "models", QWEN3_0_6B)
    build_s = time.perf_counter() - t0
    runs = {}
    try:
        for method in args.methods:
            root = base / f"root-{method}"
            cfg = load_config(None, overrides(teacher, student, root, method, args.prompts, args.max_new_tokens))
            t0 = time.perf_counter()
            result, stages = run_measured(cfg)
            facts = rollout_facts(root, method)
            model = memory_model(QWEN3_0_6B, QWEN3_0_6B, sizes_of(cfg, facts["prompt_tokens"], facts["sequences"]))
            for s in stages:
                if s["stage"] in model:
                    s["model_gib"] = model[s["stage"]] / GiB
                    s["measured_over_model"] = round(s["added_gib"] / s["model_gib"], 2)
            gates = result.iterations[0].stages["gates"].ref
            runs[method] = {"seconds": round(time.perf_counter() - t0, 1), "stages": stages, "rollouts": facts,
                            "accuracy": [r.accuracy for r in result.iterations],
                            "gates": ArtifactStore(root).manifest(gates)["meta"]["gates"]}
            print(json.dumps(runs[method], indent=1), flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)  # checkpoints: 2.4 GB of weights, 4.8 GB of AdamW state
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    payload = {"shape": asdict(QWEN3_0_6B), "params": QWEN3_0_6B.params(), "build_seconds": round(build_s, 1),
               "runs": runs, "qwen_example_model_gib": qwen_example()}
    out = save("real_shape", payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
