"""Row-parallel stages in parts (opd_tasks/stages/registry.py): the spans, and a run's artifacts byte-identical for
any number of shards; a failed shard is recomputed alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_tasks.errors import TransientError
from opd_tasks.stages import STAGES, sharded_stages
from opd_tasks.stages.registry import part_stage, spans
from storage.lineage import RunLineage
from storage.store import ArtifactStore

# Small batches, so that every sharded stage has several batches to split: rollout 2 prompts per batch (4 batches),
# score 8 sequences (4 batches), analyze 8 sequences (4 blocks), evaluate 4 prompts (5 batches).
SIZE = ["data.prompts_per_iteration=8", "rollout.samples_per_prompt=4", "rollout.batch_size=8",
        "scoring.batch_size=8", "data.eval_size=20", "evaluation.batch_size=4", "iterations=1", "seed=0",
        "analysis.batch_size=8"]


def spans_of(units: int, block: int, shards: int) -> list[tuple[int, int]]:
    return [(s.start, s.stop) for s in spans(units, block, shards)]


def test_spans_cover_the_units_on_batch_boundaries() -> None:
    assert spans_of(10, 3, 1) == [(0, 10)]
    assert spans_of(10, 3, 2) == [(0, 6), (6, 10)]  # 4 batches: 2 + 2
    assert spans_of(10, 3, 3) == [(0, 3), (3, 6), (6, 10)]  # 4 batches: 1 + 1 + 2
    assert spans_of(10, 3, 9) == [(0, 3), (3, 6), (6, 9), (9, 10)]  # no more shards than batches
    assert spans_of(0, 4, 3) == [(0, 0)]
    for units in range(0, 40):
        for block in (1, 2, 5, 64):
            for shards in (1, 2, 3, 7):
                got = spans(units, block, shards)
                assert got[0].start == 0 and got[-1].stop == units
                assert all(a.stop == b.start for a, b in zip(got, got[1:], strict=False))
                assert all(s.start % block == 0 for s in got)
                assert all(s.stop > s.start for s in got) or units == 0
                assert [s.index for s in got] == list(range(len(got))) and {s.count for s in got} == {len(got)}


def test_the_row_parallel_stages_are_sharded() -> None:
    assert sharded_stages() == ("rollout", "score", "analyze", "evaluate")


def run(root: Path, method: str, *extra: str):
    from opd_tasks.config_files import load_config
    from opd_tasks.pipeline import run_plain

    cfg = load_config(None, [*SIZE, f"method={method}", f"root={root}", "name=r", *extra])
    return run_plain(cfg, log=lambda m: None, progress=False)


def lineage(root: Path) -> dict[str, str]:
    """Every artifact of run `r` by (iteration, stage): its sha256 (the manifest: every file's hash, the meta)."""
    return {f"it{e.iteration}.{e.stage}": e.ref.sha256 for e in RunLineage(ArtifactStore(root).layout, "r").entries()}


def parts(root: Path, stage: str) -> list[Path]:
    d = root / "artifacts" / part_stage(stage)
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


@pytest.mark.parametrize("method", ["opd", "topd"])
def test_one_two_and_three_shards_give_byte_identical_artifacts(tmp_path: Path, method: str) -> None:
    run(tmp_path / "n1", method)
    want = lineage(tmp_path / "n1")
    assert not any(parts(tmp_path / "n1", s) for s in sharded_stages())  # one shard: no parts at all
    for n in (2, 3):
        root = tmp_path / f"n{n}"
        run(root, method, f"orchestration.shards={n}")
        assert lineage(root) == want, f"{n} shards changed an artifact"
        for stage in sharded_stages():  # the stage did run in n parts (evaluate thrice: the baseline, the
            # teacher's for the headroom gate, and it0)
            runs = 3 if stage == "evaluate" else 0 if stage == "analyze" and method == "opd" else 1
            assert len(parts(root, stage)) == n * runs, stage


def test_gc_removes_the_parts_and_nothing_a_run_points_at(tmp_path: Path) -> None:
    from storage import gc

    run(tmp_path, "opd", "orchestration.shards=2")
    store = ArtifactStore(tmp_path)
    before = lineage(tmp_path)
    removals = gc.plan(store, keep_last=1)
    ran = [s for s in sharded_stages() if s != "analyze"]  # opd runs no analysis
    assert {r.target.split("/")[0] for r in removals} == {part_stage(s) for s in ran}
    gc.execute(store, removals)
    assert not any(parts(tmp_path, s) for s in sharded_stages())
    assert lineage(tmp_path) == before
    for e in RunLineage(store.layout, "r").entries():  # every artifact the run points at is whole (raises if not)
        ArtifactStore(tmp_path).verify(e.ref)


def test_per_stage_shards_override_the_default(tmp_path: Path) -> None:
    run(tmp_path, "opd", "orchestration.shards=2", "orchestration.stage_shards={score: 3, evaluate: 1}")
    assert (len(parts(tmp_path, "rollout")), len(parts(tmp_path, "score")), len(parts(tmp_path, "evaluate"))) == \
        (2, 3, 0)


def test_a_failed_shard_is_recomputed_alone(tmp_path: Path) -> None:
    run(tmp_path / "n1", "opd")
    root = tmp_path / "n3"
    fault = ["orchestration.shards=3", "fault.stage=score", "fault.shard=1", "fault.iteration=0"]
    with pytest.raises(TransientError, match="shard 1"):
        run(root, "opd", *fault)
    done = parts(root, "score")
    assert len(done) == 1  # shard 0 finished before shard 1 failed; nothing was merged
    assert ArtifactStore(root).lookup(STAGES["score"].name, "0" * 64) is None
    first = {p.name: p.stat().st_ino for p in done}
    run(root, "opd", *fault)  # the fault fires once: the rerun goes through
    after = parts(root, "score")
    assert len(after) == 3
    assert {p.name: p.stat().st_ino for p in after if p.name in first} == first  # shard 0's part was not rewritten
    assert lineage(root) == lineage(tmp_path / "n1")


def checked(overrides: list[str]):
    """The config of `overrides`, checked as a run checks it when it opens (`check_config`)."""
    from opd_tasks.config_files import load_config
    from opd_tasks.stages import check_config

    cfg = load_config(None, overrides)
    check_config(cfg)
    return cfg


def test_stage_shards_names_a_sharded_stage() -> None:
    from opd_tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="update.*not a sharded stage"):
        checked(["orchestration.stage_shards={update: 2}"])


def test_fault_shard_names_a_shard_the_stage_has() -> None:
    from opd_tasks.errors import ConfigError

    for bad in (["fault.stage=update", "fault.shard=0", "orchestration.shards=2"],  # update is not sharded
                ["fault.stage=score", "fault.shard=2", "orchestration.shards=2"],  # shards 0 and 1 only
                ["fault.stage=score", "fault.shard=0"],  # one shard: no parts
                ["fault.stage=analyze", "fault.shard=0", "orchestration.shards=2",  # analyze runs as one part
                 "analysis.loss_signal=rkl_topk"]):
        with pytest.raises(ConfigError, match="fault.shard"):
            checked(bad)
    assert checked(["fault.stage=score", "fault.shard=1", "orchestration.shards=2"]).fault.shard == 1
    assert checked(["fault.stage=analyze", "fault.shard=1", "orchestration.shards=2",
                              "analysis.loss_signal=rkl_topk", "analysis.high_loss_threshold=0.5"]).fault.shard == 1
