"""The real recipe's files (configs/smollm2-context.yaml, docs/real-models.md): the question file is what its script
writes, the worked examples are not questions, and the config is valid as committed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from opd_tasks.config_files import load_config
from opd_tasks.stages import check_config

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data" / "additions.jsonl"
RECIPE = REPO / "configs" / "smollm2-context.yaml"


def test_the_question_file_is_what_its_script_writes(tmp_path: Path) -> None:
    out = tmp_path / "additions.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_additions.py"), str(out)], check=True,
                   capture_output=True)
    assert out.read_bytes() == DATA.read_bytes()
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    assert len(rows) == 48 * 48 and len({r["question"] for r in rows}) == len(rows)
    for r in rows:  # every reference is the sum, by an independent parse of the question
        a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", r["question"]).groups())
        assert 2 <= a <= 49 and 2 <= b <= 49 and r["answer"] == str(a + b)


def test_the_recipe_is_valid_and_its_examples_are_not_questions() -> None:
    cfg = load_config(RECIPE, [])
    check_config(cfg)
    assert cfg.models.teacher.path == cfg.models.student.path == "imported:smollm2-135m-instruct"
    questions = {json.loads(line)["question"] for line in DATA.read_text().splitlines()}
    asked = [m.content for m in cfg.teacher_context.messages if m.role == "user"]
    answers = [m.content for m in cfg.teacher_context.messages if m.role == "assistant"]
    assert len(asked) == len(answers) == 4 and not set(asked) & questions
    for q, a in zip(asked, answers, strict=True):  # each worked example is right, in the format it teaches
        x, y = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", q).groups())
        assert a == f"{x} + {y} = {x + y}. The answer is {x + y}."
    assert cfg.data.path == "configs/data/additions.jsonl" and cfg.gates.min_headroom is not None
