"""The pipeline's stages, one module each, registered with `@stage` (opd_tasks/stages/registry.py).

    prompts -> rollout -> score -> gates -> analyze -> update -> evaluate

`STAGES` maps each name to its `Stage` record: what the CLI, the fault config, the deployments and
docs/stages.md list. `python -m opd_tasks.stages` prints docs/stages.md.
"""

from opd_tasks.stages.analyze import AnalyzeInputs
from opd_tasks.stages.evaluate import EvaluateInputs
from opd_tasks.stages.gates import GatesInputs, check_gates
from opd_tasks.stages.prompts import PromptsInputs
from opd_tasks.stages.registry import Stage, StageContext, StageInputs, compute, execute, registered
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


__all__ = ["ANALYZE", "EVALUATE", "GATES", "PROMPTS", "ROLLOUT", "SCORE", "STAGES", "UPDATE", "AnalyzeInputs",
           "EvaluateInputs", "GatesInputs", "PromptsInputs", "RolloutInputs", "ScoreInputs", "Stage", "StageContext",
           "StageInputs", "UpdateInputs", "check_gates", "compute", "execute", "gpu_stages"]
