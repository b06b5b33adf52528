"""Stage 5, `evaluate`: a checkpoint's answers to the held-out prompts (greedy; `pass_k` samples when > 1).

Accuracy, here and everywhere it is shown (the run table, the report, `opd sql` on `evals`), is per sample: the
share of correct samples, `avg(correct)` over the `evals` table. With one greedy sample per prompt that is the
share of prompts answered correctly; with `pass_k` > 1 it is the mean over each prompt's k samples (pass@1
estimated from k samples), and pass@k (a prompt counts if any of its k samples is correct) is recorded beside it
in the manifest as `pass_at_k`. On the testbed the manifest also holds `early_stop_rate`: the share of samples that
answer before the last step (the `consequential` fork, docs/testbed.md). With prompt-only data
(`data.answer_column` null) nothing is checked: `correct` is null and the accuracy None.

Every evaluation also measures how far the student is from its teacher without a reference answer: each answer's
exact reverse KL to the teacher (`opd_tasks.training.logprobs.reverse_kl`: teacher-forced on the student's own
answers, the teacher reading its own prompt, summed over the answer's tokens; column `rkl`), the manifest's
`rkl_per_token` (over every answer token) and `rkl_per_sequence` (the mean of `rkl`), and `truncated`, the share
of answers that hit `evaluation.max_new_tokens`. With `as_teacher` the teacher answers (with its context): the
headroom check before the first update (opd_tasks/stages/gates.py, `check_headroom`); its `rkl` is null.
"""

from __future__ import annotations

import pyarrow as pa

from opd_tasks.checkers import CHECKERS, extract_numeric_answer, extract_testbed_answer
from opd_tasks.data import teacher_prompts
from opd_tasks.stages.inputs import EvaluateInputs
from opd_tasks.stages.registry import Output, StageContext
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

EXTRACTORS = {"testbed": extract_testbed_answer, "numeric": extract_numeric_answer}
#: Answers per reverse-KL batch: two [answer tokens, vocabulary] float32 log-prob tensors per answer are kept.
RKL_BATCH = 16


def prompts_per_batch(x: EvaluateInputs) -> int:
    from opd_tasks.backends import hf_prompts_per_batch

    return hf_prompts_per_batch(x.evaluation.batch_size, x.evaluation.pass_k if x.evaluation.sampled else 1)


def evaluate(ctx: StageContext, x: EvaluateInputs, rows: list[int] | None) -> dict[str, pa.Table]:
    """The `evals` rows of the eval prompts `rows` (None: every one), in prompt order."""
    from opd_tasks.backends import HfBackend
    from opd_tasks.backends.hf import resolve_device, stop_token_ids
    from opd_tasks.backends.loaded import LOADED
    from opd_tasks.training.logprobs import reverse_kl

    cfg = x.evaluation
    prompts = ctx.store.read_table(x.prompts, "prompts")
    prompts = prompts if rows is None else prompts.take(sorted(rows))
    student_prompts = prompts.column("prompt_token_ids").to_pylist()
    teachers = teacher_prompts(prompts)
    toks = teachers if x.as_teacher else student_prompts
    refs = prompts.column("answer").to_pylist()
    pids = prompts.column("prompt_id").to_pylist()
    tok = LOADED.tokenizer(x.model)
    gens = HfBackend(ctx.device, cfg.batch_size).generate(
        x.model, toks, eos_token_id=stop_token_ids(tok, x.model.path), pad_token_id=tok.pad_token_id,
        n=cfg.pass_k if cfg.sampled else 1, temperature=1.0 if cfg.sampled else 0.0, top_p=1.0,
        max_new_tokens=cfg.max_new_tokens, seed=x.seed, want_logprobs=False, desc="evaluate", progress=ctx.progress,
        first_prompt=0 if rows is None else min(rows))
    check, extract = CHECKERS[x.checker], EXTRACTORS[x.checker]
    texts = [tok.decode(g.token_ids, skip_special_tokens=True) for g in gens]
    correct = [None if refs[g.prompt_index] is None else bool(check(t, refs[g.prompt_index]))
               for g, t in zip(gens, texts, strict=True)]
    rkl = [None] * len(gens)
    if x.teacher is not None and not x.as_teacher:
        # generation block by generation block (a part starts on one), so shards batch exactly as the whole does
        dev, block = resolve_device(ctx.device), prompts_per_batch(x)
        student_model, teacher_model = LOADED.model(x.model, dev), LOADED.model(x.teacher, dev)
        for first in range(0, len(prompts), block):
            idx = [i for i, g in enumerate(gens) if first <= g.prompt_index < first + block]
            per_token = reverse_kl(student_model, teacher_model, [student_prompts[gens[i].prompt_index] for i in idx],
                                   [teachers[gens[i].prompt_index] for i in idx],
                                   [gens[i].token_ids for i in idx], pad_token_id=tok.pad_token_id,
                                   batch_size=min(cfg.batch_size, RKL_BATCH))
            for i, v in zip(idx, per_token, strict=True):
                rkl[i] = float(sum(v))
    return {"evals": pa.table(
        {
            "prompt_id": [pids[g.prompt_index] for g in gens],
            "sample_id": pa.array([g.sample_id for g in gens], pa.int32()),
            "text": texts,
            "answer": [extract(t) for t in texts],
            "reference": [refs[g.prompt_index] for g in gens],
            "correct": correct,
            "num_tokens": pa.array([len(g.token_ids) for g in gens], pa.int32()),
            "rkl": pa.array(rkl, pa.float32()),
            "truncated": [g.finish_reason == "length" for g in gens],
        }
    )}


