"""Prompt-only data (`data.answer_column: null`): rows without a reference answer are kept, nothing is checked, and
the evaluation's metric is the reverse KL of the student's answers to the teacher. One run of the plain driver on
tiny random models, then what a user reads: the run's summary, the `evals` rows through `opd sql`, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd_tasks.config_files import load_config
from opd_tasks.errors import ConfigError
from opd_tasks.pipeline import run_plain
from opd_tasks.stages import check_config
from storage.views import connect
from tests.helpers import tiny_model_dir

QUESTIONS = [f"{a}+{b}=" for a in range(10, 30) for b in (3, 7)]  # 40 rows, no answers


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("prompt-only")
    s, _ = tiny_model_dir(base / "student", seed=0, hidden=32)
    t, _ = tiny_model_dir(base / "teacher", seed=1, hidden=48)
    data = base / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    cfg = load_config(None, [
        f"models.student.path={s}", f"models.teacher.path={t}", f"root={base / 'root'}", "name=po", "method=opd",
        "data.source=dataset", f"data.path={data}", "data.answer_column=null", "data.eval_size=6",
        "data.prompts_per_iteration=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
        "evaluation.max_new_tokens=6", "iterations=1",
        # random tiny models: no EOS, little top-k agreement; the headroom gate needs accuracies (refused below)
        "gates.max_truncated=null", "gates.min_topk_coverage=null", "gates.min_headroom=null"])
    out = run_plain(cfg, log=lambda m: None, progress=False)
    return base / "root", out.summary()


def test_the_run_has_no_accuracy_and_measures_the_reverse_kl(run) -> None:
    _, summary = run
    assert summary["baseline_accuracy"] is None and summary["iterations"][0]["accuracy"] is None
    assert summary["baseline_rkl_per_token"] > 0 and summary["iterations"][0]["rkl_per_token"] > 0


def test_no_row_is_dropped_and_nothing_is_checked(run) -> None:
    root, _ = run
    with connect(root) as con:
        rows = con.execute("SELECT stage, count(*), count(correct), count(reference), count(rkl), "
                           "avg(correct::INT) FROM evals WHERE run = 'po' GROUP BY 1 ORDER BY 1").fetchall()
        rollouts = con.execute("SELECT count(*), count(reward) FROM rollouts WHERE run = 'po'").fetchone()
        prompts = con.execute("SELECT stage, count(*), count(answer) FROM prompts WHERE run = 'po' GROUP BY 1 "
                              "ORDER BY 1").fetchall()
    # every eval answer has a reverse KL and no check: correct and reference are null, the accuracy NULL
    assert rows == [("baseline", 6, 0, 0, 6, None), ("evaluate", 6, 0, 0, 6, None)]
    assert rollouts == (4 * 2, 0)  # no reward without a reference
    assert prompts == [("eval_prompts", 6, 0), ("prompts", 4, 0)]


def test_the_report_renders_a_run_without_accuracy(run, tmp_path: Path) -> None:
    from opd_tasks.report import build_report

    root, _ = run
    rep = build_report(root, ["po"], out=tmp_path / "rep", log=lambda m: None)
    report = json.loads((rep.out / "report.json").read_text())
    assert [f["file"] for f in report["figures"]][:1] == ["reverse_kl.png"]  # no accuracy plot without accuracies
    po = report["summary"]["methods"]["opd"]
    assert po["final_mean"] is None and po["rkl_final_mean"] == pytest.approx(
        report["data"]["accuracy"][-1]["rkl_per_token"])
    assert "reverse KL" in rep.html.read_text()


def test_the_headroom_gate_is_refused_without_references() -> None:
    cfg = load_config(None, ["data.source=dataset", "data.path=x.jsonl", "data.answer_column=null"])
    with pytest.raises(ConfigError, match=r"gates.min_headroom \(0.05\) compares .*\(data.answer_column: null\)"):
        check_config(cfg)
    check_config(cfg.model_copy(update={"gates": cfg.gates.model_copy(update={"min_headroom": None})}))
