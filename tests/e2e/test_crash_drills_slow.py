"""Crash drills (slow): each stage runs in a child process that is SIGKILLed while its artifact is being
published (files written and hashed, not yet renamed into place). No partial artifact is ever visible, the
rerun completes, cleans up the dead writer's temp dir, and gives the same bytes (sha256) as a run that was
never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from storage.layout import TMP_PREFIX
from storage.store import ArtifactStore
from tests.helpers import tiny_model_dir

REPO = Path(__file__).resolve().parents[2]

# The child builds every input of the stage under test (cheap and deterministic), then runs the stage with
# ArtifactWriter.commit patched to announce itself and hang after the files are written: the parent kills it.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from tests.e2e.test_crash_drills_slow import run_stage
    import storage.writer as st
    mode, stage, root, models = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    if mode == "crash":
        real = st.ArtifactWriter.commit
        def commit(self):
            if self.stage == stage:
                Path(root, "ready").write_text(str(self.path))
                time.sleep(600)
            return real(self)
        st.ArtifactWriter.commit = commit
    ref = run_stage(stage, root, models)
    print(json.dumps(ref.model_dump()))
    """
)


def run_stage(stage: str, root: str, models: dict):
    """Run the pipeline up to `stage` in `root` (earlier stages are cache hits on reruns); return its ref."""
    from opd_tasks.config import RunConfig
    from opd_tasks.method import plan
    from opd_tasks.models import ModelSpec
    from opd_tasks.stages import (
        ANALYZE,
        EVALUATE,
        PROMPTS,
        ROLLOUT,
        SCORE,
        UPDATE,
        AnalyzeInputs,
        EvaluateInputs,
        PromptsInputs,
        RolloutInputs,
        ScoreInputs,
        UpdateInputs,
    )

    cfg = RunConfig.model_validate({"method": "topd", "data": {"prompts_per_iteration": 4},
                                    "rollout": {"samples_per_prompt": 2, "max_new_tokens": 8},
                                    "scoring": {"top_k": 4}, "analysis": {"probe_tokens": 4},
                                    "evaluation": {"max_new_tokens": 8}})
    method = plan(cfg)
    store = ArtifactStore(root)
    student, teacher = ModelSpec(**models["student"]), ModelSpec(**models["teacher"])
    quiet = dict(progress=False)
    refs = {"prompts": PROMPTS(store, PromptsInputs(data=cfg.data, tokenizer=student, split="train", n=4, offset=0,
                                                    max_context=None, seed=0))}
    if stage != "prompts":
        refs["rollout"] = ROLLOUT(store, RolloutInputs(student=student, prompts=refs["prompts"], rollout=cfg.rollout,
                                                       checker="testbed", seed=0), **quiet)
    if stage not in ("prompts", "rollout"):
        refs["score"] = SCORE(store, ScoreInputs(teacher=teacher, student=student, rollouts=refs["rollout"],
                                                 scoring=cfg.scoring), **quiet)
    if stage in ("analyze", "update", "evaluate"):
        refs["analyze"] = ANALYZE(store, AnalyzeInputs(
            student=student, teacher=teacher, rollouts=refs["rollout"], scores=refs["score"], analysis=cfg.analysis,
            weighting=method.weighting, bridge=method.bridge is not None, label_roles=True, seed=0), **quiet)
    if stage in ("update", "evaluate"):
        refs["update"] = UPDATE(store, UpdateInputs(
            student=student, rollouts=refs["rollout"], scores=refs["score"], analysis=refs["analyze"], teacher=teacher,
            update=cfg.update, bridge=method.bridge, seed=0), **quiet)
    if stage == "evaluate":
        refs["evaluate"] = EVALUATE(store, EvaluateInputs(model=ModelSpec.from_checkpoint(store, refs["update"]),
                                                          prompts=refs["prompts"], evaluation=cfg.evaluation,
                                                          checker="testbed", seed=0), **quiet)
    return refs[stage]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("crash-models")
    _, s = tiny_model_dir(base / "student", seed=0, hidden=32)
    _, t = tiny_model_dir(base / "teacher", seed=1, hidden=48)
    return {"student": s.model_dump(mode="json"), "teacher": t.model_dump(mode="json")}


def _child(mode: str, stage: str, root: Path, models: dict) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO)), mode, stage, str(root),
                             json.dumps(models)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["prompts", "rollout", "score", "analyze", "update", "evaluate"])
def test_sigkill_mid_publish_loses_nothing_and_rerun_is_identical(models, stage: str, tmp_path: Path) -> None:
    clean_root, crash_root = tmp_path / "clean", tmp_path / "crash"
    crash_root.mkdir()
    p = _child("crash", stage, crash_root, models)
    t0 = time.time()
    while not (crash_root / "ready").exists():
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() - t0 < 300, "the stage never reached its publish step"
        time.sleep(0.1)
    tmp_dir = Path((crash_root / "ready").read_text())
    assert tmp_dir.name.startswith(TMP_PREFIX) and tmp_dir.is_dir()
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    store = ArtifactStore(crash_root)
    # Nothing partial is visible: the stage's dir holds only the dead writer's temp dir, no artifact.
    sdir = crash_root / "artifacts" / stage
    assert [d for d in sdir.iterdir() if not d.name.startswith(TMP_PREFIX)] == []
    assert list(store.iter_artifacts()) == [r for r in store.iter_artifacts() if r.stage != stage]
    assert tmp_dir.exists()  # the killed writer's temp dir is left behind ...
    (crash_root / "ready").unlink()
    rerun = _child("normal", stage, crash_root, models)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    ref = json.loads(out.strip().splitlines()[-1])
    assert not tmp_dir.exists()  # ... and removed by the next writer of the same key
    store.verify(store.lookup(stage, ref["key"]))
    uninterrupted = _child("normal", stage, clean_root, models)
    out2, err2 = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err2[-3000:]
    assert json.loads(out2.strip().splitlines()[-1])["sha256"] == ref["sha256"]
