"""The stage table: every stage once, in pipeline order, with its compute named by dotted path.

    prompts -> rollout -> score -> gates -> analyze -> update -> evaluate

The CLI (`--refresh`, `opd deploy-stages`), the config checks (`check_config`), the deployments, the views, the
report and docs/stages.md all read `STAGES`. Importing this module imports no stage code (and no torch): a stage's
functions are imported when it first runs (`Stage.fn`). `python -m opd_tasks.stages` prints docs/stages.md.
"""

from __future__ import annotations

import os
from pathlib import Path

from opd_tasks.errors import ConfigError
from opd_tasks.stages.inputs import (
    AnalyzeInputs,
    EvaluateInputs,
    GatesInputs,
    PromptsInputs,
    RolloutInputs,
    ScoreInputs,
    StageInputs,
    UpdateInputs,
    field_role,
)
from opd_tasks.stages.registry import Output, Rows, Span, Stage, StageContext, plan_call, run_stage

_S = "opd_tasks.stages"

#: By (prompt_id): a prompt's row; by (prompt_id, sample_id): a rollout's.
_PROMPT, _ROLLOUT = ("prompt_id",), ("prompt_id", "sample_id")

_TABLE = (
    Stage("prompts", 3, PromptsInputs, ("prompts",), f"{_S}.prompts:prompts", gpu=False,
          summary="The prompts of one iteration's slice (or of the eval set), tokenized."),
    Stage("rollout", 2, RolloutInputs, ("rollouts",), f"{_S}.rollout:rollout",
          rows=Rows("prompts", "prompts", _PROMPT, block=f"{_S}.rollout:prompts_per_batch"),
          finish=f"{_S}.rollout:summarize",
          summary="The student's sampled completions with per-token log-probs and rewards."),
    Stage("score", 2, ScoreInputs, ("teacher_scores",), f"{_S}.score:score",
          rows=Rows("rollouts", "rollouts", _ROLLOUT, block=f"{_S}.score:sequences_per_batch",
                    order=f"{_S}.score:length_order"),
          finish=f"{_S}.score:summarize",
          summary="The teacher's log-prob, top-k and entropy at every sampled token."),
    Stage("gates", 3, GatesInputs, (), f"{_S}.gates:gates",
          summary="Quality figures of the rollouts and scores, each against its threshold (manifest meta only)."),
    Stage("analyze", 9, AnalyzeInputs, ("tokens", "probes"), f"{_S}.analyze:analyze",
          rows=Rows("rollouts", "rollouts", _ROLLOUT, block=f"{_S}.analyze:sequences_per_batch",
                    order=f"{_S}.analyze:analysed_rows", whole=f"{_S}.analyze:needs_every_sequence"),
          prepare=f"{_S}.analyze:high_loss_cut", finish=f"{_S}.analyze:finish",
          summary="Per-token losses, high-loss tokens, near-future detection, regimes and token weights."),
    Stage("update", 7, UpdateInputs, ("updates", "old_logprobs", "checkpoint"), f"{_S}.update:update",
          summary="One distillation update of the student: a checkpoint and the per-step losses."),
    Stage("evaluate", 3, EvaluateInputs, ("evals",), f"{_S}.evaluate:evaluate",
          rows=Rows("prompts", "prompts", _PROMPT, block=f"{_S}.evaluate:prompts_per_batch"),
          finish=f"{_S}.evaluate:summarize",
          summary="The model's answers to the eval prompts, checked where a reference exists; accuracy per sample."),
)
STAGES: dict[str, Stage] = {s.name: s for s in _TABLE}
assert len(STAGES) == len(_TABLE), "a stage is listed twice"
PROMPTS, ROLLOUT, SCORE, GATES, ANALYZE, UPDATE, EVALUATE = STAGES.values()


def gpu_stages() -> tuple[str, ...]:
    """The stages that need a GPU with a real model: each can run as its own deployment and carries the
    concurrency tag."""
    return tuple(name for name, s in STAGES.items() if s.gpu)


def sharded_stages() -> tuple[str, ...]:
    """The row-parallel stages, which `orchestration.shards` splits into parts."""
    return tuple(name for name, s in STAGES.items() if s.rows is not None)


def shards_for(orchestration, stage: str) -> int:
    """How many shards `stage` runs in under `orchestration` (1 for a stage that is not row-parallel)."""
    if stage not in sharded_stages():
        return 1
    return orchestration.stage_shards.get(stage, orchestration.shards)


