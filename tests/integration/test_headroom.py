"""The headroom gate's failing path: a teacher that is not better than the student stops the run before its first
update, with one error naming both evaluations, and nothing is trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_tasks.config_files import load_config
from opd_tasks.errors import DataError
from opd_tasks.pipeline import run_plain
from storage.lineage import RunLineage
from tests.helpers import tiny_model_dir


def test_a_teacher_no_better_than_the_student_stops_the_run_before_the_update(tmp_path: Path) -> None:
    s, _ = tiny_model_dir(tmp_path / "student", seed=0, hidden=32)  # random weights: both answer nothing right
    t, _ = tiny_model_dir(tmp_path / "teacher", seed=1, hidden=48)
    cfg = load_config(None, [f"models.student.path={s}", f"models.teacher.path={t}", f"root={tmp_path / 'root'}",
                             "name=hr", "method=opd", "iterations=1", "data.eval_size=4", "evaluation.max_new_tokens=4",
                             "gates.min_headroom=0.05"])
    with pytest.raises(DataError, match=r"headroom gate: the teacher answers 0\.0% of the 4 held-out samples "
                                        r"correctly and the student 0\.0%, so the teacher is not 5\.0% better") as e:
        run_plain(cfg, log=lambda m: None, progress=False)
    lineage = RunLineage(tmp_path / "root", "hr")
    assert {x.stage for x in lineage.entries()} == {"eval_prompts", "baseline", "teacher_eval"}  # nothing trained
    teacher, student = lineage.get(0, "teacher_eval").ref.short(), lineage.get(0, "baseline").ref.short()
    assert f"{teacher} (teacher) and {student} (student)" in str(e.value)
