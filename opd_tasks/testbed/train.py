"""Supervised fine-tuning (SFT) of a testbed model on styled chains of thought, and greedy evaluation.

One readable loop, nanoGPT-style. Each step draws a fresh batch of training problems (with replacement),
renders their completions in the given style, and trains on `<bos> prompt completion <eos>` with the loss on
the completion tokens and the EOS only (prompt and padding are masked with -100). AdamW, OneCycle schedule
(warm-up then cosine decay), gradient clipping 1.0.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from opd_tasks.checkers import check_testbed
from opd_tasks.config import TestbedTaskConfig
from opd_tasks.progress import Bar
from opd_tasks.testbed.styles import Style
from opd_tasks.testbed.task import Problem, render_completion, sample_train_problems, seeded_rng


@dataclass
class TrainResult:
    steps: int
    seconds: float
    final_loss: float
    stopped_early: bool = False


def make_batch(
    tokenizer: PreTrainedTokenizerBase, problems: list[Problem], style: Style, rng: random.Random
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (prompt and padding labelled -100)."""
    rows, labels = [], []
    for p in problems:
        prompt = tokenizer(p.prompt).input_ids  # <bos> + prompt
        completion = tokenizer(render_completion(p, style, rng), add_special_tokens=False).input_ids
        completion.append(tokenizer.eos_token_id)
        rows.append(prompt + completion)
        labels.append([-100] * len(prompt) + completion)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels]),
    }


def sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TestbedTaskConfig,
    style: Style,
    steps: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    progress: bool = True,
    desc: str = "sft",
    callback: Callable[[int], bool] | None = None,
    callback_every: int = 50,
) -> TrainResult:
    """Train `model` in place for up to `steps` steps. `callback(step)` returning True stops training."""
    rng = seeded_rng("testbed-sft", seed, style.name)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0, loss_ema, step = time.perf_counter(), float("nan"), 0
    with Bar(steps, desc, "steps", progress) as bar:
        for step in range(1, steps + 1):
            batch = make_batch(tokenizer, sample_train_problems(task, batch_size, rng), style, rng)
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            loss_ema = loss.item() if step == 1 else 0.95 * loss_ema + 0.05 * loss.item()
            bar.update()
            bar.note(loss=f"{loss_ema:.3f}")
            if callback is not None and step % callback_every == 0 and callback(step):
                model.eval()
                return TrainResult(step, time.perf_counter() - t0, loss_ema, stopped_early=True)
    model.eval()
    return TrainResult(step, time.perf_counter() - t0, loss_ema)


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 128,
) -> list[str]:
    """Greedy completions (left-padded batches, special tokens stripped)."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
        gen = model.generate(  # ids and mask only: transformers 4.5x refuses the tokenizer's token_type_ids
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    tokenizer.padding_side = side
    return out


def accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], max_new_tokens: int
) -> float:
    """Greedy exact-match accuracy with the testbed checker."""
    completions = generate_completions(model, tokenizer, [p.prompt for p in problems], max_new_tokens)
    return sum(check_testbed(c, p.answer) for c, p in zip(completions, problems, strict=True)) / len(problems)
