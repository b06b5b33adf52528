"""The artifact store: round trips, hashes, atomic publish, schema checks, concurrency, disk full."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.errors import ArtifactError, ConfigError, DataError
from storage.hashing import sha256_bytes, sha256_file
from storage.keys import cache_key
from storage.layout import MANIFEST, TMP_PREFIX
from storage.schemas import SCHEMAS, conform
from storage.store import ArtifactStore
from tests.helpers import tokens_table, updates_table

KEY = "ab" * 32
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "root")


def _no_tmp(store: ArtifactStore) -> bool:
    return not list(store.layout.artifacts.glob(f"*/{TMP_PREFIX}*"))


def test_round_trip_layout_and_ref(store: ArtifactStore) -> None:
    t = tokens_table(1000)
    ref = store.put_table("analyze", KEY, "tokens", t, meta={"note": "x"})
    adir = store.root / "artifacts" / "analyze" / KEY
    assert store.path_of(ref) == adir and ref.uri == f"artifacts/analyze/{KEY}"  # relative to the root
    assert (ref.rows, ref.schema_name, ref.schema_version) == (1000, "tokens", 1)
    manifest_bytes = (adir / MANIFEST).read_bytes()
    assert ref.sha256 == sha256_bytes(manifest_bytes)
    m = json.loads(manifest_bytes)
    assert [f["path"] for f in m["files"]] == ["tokens/part-00000.parquet"]
    assert m["files"][0]["sha256"] == sha256_file(adir / "tokens/part-00000.parquet")
    assert ref.bytes == m["files"][0]["bytes"] == (adir / "tokens/part-00000.parquet").stat().st_size
    assert m["meta"] == {"note": "x"}
    back = store.read_table(ref)
    assert back.equals(conform(t, SCHEMAS["tokens"]))
    assert store.read_table(ref, columns=["k1"]).column_names == ["k1"]
    assert _no_tmp(store)


def test_multi_table_and_free_files(store: ArtifactStore) -> None:
    with store.writer("update", KEY) as w:
        w.write_table("updates", updates_table(2))
        w.write_table("updates", updates_table(3))
        (w.path / "checkpoint").mkdir()
        (w.path / "checkpoint" / "weights.bin").write_bytes(b"\x00\x01" * 100)
        ref = w.commit()
    assert ref.rows == 5
    assert store.read_table(ref, "updates").num_rows == 5
    ckpt = store.checkpoint_dir(ref)
    assert (ckpt / "checkpoint" / "weights.bin").read_bytes() == b"\x00\x01" * 100
    with pytest.raises(ArtifactError, match="no table 'tokens'"):
        store.read_table(ref, "tokens")


def test_empty_declared_table_reads_empty(store: ArtifactStore) -> None:
    with store.writer("analyze", KEY) as w:
        w.declare_table("probes")
        ref = w.commit()
    t = store.read_table(ref, "probes")
    assert t.num_rows == 0 and t.column_names == SCHEMAS["probes"].columns


@pytest.mark.parametrize("target", ["part", "manifest"])
def test_flipped_byte_is_detected_and_names_the_file(store: ArtifactStore, target: str) -> None:
    ref = store.put_table("analyze", KEY, "tokens", tokens_table(500))
    path = store.path_of(ref) / ("tokens/part-00000.parquet" if target == "part" else MANIFEST)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=str(path).replace(".", r"\.")):
        store.read_table(ref)
    with pytest.raises(ArtifactError):
        store.verify(ref)


def test_deleted_part_is_detected(store: ArtifactStore) -> None:
    ref = store.put_table("analyze", KEY, "tokens", tokens_table(10))
    (store.path_of(ref) / "tokens/part-00000.parquet").unlink()
    with pytest.raises(ArtifactError, match="part-00000.parquet is missing"):
        store.read_table(ref)


def test_missing_artifact_is_detected(store: ArtifactStore) -> None:
    ref = store.put_table("analyze", KEY, "tokens", tokens_table(10))
    import shutil

    shutil.rmtree(store.path_of(ref))
    with pytest.raises(ArtifactError, match="is missing"):
        store.read_table(ref)


def test_schema_errors_name_the_column(store: ArtifactStore) -> None:
    good = tokens_table(10)
    with pytest.raises(DataError, match=r"missing column\(s\) \['k1'\]"):
        store.put_table("analyze", KEY, "tokens", good.drop_columns(["k1"]))
    with pytest.raises(DataError, match=r"unknown column\(s\) \['oops'\]"):
        store.put_table("analyze", KEY, "tokens", good.append_column("oops", pa.array([1] * 10)))
    bad_type = good.set_column(good.column_names.index("pos"), "pos", pa.array(["x"] * 10))
    with pytest.raises(DataError, match="column 'pos' has type string"):
        store.put_table("analyze", KEY, "tokens", bad_type)
    nulls = good.set_column(good.column_names.index("k1"), "k1", pa.array([None] * 10, pa.float32()))
    with pytest.raises(DataError, match="column 'k1' has 10 null"):
        store.put_table("analyze", KEY, "tokens", nulls)
    with pytest.raises(DataError, match="unknown table schema 'nope'"):
        store.put_table("analyze", KEY, "nope", good)
    # Nothing was published by any of the failed writes.
    assert store.lookup("analyze", KEY) is None and _no_tmp(store)


def test_lossless_casts_are_accepted_and_lossy_refused(store: ArtifactStore) -> None:
    t = tokens_table(10)
    t64 = t.set_column(t.column_names.index("pos"), "pos", pa.array(range(10), pa.int64()))
    ref = store.put_table("analyze", KEY, "tokens", t64)
    assert store.read_table(ref).schema.field("pos").type == pa.int32()
    big = t.set_column(t.column_names.index("pos"), "pos", pa.array([2**40] * 10, pa.int64()))
    with pytest.raises(DataError, match="column 'pos'"):
        store.put_table("analyze", "cd" * 32, "tokens", big)


def test_wrong_schema_version_is_refused(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = store.put_table("evaluate", KEY, "updates", updates_table())
    import dataclasses

    import storage.schemas as schemas

    updates = schemas.SCHEMAS["updates"]
    written = updates.version
    monkeypatch.setitem(schemas.SCHEMAS, "updates", dataclasses.replace(updates, version=written + 1))
    with pytest.raises(ArtifactError, match=f"schema version {written}, this code reads version {written + 1}"):
        store.read_table(ref)


def test_exception_inside_writer_publishes_nothing(store: ArtifactStore) -> None:
    with pytest.raises(RuntimeError):
        with store.writer("rollout", KEY) as w:
            w.write_table("updates", updates_table())
            raise RuntimeError("boom")
    assert store.lookup("rollout", KEY) is None
    assert _no_tmp(store)
    # A writer that forgets to commit publishes nothing either.
    with store.writer("rollout", KEY) as w:
        w.write_table("updates", updates_table())
    assert store.lookup("rollout", KEY) is None and _no_tmp(store)


def test_existing_artifact_is_never_overwritten(store: ArtifactStore) -> None:
    first = store.put_table("update", KEY, "updates", updates_table(3, loss0=1.0))
    with store.writer("update", KEY) as w:
        w.write_table("updates", updates_table(3, loss0=9.0))
        second = w.commit()
    assert second == first
    assert store.read_table(first).column("loss")[0].as_py() == 1.0
    assert _no_tmp(store)


def test_disk_full_gives_clear_error_and_consistent_store(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(ArtifactError, match="disk full while writing"):
        store.put_table("update", KEY, "updates", updates_table())
    assert store.lookup("update", KEY) is None and _no_tmp(store)


def test_disk_full_during_manifest(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.writer as st

    real = st.canonical_json

    def boom(obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "canonical_json", boom)
    with pytest.raises(ArtifactError, match="disk full"):
        store.put_table("update", KEY, "updates", updates_table())
    monkeypatch.setattr(st, "canonical_json", real)
    assert store.lookup("update", KEY) is None and _no_tmp(store)
    ref = store.put_table("update", KEY, "updates", updates_table())
    store.verify(ref)


def test_concurrent_publish_same_key_leaves_one_valid_artifact(tmp_path: Path) -> None:
    root = tmp_path / "root"
    go = tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import os, sys, time, json
        sys.path.insert(0, {str(REPO)!r})
        from pathlib import Path
        from storage.store import ArtifactStore
        from tests.helpers import updates_table
        s = ArtifactStore({str(root)!r})
        loss0 = float(sys.argv[1])
        w = s.writer("update", {KEY!r})
        w.write_table("updates", updates_table(50_000, loss0=loss0))
        while not Path({str(go)!r}).exists():
            time.sleep(0.001)
        ref = w.commit()
        print(json.dumps(ref.model_dump()))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(v)], stdout=subprocess.PIPE, text=True)
        for v in (1.0, 2.0)
    ]
    time.sleep(3)
    go.touch()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    refs = [json.loads(o) for o in outs]
    assert refs[0] == refs[1]
    store = ArtifactStore(root)
    ref = store.lookup("update", KEY)
    assert ref is not None and ref.sha256 == refs[0]["sha256"]
    store.verify(ref)
    assert store.read_table(ref).column("loss")[0].as_py() in (1.0, 2.0)
    assert _no_tmp(store)
    assert [p.name for p in (root / "artifacts" / "update").iterdir()] == [KEY]


def test_parquet_readable_without_project_code(store: ArtifactStore) -> None:
    ref = store.put_table("analyze", KEY, "tokens", tokens_table(100))
    part = store.path_of(ref) / "tokens" / "part-00000.parquet"
    code = textwrap.dedent(
        f"""
        import duckdb, pyarrow.parquet as pq
        t = pq.read_table({str(part)!r})
        assert t.num_rows == 100, t.num_rows
        assert t.schema.metadata[b"opd.schema"] == b"tokens"
        n = duckdb.sql("SELECT count(*), count(DISTINCT regime) FROM read_parquet({str(part)!r})").fetchall()[0]
        assert n[0] == 100 and n[1] == 3, n
        print("ok")
        """
    )
    # -I: isolated mode, and no project directory on sys.path: only duckdb/pyarrow read the file.
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert "opd_tasks" not in out.stderr and out.stdout.strip() == "ok"


def test_bad_stage_and_key_names(store: ArtifactStore) -> None:
    with pytest.raises(ConfigError, match="stage name '../x'"):
        store.writer("../x", KEY)
    with pytest.raises(ConfigError, match="cache key"):
        store.writer("rollout", "../../etc")


# ------------------------------------------------------------------------------------------ keys


def test_cache_key_is_content_addressed(store: ArtifactStore) -> None:
    a = store.put_table("update", KEY, "updates", updates_table(2))
    b = store.put_table("update", "cd" * 32, "updates", updates_table(3))
    base = cache_key("analyze", 1, {"x": a, "y": b}, {"q": 0.2}, 0)
    assert len(base) == 64
    assert base == cache_key("analyze", 1, {"y": b, "x": a}, {"q": 0.2}, 0)  # input order does not matter
    assert base == cache_key("analyze", 1, {"x": a.sha256, "y": b}, {"q": 0.2}, 0)
    variants = [
        cache_key("rollout", 1, {"x": a, "y": b}, {"q": 0.2}, 0),
        cache_key("analyze", 2, {"x": a, "y": b}, {"q": 0.2}, 0),
        cache_key("analyze", 1, {"x": b, "y": a}, {"q": 0.2}, 0),
        cache_key("analyze", 1, {"x": a, "y": b}, {"q": 0.3}, 0),
        cache_key("analyze", 1, {"x": a, "y": b}, {"q": 0.2}, 1),
    ]
    assert len(set(variants + [base])) == 6


def test_cache_key_refuses_bare_paths() -> None:
    with pytest.raises(ConfigError, match="never pass a bare path"):
        cache_key("rollout", 1, {"student": "/models/student"}, {}, 0)


def test_new_writer_removes_only_dead_writers_temp_dirs(store: ArtifactStore) -> None:
    from storage.layout import HOST

    sdir = store.layout.stage_dir("rollout")
    sdir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    dirs = {
        "dead": sdir / f"{TMP_PREFIX}{KEY}-{HOST}-{dead.pid}-aaaa",
        "alive": sdir / f"{TMP_PREFIX}{KEY}-{HOST}-{os.getppid()}-bbbb",
        "other_host": sdir / f"{TMP_PREFIX}{KEY}-elsewhere-{dead.pid}-cccc",
        "other_key": sdir / f"{TMP_PREFIX}{'cd' * 32}-{HOST}-{dead.pid}-dddd",
    }
    for d in dirs.values():
        d.mkdir()
    w = store.writer("rollout", KEY)
    assert not dirs["dead"].exists()
    assert dirs["alive"].exists() and dirs["other_host"].exists() and dirs["other_key"].exists()
    w.abort()
