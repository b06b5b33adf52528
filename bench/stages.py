"""Stage overhead: each `hf` stage vs the bare model compute it wraps, on the same batch, side by side.

- rollout  vs  one plain `model.generate` call per batch (same prompts, samples, max_new_tokens, seed)
- score    vs  plain forward passes over the same right-padded batches
- update   vs  plain forward + backward + AdamW step over the same micro-batches
Each repetition runs stage and bare back to back (alternating order), in a fresh store so nothing is cached.
Reports tokens/s (completion tokens) and the ratio stage/bare (median over repetitions).

    python -m bench stages --prompts 64 --samples 4 --reps 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.common import median, peak_rss_mb, save
from opd_tasks.backends.hf import load_causal_lm, pack_right
from opd_tasks.config import DataConfig, ModelRef, RolloutConfig, ScoringConfig, UpdateConfig
from opd_tasks.models import ModelSpec, spec_of
from opd_tasks.stages import (
    PROMPTS,
    ROLLOUT,
    SCORE,
    UPDATE,
    PromptsInputs,
    RolloutInputs,
    ScoreInputs,
    UpdateInputs,
)
from storage.store import ArtifactStore

console = Console(width=160)
CPU = torch.device("cpu")


def spec(path: str) -> ModelSpec:
    return spec_of(ModelRef(path=path))


def bare_generate(model, prompts: list[list[int]], n: int, max_new: int, batch: int, pad: int, eos: int, seed: int):
    per = max(1, batch // n)
    toks = 0
    for bi, s in enumerate(range(0, len(prompts), per)):
        chunk = prompts[s : s + per]
        w = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), w), pad)
        mask = torch.zeros((len(chunk), w), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, w - len(p) :] = torch.tensor(p)
            mask[i, w - len(p) :] = 1
        torch.manual_seed(seed * 1_000_003 + bi)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=n,
                             max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=0, eos_token_id=eos,
                             pad_token_id=pad)
        toks += int((out[:, w:] != pad).sum())
    return toks


@torch.no_grad()
def bare_forward(model, prompts, comps, batch: int) -> None:
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(comps[i]))
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        ids, attn, _, _ = pack_right([prompts[i] for i in idx], [comps[i] for i in idx], 0)
        model(input_ids=ids, attention_mask=attn)


def bare_train(model, prompts, comps, micro: int, lr: float) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for s in range(0, len(prompts), micro):
        ids, attn, pred, cmask = pack_right(prompts[s : s + micro], comps[s : s + micro], 0)
        logits = model(input_ids=ids, attention_mask=attn).logits
        loss = logits.float().log_softmax(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench stages", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--student", default="testbed:student")
    ap.add_argument("--teacher", default="testbed:teacher")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    student, teacher = spec(args.student), spec(args.teacher)
    rcfg = RolloutConfig(samples_per_prompt=args.samples, max_new_tokens=args.max_new_tokens,
                         batch_size=args.prompts * args.samples)
    scfg = ScoringConfig(top_k=8, batch_size=64)
    ucfg = UpdateConfig(micro_batch_size=32, learning_rate=1e-4)
    s_model, t_model = load_causal_lm(student.path, CPU), load_causal_lm(teacher.path, CPU)
    times: dict[str, list[float]] = {k: [] for k in ("rollout", "rollout_bare", "score", "score_bare",
                                                       "update", "update_bare")}
    n_tok = 0
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory() as tmp:
            store = ArtifactStore(Path(tmp))
            pr = PROMPTS(store, PromptsInputs(data=DataConfig(prompts_per_iteration=args.prompts), tokenizer=student,
                                              split="train", n=args.prompts, offset=0, max_context=None, seed=0))
            ptab = store.read_table(pr)
            prompts = ptab.column("prompt_token_ids").to_pylist()
            order = ["stage", "bare"] if rep % 2 == 0 else ["bare", "stage"]
            for side in order:
                t0 = time.perf_counter()
                if side == "stage":
                    roll = ROLLOUT(store, RolloutInputs(student=student, prompts=pr, rollout=rcfg, checker="testbed",
                                                        seed=rep), device="cpu", progress=False)
                    times["rollout"].append(time.perf_counter() - t0)
                else:
                    bare_generate(s_model, prompts, args.samples, args.max_new_tokens, rcfg.batch_size, 0, 2, rep)
                    times["rollout_bare"].append(time.perf_counter() - t0)
            rt = store.read_table(roll)
            rp, rc = rt.column("prompt_token_ids").to_pylist(), rt.column("token_ids").to_pylist()
            n_tok = sum(len(c) for c in rc)
            for side in order:
                t0 = time.perf_counter()
                if side == "stage":
                    sc = SCORE(store, ScoreInputs(teacher=teacher, student=student, rollouts=roll, scoring=scfg),
                               device="cpu", progress=False)
                    times["score"].append(time.perf_counter() - t0)
                else:
                    bare_forward(t_model, rp, rc, scfg.batch_size)
                    times["score_bare"].append(time.perf_counter() - t0)
            for side in order:
                t0 = time.perf_counter()
                if side == "stage":
                    inputs = UpdateInputs(student=student, rollouts=roll, scores=sc, analysis=None, teacher=teacher,
                                          update=ucfg, bridge=None, seed=rep)
                    UPDATE(store, inputs, device="cpu", progress=False)
                    times["update"].append(time.perf_counter() - t0)
                else:
                    m = load_causal_lm(student.path, CPU, "float32")
                    bare_train(m, rp, rc, ucfg.micro_batch_size, ucfg.learning_rate)
                    times["update_bare"].append(time.perf_counter() - t0)
    res = {"args": vars(args), "completion_tokens": n_tok, "peak_rss_mb": peak_rss_mb(), "stages": []}
    t = Table("stage", "stage s", "bare s", "stage tok/s", "bare tok/s", "overhead (stage/bare)",
              title=f"hf stages vs bare compute ({args.prompts} prompts x {args.samples} samples, "
                    f"~{n_tok} completion tokens, median of {args.reps})")
    for st in ("rollout", "score", "update"):
        a, b = median(times[st]), median(times[st + "_bare"])
        res["stages"].append({"stage": st, "stage_s": a, "bare_s": b, "ratio": a / b,
                              "stage_tok_s": n_tok / a, "bare_tok_s": n_tok / b, "all": times[st],
                              "all_bare": times[st + "_bare"]})
        t.add_row(st, f"{a:.2f}", f"{b:.2f}", f"{n_tok / a:,.0f}", f"{n_tok / b:,.0f}", f"{a / b:.2f}x")
    console.print(t)
    out = save("stages", res)
    console.print(f"results: {out}")
    return res


if __name__ == "__main__":
    main()
