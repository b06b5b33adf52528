"""The real vocabulary on the CPU (issue 19): a small random Qwen3 body with the Qwen3 vocabulary of 151,936 ids, two
EOS ids in generation_config.json and a chat template, through one iteration of opd and of topd with the plain
driver, as `python -m bench real_shape` runs the Qwen3-0.6B shape. Covers the real-vocabulary paths the testbed's
127 ids do not: top-k and entropies over 151,936 entries, the gates' and the update's batched log-probs, rollouts
ending on either EOS id."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.real_shape import ENDOFTEXT, IM_END, SMALL, VOCAB, build_pair, overrides, rollout_facts
from opd_tasks.config_files import load_config
from opd_tasks.pipeline import run_plain
from storage.store import ArtifactStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_pair(tmp_path_factory.mktemp("real-vocab"), SMALL)


@pytest.mark.parametrize("method", ["opd", "topd"])
def test_one_iteration_with_the_real_vocabulary(pair, tmp_path: Path, method: str) -> None:
    teacher, student = pair
    cfg = load_config(None, overrides(teacher, student, tmp_path, method))
    out = run_plain(cfg, log=lambda m: None, progress=False)
    it = out.iterations[0]
    store = ArtifactStore(tmp_path)
    assert list(it.stages) == (["prompts", "rollout", "score", "gates"] + (["analyze"] if method == "topd" else [])
                               + ["update", "evaluate"])

    facts = rollout_facts(tmp_path, method)
    assert facts["eos_inside"] == 0  # a completion ends at the first declared EOS id, whichever it is
    assert sum(facts["last_token"].values()) == facts["finish"]["stop"]  # "stop" is an EOS id, and only that
    assert facts["last_token"][str(IM_END)] > 0 and facts["last_token"][str(ENDOFTEXT)] > 0  # both EOS ids stop

    scores = store.read_table(it.stages["score"].ref, "teacher_scores").to_pylist()
    assert all(0 <= i < VOCAB for r in scores for i in r["topk_ids"])
    assert max(i for r in scores for i in r["topk_ids"]) > 1_000  # ids beyond any testbed vocabulary
    assert all(0 < r["teacher_entropy"] <= math.log(VOCAB) + 1e-3 for r in scores)

    gates = store.manifest(it.stages["gates"].ref)["meta"]
    assert gates["passed"] and gates["teacher_dtype"] == "float32"
    assert gates["gates"]["logprob_drift"]["value"] < 1e-4 and gates["gates"]["teacher_repeat_diff"]["value"] < 1e-3

    old = store.read_table(it.checkpoint, "old_logprobs").to_pylist()
    assert len(old) == len(scores)
    assert max(abs(r["sampling_logprob"] - r["trainer_logprob"]) for r in old) < 1e-3  # both fp32 here
