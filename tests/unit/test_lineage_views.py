"""Run lineage pointers and the DuckDB views joined with lineage."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.errors import ArtifactError, ConfigError
from storage.lineage import LineageEntry, RunLineage, list_runs
from storage.store import ArtifactStore
from storage.views import connect
from tests.helpers import tokens_table, updates_table

K1, K2, K3 = "a1" * 32, "b2" * 32, "c3" * 32


@pytest.fixture
def populated(tmp_path: Path) -> ArtifactStore:
    """Two runs: `a` (iterations 0 and 1) and `b` (iteration 0), sharing the iteration-0 tokens artifact."""
    store = ArtifactStore(tmp_path)
    shared = store.put_table("analyze", K1, "tokens", tokens_table(300, n_seq=3, seed=1))
    own = store.put_table("analyze", K2, "tokens", tokens_table(120, n_seq=2, seed=2))
    upd = store.put_table("update", K3, "updates", updates_table(4))
    a = RunLineage(tmp_path, "a")
    a.init(method="topd")
    a.record(0, "analyze", shared, cached=False, seconds=1.5)
    a.record(1, "analyze", own)
    a.record(0, "update", upd)
    b = RunLineage(tmp_path, "b")
    b.record(0, "analyze", shared, cached=True)
    return store


def test_lineage_records_and_lists(populated: ArtifactStore) -> None:
    runs = list_runs(populated.root)
    assert [r.run for r in runs] == ["a", "b"]
    a = runs[0]
    assert a.info()["method"] == "topd"
    assert [(e.iteration, e.stage) for e in a.entries()] == [(0, "analyze"), (0, "update"), (1, "analyze")]
    assert a.latest("analyze").iteration == 1
    assert a.get(0, "analyze").cached is False and a.get(0, "analyze").seconds == 1.5
    assert a.get(5, "analyze") is None


def test_replaced_pointer_goes_to_history(populated: ArtifactStore, tmp_path: Path) -> None:
    a = RunLineage(tmp_path, "a")
    old = a.get(0, "analyze").ref
    new = populated.lookup("analyze", K2)
    a.record(0, "analyze", new)
    assert a.get(0, "analyze").ref == new
    hist = list((a.dir / "history").iterdir())
    assert len(hist) == 1 and old.sha256 in hist[0].read_text()
    # Recording the same ref again does not add history.
    a.record(0, "analyze", new)
    assert len(list((a.dir / "history").iterdir())) == 1


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "", "x" * 200])
def test_bad_run_names_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match="run name"):
        RunLineage(tmp_path, bad)


def test_views_join_lineage(populated: ArtifactStore) -> None:
    con = connect(populated.root)
    rows = con.sql("SELECT run, iteration, stage, count(*) FROM tokens GROUP BY ALL ORDER BY ALL").fetchall()
    assert rows == [("a", 0, "analyze", 300), ("a", 1, "analyze", 120), ("b", 0, "analyze", 300)]
    # Independent check of the per-regime counts against pyarrow.
    t = populated.read_table(populated.lookup("analyze", K1))
    expected = {r: t.column("regime").to_pylist().count(r) for r in ("normal", "surface", "divergent")}
    got = dict(con.sql("SELECT regime, count(*) FROM tokens WHERE run='b' GROUP BY 1").fetchall())
    assert got == expected
    assert con.sql("SELECT count(*) FROM updates WHERE run='a' AND iteration=0").fetchall() == [(4,)]
    assert con.sql("SELECT count(*) FROM lineage").fetchall() == [(4,)]
    assert con.sql("SELECT count(*) FROM artifacts").fetchall() == [(3,)]
    # Tables no run has yet are empty but typed.
    cols = [c[0] for c in con.sql("DESCRIBE probes").fetchall()]
    assert cols[:3] == ["run", "iteration", "stage"] and "distance" in cols
    assert con.sql("SELECT count(*) FROM probes").fetchall() == [(0,)]
    only_b = connect(populated.root, runs=["b"])
    assert only_b.sql("SELECT DISTINCT run FROM tokens").fetchall() == [("b",)]


def test_views_detect_truncated_and_corrupted_files(populated: ArtifactStore) -> None:
    ref = populated.lookup("analyze", K2)
    part = populated.path_of(ref) / "tokens" / "part-00000.parquet"
    connect(populated.root)  # verifies every file and enters it in the ledger
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    connect(populated.root, verify=False)  # same size: the fast path does not see it
    with pytest.raises(ArtifactError, match="corrupted"):  # the rewrite changed its mtime: hashed again
        connect(populated.root)
    part.write_bytes(bytes(data[:-10]))
    with pytest.raises(ArtifactError, match="missing or truncated"):
        connect(populated.root, verify=False)


def test_empty_root_has_views(tmp_path: Path) -> None:
    con = connect(tmp_path / "nothing")
    assert con.sql("SELECT count(*) FROM tokens").fetchall() == [(0,)]


def test_a_cached_rerun_keeps_what_computing_cost(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    a = store.put_table("update", "a1" * 32, "updates", updates_table(2))
    b = store.put_table("update", "b2" * 32, "updates", updates_table(3))
    lin = RunLineage(tmp_path, "r")
    assert lin.record(0, "update", a, cached=False, seconds=5.0).compute_seconds == 5.0
    assert lin.record(0, "update", a, cached=True, seconds=0.1).compute_seconds == 5.0  # a rerun: a cache hit
    assert lin.get(0, "update").compute_seconds == 5.0 and lin.get(0, "update").seconds == 0.1
    assert lin.record(0, "update", b, cached=True, seconds=0.2).compute_seconds is None  # another artifact
    con = connect(tmp_path)
    assert con.sql("SELECT seconds, compute_seconds FROM lineage").fetchall() == [(0.2, None)]
    # A pointer written before compute_seconds existed: a computed one's seconds are its cost.
    old = {"run": "r", "iteration": 1, "stage": "update", "ref": a.model_dump(mode="json"), "recorded_at": 0.0,
           "cached": False, "seconds": 3.0}
    assert LineageEntry.from_json(old).compute_seconds == 3.0
    assert LineageEntry.from_json({**old, "cached": True}).compute_seconds is None
