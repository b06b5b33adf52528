"""A stage in a fresh pod finds the previous iteration's student through the remote mirror (issue 19, item 11).

Two storage roots stand for two pods and a `file://` remote for the object store. Pod A publishes the prompts and
a checkpoint (the testbed student's weights, as an update would save them) and makes the `ModelSpec` the driver
passes on; then pod A's disk is gone. Pod B runs the rollout stage on that spec: the checkpoint's path names A's
root, so the stage must pull the checkpoint into its own root from the remote. Its rollouts must equal, value
for value, those of the same weights loaded from the committed testbed directory in a third, local-only root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from opd_tasks.config import DataConfig, ModelRef, RolloutConfig
from opd_tasks.models import CHECKPOINT_MODEL_DIR, TESTBED_ASSETS, ModelSpec, spec_of
from opd_tasks.stages import PROMPTS, ROLLOUT, PromptsInputs, RolloutInputs
from storage.errors import ArtifactError
from storage.store import ArtifactStore
from tests.helpers import updates_table

CKPT_KEY = "ab" * 32


def _publish_checkpoint(store: ArtifactStore):
    """A checkpoint artifact of the update stage holding the testbed student's files under `model/`."""
    with store.writer("update", CKPT_KEY) as w:
        w.write_table("updates", updates_table(2))
        shutil.copytree(TESTBED_ASSETS / "student", w.path / CHECKPOINT_MODEL_DIR)
        return w.commit()


def _rollouts(store: ArtifactStore, student: ModelSpec, prompts):
    ref = ROLLOUT(store, RolloutInputs(student=student, prompts=prompts, checker="testbed", seed=0,
                                       rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=16)),
                  progress=False)
    return store.read_table(ref, "rollouts")


def _pod_a_then_gone(tmp_path: Path):
    """Pod A publishes 4 prompts and a checkpoint to the remote, then its disk is gone: (remote, the testbed
    student, the prompts, the checkpoint's ModelSpec as the driver passes it on)."""
    remote = f"file://{tmp_path / 'remote'}"
    a = ArtifactStore(tmp_path / "pod-a", remote=remote)
    initial = spec_of(ModelRef(path="testbed:student", dtype="float32"))
    prompts = PROMPTS(a, PromptsInputs(data=DataConfig(), tokenizer=initial, split="train", n=4, offset=0,
                                       max_context=None, seed=0))
    student = ModelSpec.from_checkpoint(a, _publish_checkpoint(a), parent=initial)
    assert student.in_store(a) is student  # where it was made: nothing to re-resolve, nothing hashed again
    shutil.rmtree(tmp_path / "pod-a")  # pod A is gone; only the remote holds its artifacts
    return remote, initial, prompts, student


def test_a_stage_in_a_fresh_root_pulls_its_input_checkpoint_from_the_remote(tmp_path: Path) -> None:
    remote, initial, prompts, student = _pod_a_then_gone(tmp_path)

    b = ArtifactStore(tmp_path / "pod-b", remote=remote)
    got = _rollouts(b, student, prompts)
    pulled = b.layout.artifact_dir("update", CKPT_KEY) / CHECKPOINT_MODEL_DIR
    assert (pulled / "model.safetensors").read_bytes() == (TESTBED_ASSETS / "student/model.safetensors").read_bytes()
    moved = student.in_store(b)
    assert (moved.path, moved.sha256, moved.dtype, moved.checkpoint) == (str(pulled), student.sha256, "float32",
                                                                         student.checkpoint)

    c = ArtifactStore(tmp_path / "local")  # the same weights from the committed directory, no remote
    want = _rollouts(c, initial, PROMPTS(c, PromptsInputs(data=DataConfig(), tokenizer=initial, split="train", n=4,
                                                          offset=0, max_context=None, seed=0)))
    assert got.num_rows == 8 and got.equals(want)


def test_without_the_checkpoint_anywhere_the_stage_names_it(tmp_path: Path) -> None:
    a = ArtifactStore(tmp_path / "pod-a")
    initial = spec_of(ModelRef(path="testbed:student"))
    prompts = PROMPTS(a, PromptsInputs(data=DataConfig(), tokenizer=initial, split="train", n=2, offset=0,
                                       max_context=None, seed=0))
    student = ModelSpec.from_checkpoint(a, _publish_checkpoint(a), parent=initial)
    b = ArtifactStore(tmp_path / "pod-b")  # no remote: pod A's checkpoint cannot reach it
    b.put_table("prompts", prompts.key, "prompts", a.read_table(prompts))
    with pytest.raises(ArtifactError, match=f"artifact update/{CKPT_KEY} is missing"):
        _rollouts(b, student, prompts)


def test_a_shard_in_a_fresh_root_pulls_its_input_checkpoint_too(tmp_path: Path) -> None:
    """A part of the rollout (its own task or flow run: `run_stage` with a span) finds the checkpoint the same way,
    and its part holds the rows of the same weights loaded locally."""
    from opd_tasks.stages import Span, StageContext, run_stage

    remote, initial, prompts, student = _pod_a_then_gone(tmp_path)
    b = ArtifactStore(tmp_path / "pod-b", remote=remote)
    sampling = RolloutConfig(samples_per_prompt=2, max_new_tokens=16, batch_size=4)  # 2 prompts per batch
    inputs = RolloutInputs(student=student, prompts=prompts, checker="testbed", seed=0, rollout=sampling)
    span = Span(index=1, count=2, start=2, stop=4)  # the second shard: prompts 2 and 3
    ctx = StageContext(str(b.root), remote, "rollout", ROLLOUT.key(inputs), "cpu", progress=False)
    part = run_stage(ROLLOUT, ctx, inputs, span)
    assert (b.layout.artifact_dir("update", CKPT_KEY) / CHECKPOINT_MODEL_DIR / "model.safetensors").is_file()

    c = ArtifactStore(tmp_path / "local")
    local = ROLLOUT(c, inputs.model_copy(update={"student": initial, "prompts": PROMPTS(c, PromptsInputs(
        data=DataConfig(), tokenizer=initial, split="train", n=4, offset=0, max_context=None, seed=0))}),
                    progress=False)
    assert b.read_table(part, "rollouts").equals(c.read_table(local, "rollouts").slice(4, 4))
