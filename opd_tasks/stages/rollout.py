"""Stage 1, `rollout`: the student samples completions; per token the sampled id and its log-prob.

The backend (`rollout.backend`: `hf` or `vllm`, opd_tasks/backends/) generates; this stage writes the `rollouts`
table, ordered by (prompt_id, sample_id), with the sampled tokens' raw (temperature-1) log-probs and each
completion's reward from the task's answer checker.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.checkers import CHECKERS
from opd_tasks.stages.inputs import RolloutInputs
from opd_tasks.stages.registry import Output, StageContext


def prompts_per_batch(x: RolloutInputs) -> int:
    from opd_tasks.backends import prompts_per_batch

    return prompts_per_batch(x.rollout, x.rollout.samples_per_prompt)


def rollout(ctx: StageContext, x: RolloutInputs, rows: list[int] | None) -> dict[str, pa.Table]:
    """The `rollouts` rows of the prompts `rows` (None: every prompt), in prompt order."""
    from opd_tasks.backends import backend_for
    from opd_tasks.backends.hf import stop_token_ids
    from opd_tasks.backends.loaded import LOADED

    backend = backend_for(x.rollout, ctx.device, "rollout.backend")  # refuses before any work if it cannot run
    check = CHECKERS[x.checker]
    prompts = ctx.store.read_table(x.prompts, "prompts")
    prompts = prompts if rows is None else prompts.take(sorted(rows))
    prompt_ids = prompts.column("prompt_id").to_pylist()
    prompt_tokens = prompts.column("prompt_token_ids").to_pylist()
    answers = prompts.column("answer").to_pylist()
    teacher_prompts = prompts.column("teacher_prompt_token_ids").to_pylist()
    tok = LOADED.tokenizer(x.student)
    s = x.rollout
    completions = backend.generate(x.student, prompt_tokens, eos_token_id=stop_token_ids(tok, x.student.path),
                                   pad_token_id=tok.pad_token_id, n=s.samples_per_prompt, temperature=s.temperature,
                                   top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=x.seed, desc="rollout",
                                   progress=ctx.progress, first_prompt=0 if rows is None else min(rows))
    texts = [tok.decode(c.token_ids, skip_special_tokens=True) for c in completions]
    return {"rollouts": pa.table(
        {
            "prompt_id": [prompt_ids[c.prompt_index] for c in completions],
            "sample_id": pa.array([c.sample_id for c in completions], pa.int32()),
            "prompt_token_ids": pa.array([prompt_tokens[c.prompt_index] for c in completions], pa.list_(pa.int32())),
            "token_ids": pa.array([c.token_ids for c in completions], pa.list_(pa.int32())),
            "logprobs": pa.array([c.logprobs for c in completions], pa.list_(pa.float32())),
            "text": texts,
            "finish_reason": [c.finish_reason for c in completions],
            "reward": pa.array(
                [float(check(t, answers[c.prompt_index])) if answers[c.prompt_index] is not None else None
                 for c, t in zip(completions, texts, strict=True)],
                pa.float32(),
            ),
            "teacher_prompt_token_ids": pa.array([teacher_prompts[c.prompt_index] for c in completions],
                                                 pa.list_(pa.int32())),
        }
    )}


def summarize(ctx: StageContext, x: RolloutInputs, tables: dict[str, pa.Table]) -> Output:
    """The rollouts with their summary: sequences, tokens, how many stopped at an EOS."""
    table = tables["rollouts"]
    tokens = pc.list_value_length(table.column("token_ids"))
    meta = {"sequences": table.num_rows, "tokens": int(pc.sum(tokens).as_py() or 0),
            "stopped": int(pc.sum(pc.equal(table.column("finish_reason"), "stop")).as_py() or 0)}
    return Output(tables, meta)