def summarize(ctx: StageContext, x: EvaluateInputs, tables: dict[str, pa.Table]) -> Output:
    """The answers with their summary: accuracy per sample, n, the testbed's early-stop rate, pass@k."""
    cfg = x.evaluation
    table = tables["evals"]
    correct = [c for c in table.column("correct").to_pylist() if c is not None]  # the answers with a reference
    texts = table.column("text").to_pylist()
    meta = {"accuracy": sum(correct) / len(correct) if correct else None, "n": table.num_rows,
            "truncated": sum(table.column("truncated").to_pylist()) / max(1, table.num_rows)}
    if x.teacher is not None and not x.as_teacher:
        rkl, lengths = table.column("rkl").to_pylist(), table.column("num_tokens").to_pylist()
        meta |= {"rkl_per_sequence": sum(rkl) / max(1, len(rkl)), "rkl_per_token": sum(rkl) / max(1, sum(lengths))}
    if x.checker == "testbed":  # the mechanism switch's readout (docs/testbed.md): answers before the last step
        from opd_tasks.testbed.labeler import stopped_early

        prompts = ctx.store.read_table(x.prompts, "prompts", columns=["prompt_id", "prompt"])
        asked = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist(), strict=True))
        meta["early_stop_rate"] = sum(stopped_early(t, asked[pid]) for pid, t in zip(
            table.column("prompt_id").to_pylist(), texts, strict=True)) / max(1, len(texts))
    if cfg.pass_k > 1 and correct:
        meta |= {"pass_at_k": pass_at_k(table.column("prompt_id").to_pylist(), table.column("correct").to_pylist()),
                 "k": cfg.pass_k}
    return Output(tables, meta)


def pass_at_k(prompt_ids: list[str], correct: list[bool]) -> float:
    """The share of prompts with at least one correct sample."""
    per: dict[str, bool] = {}
    for pid, ok in zip(prompt_ids, correct, strict=True):
        per[pid] = per.get(pid, False) or ok
    return sum(per.values()) / max(1, len(per))


def percent(value: float | None, missing: str = "n/a") -> str:
    """An accuracy as shown: 42.0%, or `missing` for prompt-only data."""
    return missing if value is None else f"{value:.1%}"


def nats(value: float | None) -> str:
    """A reverse KL as shown: 0.4130, or n/a where it was not measured (a model evaluated without a teacher)."""
    return "n/a" if value is None else f"{value:.4f}"


def accuracy(store: ArtifactStore, evals: ArtifactRef) -> float | None:
    """Accuracy per sample of an `evals` artifact: the share of its samples that are correct (module docstring);
    None for prompt-only data (no reference answers)."""
    value = store.manifest(evals)["meta"]["accuracy"]
    return None if value is None else float(value)
