"""End to end (slow): the data and evaluation settings of the documented real-model config
(configs/qwen3-1.7b-from-8b.yaml: a local jsonl file, `eval_split` unset, so the eval set is held out of the file)
on the committed testbed models, shrunk to one small iteration of the plain driver."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from opd_tasks.config import RunConfig
from opd_tasks.config_files import read_yaml
from opd_tasks.pipeline import run_plain
from storage.lineage import RunLineage
from storage.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "configs" / "qwen3-1.7b-from-8b.yaml"
GSM = REPO / "tests" / "data" / "gsm8k_sample.jsonl"  # the `question` / `answer` fields the example names


@pytest.mark.slow
def test_example_config_data_and_evaluation_on_the_testbed(tmp_path: Path) -> None:
    example = read_yaml(EXAMPLE)
    data, evaluation = example["data"], example["evaluation"]
    assert data["source"] == "dataset" and data["eval_split"] is None  # what the example is: held out of the file
    eval_size = 3
    data |= {"path": str(GSM), "prompts_per_iteration": 2, "eval_size": eval_size,
             "chat_template": False}  # the testbed tokenizer has no chat template
    evaluation |= {"max_new_tokens": 8}
    cfg = RunConfig.model_validate({
        "name": "example", "root": str(tmp_path / "opd"), "iterations": 1, "method": "opd", "device": "cpu",
        "models": {"teacher": {"path": "testbed:teacher"}, "student": {"path": "testbed:student"}},
        "data": data, "evaluation": evaluation,
        "rollout": {"backend": "hf", "samples_per_prompt": 2, "max_new_tokens": 8},
        "scoring": {"backend": "hf"},
        "gates": {"enabled": False},  # 8 new tokens truncate most rollouts of text the testbed was not trained on
    })

    out = run_plain(cfg, log=lambda m: None, progress=False)

    assert len(out.iterations) == 1
    store, lineage = ArtifactStore(cfg.resolved_root()), RunLineage(cfg.resolved_root(), "example")
    evals = store.read_table(lineage.get(0, "evaluate").ref, "evals")
    eval_prompts = store.read_table(lineage.get(0, "eval_prompts").ref, "prompts")
    train_prompts = store.read_table(lineage.get(0, "prompts").ref, "prompts")
    # the held-out rows: the eval_size questions of the file first by hash (opd_tasks/data.py), in file order
    questions = [json.loads(line)["question"] for line in GSM.read_text().splitlines()]
    heldout = sorted(questions, key=lambda q: hashlib.sha256(q.encode()).hexdigest())[:eval_size]
    assert eval_prompts.column("prompt").to_pylist() == [q for q in questions if q in heldout]
    assert set(evals.column("prompt_id").to_pylist()) == set(eval_prompts.column("prompt_id").to_pylist())
    assert evals.num_rows == eval_size  # greedy, one sample per prompt
    assert not set(train_prompts.column("prompt").to_pylist()) & set(heldout)
