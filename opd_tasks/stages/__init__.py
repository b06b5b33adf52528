"""The pipeline's stages, one module each, registered with `@stage` (opd_tasks/stages/registry.py).

    prompts -> rollout -> score -> gates -> analyze -> update -> evaluate

`STAGES` maps each name to its `Stage` record: what the CLI, the fault config, the deployments and
docs/stages.md list. `python -m opd_tasks.stages` prints docs/stages.md.
"""

from opd_tasks.stages.analyze import AnalyzeInputs
from opd_tasks.stages.evaluate import EvaluateInputs
from opd_tasks.stages.gates import GatesInputs, check_gates
from opd_tasks.stages.prompts import PromptsInputs
from opd_tasks.stages.registry import Stage, StageContext, StageInputs, compute, execute, field_role, registered
from opd_tasks.stages.rollout import RolloutInputs
from opd_tasks.stages.score import ScoreInputs
from opd_tasks.stages.update import UpdateInputs

#: Pipeline order: the order in which an iteration runs them (opd_tasks/pipeline.py) and lists show them.
ORDER = ("prompts", "rollout", "score", "gates", "analyze", "update", "evaluate")
assert set(ORDER) == set(registered()), f"stages registered {sorted(registered())}, ordered {ORDER}"

STAGES: dict[str, Stage] = {name: registered()[name] for name in ORDER}
PROMPTS, ROLLOUT, SCORE, GATES, ANALYZE, UPDATE, EVALUATE = STAGES.values()


def gpu_stages() -> tuple[str, ...]:
    """The stages that need a GPU with a real model: each can run as its own deployment and carries the
    concurrency tag."""
    return tuple(name for name, s in STAGES.items() if s.gpu)


def sharded_stages() -> tuple[str, ...]:
    """The row-parallel stages, which `orchestration.shards` splits (opd_tasks/stages/sharding.py)."""
    return tuple(name for name, s in STAGES.items() if s.shards is not None)


def reference_markdown() -> str:
    """docs/stages.md, generated from the registry (a test checks the committed file is current)."""
    lines = ["# Stages", "",
             "Generated from the stage registry by `python -m opd_tasks.stages > docs/stages.md`; do not edit by hand.",
             "Each stage is one module in `opd_tasks/stages/`, registered with `@stage` (docs/architecture.md says "
             "how to add one).", "A stage's cache key is the sha256 of its name, version and its inputs: artifacts "
             "and models by content hash, config by value, the seed.", "",
             "Sharded: the stage splits into `orchestration.shards` parts (docs/scaling.md).", "",
             "| stage | version | GPU | sharded | writes | what it does |", "|---|---|---|---|---|---|"]
    for s in STAGES.values():
        lines.append(f"| `{s.name}` | {s.version} | {'yes' if s.gpu else 'no'} | {'yes' if s.shards else 'no'} | "
                     f"{', '.join(f'`{o}`' for o in s.outputs) or 'manifest meta only'} | {s.summary} |")
    for s in STAGES.values():
        lines += ["", f"## {s.name}", "", " ".join((s.inputs.__doc__ or "").split()), "",
                  "| input | type | in the key as |", "|---|---|---|"]
        for name, field in s.inputs.model_fields.items():
            typ = " | ".join(t.rsplit(".", 1)[-1] for t in str(field.annotation).replace("<class '", "")
                             .replace("'>", "").split(" | "))
            how = {"unkeyed": "not keyed (read only; see the stage module)", "seed": "the seed",
                   "input": "content hash", "config": "config value"}[field_role(s.inputs, name)]
            if note := getattr(field.annotation, "key_note", None):
                how += f", {note}"
            lines.append(f"| `{name}` | `{typ}` | {how} |")
        if s.inputs.key_parts is not StageInputs.key_parts:
            lines += ["", "Key: " + " ".join((s.inputs.key_parts.__doc__ or "").split())]
    return "\n".join(lines) + "\n"


__all__ = ["ANALYZE", "EVALUATE", "GATES", "PROMPTS", "ROLLOUT", "SCORE", "STAGES", "UPDATE", "AnalyzeInputs",
           "EvaluateInputs", "GatesInputs", "PromptsInputs", "RolloutInputs", "ScoreInputs", "Stage", "StageContext",
           "StageInputs", "UpdateInputs", "check_gates", "compute", "execute", "gpu_stages", "ORDER",
           "reference_markdown", "sharded_stages"]
