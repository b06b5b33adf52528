"""A student's configured dtype holds after iteration 0 (issue 19, item 7): every spec the loop builds from a
checkpoint (the next iteration's student, a resumed run's) carries it, so sampling and evaluation stay in it."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_tasks.config_files import load_config
from opd_tasks.models import ModelSpec
from opd_tasks.pipeline import LocalExecutor, StageRunner, opened_run, run_distillation


class Recording(LocalExecutor):
    """The plain executor, noting which model spec each model-reading stage got."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[int, str, ModelSpec]] = []

    def run(self, stage, ctx, inputs, parts):
        for name in ("student", "model"):
            spec = getattr(inputs, name, None)
            if isinstance(spec, ModelSpec):
                self.seen.append((ctx.iteration, stage.name, spec))
        return super().run(stage, ctx, inputs, parts)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_student_dtype_is_kept_after_iteration_0(tmp_path: Path, dtype: str) -> None:
    def run(resume: bool) -> Recording:
        cfg = load_config(None, [f"root={tmp_path}", "name=dtype", f"models.student.dtype={dtype}", "iterations=2",
                                 "data.prompts_per_iteration=2", "rollout.samples_per_prompt=2",
                                 "rollout.max_new_tokens=16", "evaluation.max_new_tokens=16", "data.eval_size=2",
                                 "gates.enabled=false", "method=opd"])
        recording = Recording()
        with opened_run(cfg) as (store, lineage, _):
            run_distillation(StageRunner(store, lineage, cfg, recording, progress=False, log=lambda m: None), cfg,
                             resume=resume)
        return recording

    first = run(resume=False)
    resumed = run(resume=True)  # two more iterations after the latest checkpoint
    seen = first.seen + resumed.seen
    from_checkpoints = [(it, label) for it, label, spec in seen if spec.checkpoint is not None]
    assert {it for it, _ in from_checkpoints} == {0, 1, 2, 3}  # evaluate of it0 onwards, rollouts of it1 onwards
    assert "rollout" in {label for it, label in from_checkpoints if it == 2}  # the resumed run's first student
    assert all(spec.dtype == dtype for _, _, spec in seen), [(it, label, spec.dtype) for it, label, spec in seen]
