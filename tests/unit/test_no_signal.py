"""No teacher signal, no update (issue 33): with the same model as teacher and student, no token is high-loss and
the update takes no step, so the published checkpoint's weights are the input's bytes, for every method; a batch
just above the floors still trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from opd_tasks.config_files import load_config
from opd_tasks.method import METHODS
from opd_tasks.pipeline import run_plain
from opd_tasks.topd.signals import high_loss_cut, high_loss_mask
from storage.lineage import RunLineage
from storage.store import ArtifactStore

SMALL = ["data.prompts_per_iteration=4", "rollout.samples_per_prompt=2", "data.eval_size=4", "iterations=1",
         "rollout.max_new_tokens=40", "evaluation.max_new_tokens=40",
         "gates.min_headroom=null"]  # a student as its own teacher has no headroom: the gate would stop the run


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _run(tmp_path: Path, overrides: list[str], logs: list[str]):
    cfg = load_config(None, [*SMALL, f"root={tmp_path}", "name=r", *overrides])
    out = run_plain(cfg, log=logs.append, progress=False)
    store = ArtifactStore(tmp_path)
    return out, store, {e.stage: e.ref for e in RunLineage(store.layout, cfg.name).entries()}


def _assert_carried_forward(store: ArtifactStore, refs: dict, source: Path, logs: list[str]) -> None:
    meta = store.manifest(refs["update"])["meta"]
    assert meta["steps"] == 0 and meta["skipped"].startswith("no teacher signal: mean |k1| ")
    assert store.read_table(refs["update"], "updates").num_rows == 0
    model = store.checkpoint_dir(refs["update"]) / "model"
    assert _files(model) == _files(source)  # every weight and config byte is the input's
    assert any(m.startswith("it0 update skipped: no teacher signal") for m in logs), logs
    if "analyze" in refs:
        a = store.manifest(refs["analyze"])["meta"]
        assert a["high_loss"] == 0 and a["below_floor"] > 0  # the quantile would have picked some: the floor took them
        assert not any(store.read_table(refs["analyze"], "tokens", columns=["high_loss"]).column("high_loss")
                       .to_pylist())


@pytest.mark.parametrize("method", list(METHODS))
def test_the_testbed_student_as_its_own_teacher_is_left_unchanged(method: str, tmp_path: Path) -> None:
    from opd_tasks.models import TESTBED_ASSETS

    logs: list[str] = []
    out, store, refs = _run(tmp_path, [f"method={method}", "models.teacher.path=testbed:student"], logs)
    _assert_carried_forward(store, refs, TESTBED_ASSETS / "student", logs)
    assert out.iterations[0].accuracy == out.baseline_accuracy and out.iterations[0].mean_loss is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["opd", "topd"])
def test_a_real_vocabulary_model_as_its_own_teacher_is_left_unchanged(method: str, tmp_path: Path) -> None:
    """The same on a model with Qwen3's 151,936-id vocabulary and chat template (bench/real_shape.py's small
    random body), whose scores run through the real-vocabulary paths."""
    from bench.real_shape import SMALL as SHAPE
    from bench.real_shape import build_model, overrides

    model = tmp_path / "model"
    build_model(model, SHAPE, seed=0)
    logs: list[str] = []
    _, store, refs = _run(tmp_path / "root", overrides(model, model, tmp_path / "root", method), logs)
    _assert_carried_forward(store, refs, model, logs)


def test_a_carried_forward_checkpoint_trains_on_as_the_student_would(tmp_path: Path) -> None:
    """A skipped update's checkpoint keeps the student's state: the next real update from it equals one from the
    student itself (same steps, losses and weights)."""
    from opd_tasks.config import UpdateConfig
    from opd_tasks.models import ModelSpec
    from opd_tasks.stages import UPDATE, UpdateInputs
    from tests.helpers import scored_env

    env = scored_env(tmp_path / "env", prompts=4, samples=2, max_new_tokens=8, top_k=4)
    store = env["store"]

    def update(student, min_signal):
        return UPDATE(store, UpdateInputs(student=student, rollouts=env["roll"], scores=env["scores"], analysis=None,
                                          teacher=env["teacher"], update=UpdateConfig(micro_batch_size=4,
                                                                                      min_signal=min_signal),
                                          bridge=None, seed=0), progress=False)

    skipped = update(env["student"], min_signal=1e9)  # a floor above any signal: skipped
    assert store.manifest(skipped)["meta"]["skipped"]
    carried = ModelSpec.from_checkpoint(store, skipped, env["student"])
    direct, after = update(env["student"], None), update(carried, None)
    rows = [store.read_table(r, "updates") for r in (direct, after)]
    assert rows[0].num_rows > 0 and rows[0].equals(rows[1])
    weights = [store.checkpoint_dir(r) / "model" / "model.safetensors" for r in (direct, after)]
    assert weights[0].read_bytes() == weights[1].read_bytes()


def test_just_above_the_floors_the_batch_still_trains(tmp_path: Path) -> None:
    """A student that differs from its teacher only a little (one update of the testbed student, itself as the
    teacher afterwards): mean |k1| above update.min_signal and some tokens above min_high_loss, so it trains."""
    logs: list[str] = []
    # the testbed student, distilled from the real teacher for one step: a model near, not equal to, the student
    _, store, refs = _run(tmp_path / "near", ["method=opd", "update.learning_rate=3e-4"], logs)
    near = store.checkpoint_dir(refs["update"]) / "model"
    logs = []
    _, store2, refs2 = _run(tmp_path / "run", ["method=topd", f"models.teacher.path={near}",
                                                "models.student.path=testbed:student"], logs)
    a = store2.manifest(refs2["analyze"])["meta"]
    u = store2.manifest(refs2["update"])["meta"]
    k1 = store2.read_table(refs2["analyze"], "tokens", columns=["k1"]).column("k1").to_numpy()
    assert 1e-3 <= float(np.abs(k1).mean()) < 0.5  # a small real signal, above the no-signal level
    assert a["high_loss"] > 0 and "skipped" not in u and u["steps"] >= 1


def test_the_high_loss_floor_on_known_cases() -> None:
    s = np.array([0.0, 1e-7, 2e-7, 0.01, 0.2, 3.0])
    assert high_loss_cut(s, 0.5, None) == 0.01  # the quantile alone takes the top half, noise included
    assert high_loss_mask(s, 0.5, None, floor=0.05).tolist() == [False] * 4 + [True, True]
    assert high_loss_mask(s, 0.1, None, floor=0.05).tolist() == [False] * 5 + [True]  # the quantile still binds
    assert not high_loss_mask(s[:3], 1.0, None, floor=0.05).any()  # all noise: nothing is high-loss
    assert high_loss_mask(s, 0.5, 1e-8, floor=0.05).tolist() == [False, True, True, True, True, True]  # absolute
    # the slow, obvious reference: the value at sorted position ceil((1 - q)(n - 1)) (numpy's "higher" quantile)
    # or above it, ties included, and at least the floor
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = np.round(rng.exponential(0.1, size=int(rng.integers(1, 40))), 3)
        q, floor = float(rng.uniform(0.05, 1.0)), float(rng.choice([0.0, 0.05, 0.2]))
        cut = sorted(x)[int(np.ceil((1 - q) * (len(x) - 1)))]
        want = [v >= cut and v >= floor for v in x]
        assert high_loss_mask(x, q, None, floor).tolist() == want


def test_a_quantile_delta_has_a_floor_when_one_is_set() -> None:
    from opd_tasks.config import AnalysisConfig
    from opd_tasks.topd.signals import resolve_delta

    d = [0.001, 0.002, 0.003, 0.004]
    assert resolve_delta(AnalysisConfig(delta_mode="quantile", delta=0.5), d) == pytest.approx(0.0025)
    assert resolve_delta(AnalysisConfig(delta_mode="quantile", delta=0.5, min_delta=0.1), d) == 0.1
    assert resolve_delta(AnalysisConfig(delta_mode="quantile", delta=0.5, min_delta=0.001), d) == pytest.approx(0.0025)
    assert resolve_delta(AnalysisConfig(delta=0.3, min_delta=0.5), d) == 0.3  # absolute: delta is the threshold
