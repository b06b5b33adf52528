"""The bootstrap end to end on a very short schedule: it runs, writes loadable models and a report whose
accuracies are those of the saved models.

Accuracy targets are not asserted here (a few dozen steps learn little); the committed models are re-measured
against their targets in tests/unit/test_testbed_models.py.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_tasks.checkers import check_testbed
from opd_tasks.config import TestbedTaskConfig
from opd_tasks.testbed.bootstrap import bootstrap, main
from opd_tasks.testbed.labeler import label_token_ids
from opd_tasks.testbed.task import generate_problems, longest_completion


@pytest.mark.slow
def test_bootstrap_short_schedule(tmp_path):
    report = bootstrap(
        tmp_path, TestbedTaskConfig(), seed=0, teacher_steps=40, student_steps=50, progress=False, eval_size=10
    )
    assert json.loads((tmp_path / "bootstrap.json").read_text()) == json.loads(json.dumps(report))
    assert report["teacher"]["steps"] == 40 and report["student"]["steps"] == 50
    assert [step for step, _ in report["student"]["validation_trace"]] == [25, 50]  # checked every 25 steps
    assert report["total_seconds"] > 0
    assert set(report["versions"]) >= {"torch", "transformers", "tokenizers"}
    for role in ("teacher", "student"):
        tok = AutoTokenizer.from_pretrained(tmp_path / role)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / role)
        assert (tmp_path / role / "model.safetensors").is_file()
        assert model.dtype == torch.float32
        enc = tok(["Q: 12+34=?\n", "Q: 5+678=?\n"], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        completion = out[0, enc["input_ids"].shape[1] :].tolist()
        assert len(label_token_ids(tok, completion)) == len(completion)
        # The reported test accuracy is the saved model's on the 10 test problems: re-measured here one problem at
        # a time (no batching, no padding) from the files on disk.
        max_new = len(tok(longest_completion(TestbedTaskConfig()), add_special_tokens=False).input_ids) + 8
        right = 0
        for p in generate_problems(TestbedTaskConfig(), "test", 10, seed=0):
            ids = tok(p.prompt, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            right += check_testbed(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), p.answer)
        assert report[role]["test_accuracy"] == right / 10, role
    assert AutoTokenizer.from_pretrained(tmp_path / "tokenizer").eos_token == "<eos>"


@pytest.mark.slow
def test_bootstrap_cli(tmp_path):
    assert (
        main(["--out", str(tmp_path), "--quick", "--teacher-steps", "5", "--student-steps", "5", "--no-progress"]) == 0
    )
    assert (tmp_path / "student" / "config.json").is_file()
