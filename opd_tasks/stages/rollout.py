"""Stage 1, `rollout`: the student samples completions; per token the sampled id and its log-prob.

The backend (`rollout.backend`: `hf` or `vllm`, opd_tasks/backends/) generates; this stage writes the `rollouts`
table, ordered by (prompt_id, sample_id), with the sampled tokens' raw (temperature-1) log-probs and each
completion's reward from the task's answer checker.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.checkers import CHECKERS
from opd_tasks.config import RolloutConfig
from opd_tasks.models import ModelSpec
from opd_tasks.stages.registry import StageContext, StageInputs, stage
from opd_tasks.stages.sharding import Part, Shards, Units, concat, input_rows
from storage.refs import ArtifactRef


class RolloutInputs(StageInputs):
    """`rollout.samples_per_prompt` completions of each prompt by `student`; `checker` scores the answers."""

    student: ModelSpec
    prompts: ArtifactRef
    rollout: RolloutConfig
    checker: str
    seed: int


def prompts_per_batch(x: RolloutInputs) -> int:
    from opd_tasks.backends import prompts_per_batch

    return prompts_per_batch(x.rollout, x.rollout.samples_per_prompt)


def sample(ctx: StageContext, x: RolloutInputs, units: Units) -> dict[str, pa.Table]:
    """The `rollouts` rows of the prompts `units` (all of them, or a shard's)."""
    from opd_tasks.backends import backend_for
    from opd_tasks.backends.hf import stop_token_ids
    from opd_tasks.backends.loaded import LOADED

    backend = backend_for(x.rollout, ctx.device, "rollout.backend")  # refuses before any work if it cannot run
    check = CHECKERS[x.checker]
    prompts = units.of(ctx.store.read_table(x.prompts, "prompts"))
    prompt_ids = prompts.column("prompt_id").to_pylist()
    prompt_tokens = prompts.column("prompt_token_ids").to_pylist()
    answers = prompts.column("answer").to_pylist()
    tok = LOADED.tokenizer(x.student)
    s = x.rollout
    completions = backend.generate(x.student, prompt_tokens, eos_token_id=stop_token_ids(tok, x.student.path),
                                   pad_token_id=tok.pad_token_id, n=s.samples_per_prompt, temperature=s.temperature,
                                   top_p=s.top_p, max_new_tokens=s.max_new_tokens, seed=x.seed, desc="rollout",
                                   progress=ctx.progress, first_prompt=units.start)
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
        }
    )}


@stage("rollout", version=1, inputs=RolloutInputs, outputs=("rollouts",),
       shards=Shards(units=input_rows("prompts", "prompts"), block=prompts_per_batch, part=sample))
def rollout(ctx: StageContext, x: RolloutInputs, parts: list[Part]) -> ArtifactRef:
    """The student's sampled completions with per-token log-probs and rewards."""
    table = concat(parts)
    tokens = pc.list_value_length(table.column("token_ids"))
    meta = {"sequences": table.num_rows, "tokens": int(pc.sum(tokens).as_py() or 0),
            "stopped": int(pc.sum(pc.equal(table.column("finish_reason"), "stop")).as_py() or 0)}
    return ctx.put_table("rollouts", table, meta=meta)