def check_config(cfg) -> None:
    """What the config cannot check alone, because it needs the stage table: called when a run opens (and by
    `opd config show`). ConfigError naming the key."""
    o, f = cfg.orchestration, cfg.fault
    problems = []
    if bad := sorted(set(o.stage_shards) - set(sharded_stages())):
        problems.append(f"orchestration.stage_shards: {bad}: not a sharded stage; sharded stages are "
                        f"{', '.join(sharded_stages())}")
    if f.stage is not None and f.stage not in STAGES:
        problems.append(f"fault.stage: unknown stage {f.stage!r}; stages are {', '.join(STAGES)}")
    elif f.shard is not None:  # a shard the stage has, or the drill would pass without failing anything
        shards = shards_for(o, f.stage) if f.stage is not None else 1
        # the analysis' `whole` hook reads only `analysis`, which the run config holds as the inputs do
        whole = STAGES[f.stage].fn("whole")(cfg) if f.stage == "analyze" else None
        if whole:
            problems.append(f"fault.shard is {f.shard}, but stage 'analyze' runs as one part: {whole}")
        elif shards == 1 or f.shard >= shards:
            problems.append(f"fault.shard is {f.shard}, but stage {f.stage!r} runs in {shards} shard(s) "
                            "(orchestration.shards / orchestration.stage_shards; the sharded stages are "
                            f"{', '.join(sharded_stages())}): the fault would never fire")
    if cfg.data.answer_column is None and cfg.gates.checks_headroom:
        problems.append(f"gates.min_headroom ({cfg.gates.min_headroom}) compares the teacher's and the student's "
                        "accuracy, which prompt-only data (data.answer_column: null) does not have; set "
                        "gates.min_headroom: null (the reverse KL to the teacher is the metric)")
    cores = os.cpu_count() or 1
    on_this_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not Path("/dev/nvidiactl").exists())
    if on_this_cpu and cfg.orchestration.stage_runner != "deployment" and cfg.update.world_size > cores:
        problems.append(f"update.world_size is {cfg.update.world_size}, but this machine has {cores} CPU core(s): "
                        "on the CPU each rank is a process with its own shard, its threads and a gloo link to every "
                        f"other rank, so more ranks than cores only slow the update down; use at most {cores}")
    if problems:
        raise ConfigError("; ".join(problems))


def stage_deployment_name(orchestration, stage: str) -> str:
    """The full deployment name ('opd-stage/rollout') that runs `stage` under the deployment executor."""
    if stage not in gpu_stages():
        raise ConfigError(f"stage {stage!r} has no deployment; GPU stages are {', '.join(gpu_stages())}")
    return orchestration.stage_deployment.replace("{stage}", stage)


def reference_markdown() -> str:
    """docs/stages.md, generated from the table (a test checks the committed file is current)."""
    lines = ["# Stages", "",
             "Generated from the stage table by `python -m opd_tasks.stages > docs/stages.md`; do not edit by hand.",
             "Each stage is one module in `opd_tasks/stages/`, listed once in the table in "
             "`opd_tasks/stages/__init__.py` (docs/architecture.md says how to add one).", "A stage's cache key is "
             "the sha256 of its name, version and its inputs: artifacts and models by content hash, config by "
             "value, the seed.", "",
             "Sharded: the stage splits into `orchestration.shards` parts (docs/scaling.md).", "",
             "| stage | version | GPU | sharded | writes | what it does |", "|---|---|---|---|---|---|"]
    for s in STAGES.values():
        lines.append(f"| `{s.name}` | {s.version} | {'yes' if s.gpu else 'no'} | {'yes' if s.rows else 'no'} | "
                     f"{', '.join(f'`{o}`' for o in s.outputs) or 'manifest meta only'} | {s.summary} |")
    for s in STAGES.values():
        lines += ["", f"## {s.name}", "", " ".join((s.inputs.__doc__ or "").split()), "",
                  "| input | type | in the key as |", "|---|---|---|"]
        for name, fld in s.inputs.model_fields.items():
            typ = " | ".join(t.rsplit(".", 1)[-1] for t in str(fld.annotation).replace("<class '", "")
                             .replace("'>", "").split(" | "))
            how = {"unkeyed": "not keyed (read only; see the stage module)", "seed": "the seed",
                   "input": "content hash", "config": "config value"}[field_role(s.inputs, name)]
            if note := getattr(fld.annotation, "key_note", None):
                how += f", {note}"
            lines.append(f"| `{name}` | `{typ}` | {how} |")
        if s.inputs.key_parts is not StageInputs.key_parts:
            lines += ["", "Key: " + " ".join((s.inputs.key_parts.__doc__ or "").split())]
    return "\n".join(lines) + "\n"


__all__ = ["ANALYZE", "EVALUATE", "GATES", "PROMPTS", "ROLLOUT", "SCORE", "STAGES", "UPDATE", "AnalyzeInputs",
           "EvaluateInputs", "GatesInputs", "Output", "PromptsInputs", "RolloutInputs", "Rows", "ScoreInputs", "Span",
           "Stage", "StageContext", "StageInputs", "UpdateInputs", "check_config", "gpu_stages", "plan_call",
           "reference_markdown", "run_stage", "shards_for", "sharded_stages", "stage_deployment_name"]
