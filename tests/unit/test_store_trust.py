"""The store never adopts a tampered or corrupted artifact, reads verify through the ledger, roots are portable,
and `opd sql`'s connection cannot write or reach outside the root's artifacts (issue 18, items 1-4)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import storage.writer
from storage.errors import ArtifactError, ConfigError, DiskFullError
from storage.hashing import canonical_json, sha256_file
from storage.layout import MANIFEST
from storage.lineage import RunLineage
from storage.store import ArtifactStore
from storage.views import connect, read_only_query
from tests.helpers import tokens_table, updates_table

KEY = "ab" * 32


def _publish(store: ArtifactStore, rows: int = 200, seed: int = 0):
    ref = store.put_table("analyze", KEY, "tokens", tokens_table(rows, seed=seed))
    RunLineage(store.root, "r").record(0, "analyze", ref)
    return ref


def _manifest(store: ArtifactStore, ref) -> Path:
    return store.path_of(ref) / MANIFEST


# ------------------------------------------------------------------ item 1: a cache hit is checked


def test_edited_manifest_is_retired_and_recomputed_not_adopted(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    mpath = _manifest(store, ref)
    m = json.loads(mpath.read_bytes())
    m["meta"]["mean_loss"] = 123.0  # a tampered figure, in a manifest that still parses
    mpath.write_bytes(canonical_json(m))

    assert store.lookup("analyze", KEY) is None
    [msg] = store.quarantined
    assert f"analyze/{KEY} is corrupted" in msg and str(mpath) in msg and "recorded when the artifact" in msg
    retired = list((tmp_path / "retired" / "analyze").iterdir())
    assert len(retired) == 1 and retired[0].name.endswith("-corrupted")
    assert json.loads((retired[0] / MANIFEST).read_bytes())["meta"]["mean_loss"] == 123.0  # kept, not deleted
    assert store.recorded_sha256("analyze", KEY) is None
    again = store.put_table("analyze", KEY, "tokens", tokens_table(200, seed=0))  # the stage recomputes
    assert again.sha256 == ref.sha256 and store.lookup("analyze", KEY) == again


def test_replaced_part_with_its_hash_fixed_in_the_manifest_is_caught(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    part = store.path_of(ref) / "tokens" / "part-00000.parquet"
    pq.write_table(tokens_table(200, seed=9), part)  # other numbers, a consistent file
    mpath = _manifest(store, ref)
    m = json.loads(mpath.read_bytes())
    m["files"][0].update(sha256=sha256_file(part), bytes=part.stat().st_size)
    mpath.write_bytes(canonical_json(m))
    assert store.verify(store._ref_from_manifest(store.path_of(ref), mpath.read_bytes()))  # self-consistent...
    assert store.lookup("analyze", KEY) is None  # ...but not what was published
    assert "corrupted" in store.quarantined[0]


@pytest.mark.parametrize("garbage", [b"{not json", b"", json.dumps({"stage": "analyze"}).encode()])
def test_unparseable_manifest_is_retired(tmp_path: Path, garbage: bytes) -> None:
    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    _manifest(store, ref).write_bytes(garbage)
    assert store.lookup("analyze", KEY) is None
    assert "is not a valid manifest" in store.quarantined[0]
    assert not store.path_of(ref).exists()


def test_manifest_of_another_artifact_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    other = store.put_table("analyze", "cd" * 32, "tokens", tokens_table(10))
    store.layout.published_record("analyze", KEY).unlink()  # even without the record
    shutil.copy(_manifest(store, other), _manifest(store, ref))
    assert store.lookup("analyze", KEY) is None
    assert f"names artifact analyze/{'cd' * 32}" in store.quarantined[0]


def test_an_artifact_without_a_sealed_record_is_never_adopted(tmp_path: Path) -> None:
    """Issue 32, class 1: whoever can write the root rewrites an artifact, its manifest and its record consistently
    (or deletes the record); the rerun still recomputes, because the record's seal needs a key outside the root.
    `opd verify` names the artifact; a recomputed one is sealed again."""
    from typer.testing import CliRunner

    from flows.cli import app
    from storage.seal import seal

    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    record = store.layout.published_record("analyze", KEY)
    sha, mac = record.read_text().split()
    assert sha == ref.sha256 and mac == seal("analyze", KEY, sha) and len(mac) == 64
    part = store.path_of(ref) / "tokens" / "part-00000.parquet"
    pq.write_table(tokens_table(200, seed=9), part)  # the attacker's numbers, consistently
    mpath = _manifest(store, ref)
    m = json.loads(mpath.read_bytes())
    m["files"][0].update(sha256=sha256_file(part), bytes=part.stat().st_size)
    mpath.write_bytes(canonical_json(m))
    forged = store._ref_from_manifest(store.path_of(ref), mpath.read_bytes())
    for rewrite in ("old-format record", "record with a forged seal", "no record"):
        if rewrite == "no record":
            record.unlink()
        else:
            record.write_text(forged.sha256 + ("\n" if rewrite == "old-format record" else " " + "0" * 64 + "\n"))
        RunLineage(store.root, "r").record(0, "analyze", forged)  # the lineage rewritten too
        r = CliRunner().invoke(app, ["verify", "--root", str(tmp_path)])
        assert r.exit_code == 1 and "nothing vouches for it" in r.output, (rewrite, r.output)
        fresh = ArtifactStore(tmp_path)
        assert fresh.lookup("analyze", KEY) is None, rewrite
        assert "cannot be trusted" in fresh.quarantined[0] and "nothing vouches" in fresh.quarantined[0]
        again = fresh.put_table("analyze", KEY, "tokens", tokens_table(200, seed=0))  # the stage recomputes
        assert again == ref and ArtifactStore(tmp_path).lookup("analyze", KEY) == ref
        part = store.path_of(ref) / "tokens" / "part-00000.parquet"
        pq.write_table(tokens_table(200, seed=9), part)
        mpath.write_bytes(canonical_json(m))
    retired = sorted(d.name.rsplit("-", 1)[1] for d in (tmp_path / "retired" / "analyze").iterdir())
    assert retired == ["unsealed"] * 3


def test_the_seal_key_is_made_once_private_and_a_bad_one_is_named(tmp_path: Path, monkeypatch) -> None:
    import storage.seal as seal

    monkeypatch.setenv(seal.KEY_ENV, str(tmp_path / "keys" / "seal.key"))
    monkeypatch.setattr(seal, "_cache", {})
    mac = seal.seal("analyze", KEY, "0" * 64)
    key = tmp_path / "keys" / "seal.key"
    assert key.stat().st_mode & 0o077 == 0 and len(key.read_bytes()) == 32
    monkeypatch.setattr(seal, "_cache", {})
    assert seal.seal("analyze", KEY, "0" * 64) == mac  # read back, not made anew
    assert seal.sealed("analyze", KEY, "0" * 64, mac) and not seal.sealed("analyze", "cd" * 32, "0" * 64, mac)
    key.write_bytes(b"short")
    monkeypatch.setattr(seal, "_cache", {})
    with pytest.raises(ConfigError, match="seal key .* holds 5 bytes, not a key"):
        seal.seal("analyze", KEY, "0" * 64)


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "deleted", "extra bytes"])
def test_a_cache_hit_checks_every_file_and_a_damaged_one_is_recomputed(tmp_path: Path, monkeypatch,
                                                                      damage: str) -> None:
    """A recorded artifact whose part file changed (the manifest untouched) is a miss, retired with a warning naming
    the file; an undamaged hit costs a stat per file (the ledger: the writer recorded the hashes it computed), and
    a file touched since is hashed once, then a stat again."""
    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    hashed: list[Path] = []
    real = storage.writer.sha256_file
    monkeypatch.setattr(storage.writer, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    part = store.path_of(ref) / "tokens" / "part-00000.parquet"
    assert store.lookup("analyze", KEY) == ref and hashed == []  # hashed when written, not again
    os.utime(part)  # the same bytes, another mtime: the ledger no longer vouches for it
    assert store.lookup("analyze", KEY) == ref and hashed == [part]
    assert ArtifactStore(tmp_path).lookup("analyze", KEY) == ref and hashed == [part]  # another process: a stat
    data = part.read_bytes()
    if damage == "flipped byte":
        _flip_file(part)
    elif damage == "truncated":
        part.write_bytes(data[: len(data) // 2])
    elif damage == "deleted":
        part.unlink()
    else:
        part.write_bytes(data + b"\0")
    assert store.lookup("analyze", KEY) is None
    [msg] = store.quarantined
    assert "part-00000.parquet is" in msg and ("missing" if damage == "deleted" else "corrupted") in msg, msg
    again = store.put_table("analyze", KEY, "tokens", tokens_table(200, seed=0))  # the stage recomputes
    assert again == ref and store.lookup("analyze", KEY) == ref and part.read_bytes() == data


def test_a_damaged_ledger_costs_hashing_never_a_crash(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    (tmp_path / "verified.sqlite").write_bytes(b"not a database" * 100)
    assert ArtifactStore(tmp_path).lookup("analyze", KEY) == ref
    _flip_file(store.path_of(ref) / "tokens" / "part-00000.parquet")
    assert ArtifactStore(tmp_path).lookup("analyze", KEY) is None  # still checked, by hashing


def test_iter_artifacts_and_missing_artifacts_report_without_moving(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    gone = store.put_table("analyze", "cd" * 32, "tokens", tokens_table(10))
    shutil.rmtree(store.path_of(gone))
    _manifest(store, ref).write_bytes(b"{")
    bad: list[str] = []
    assert list(store.iter_artifacts(on_bad=bad.append)) == [] and len(bad) == 1
    assert _manifest(store, ref).exists()  # listing is read-only
    with pytest.raises(ArtifactError, match="not a valid manifest"):
        list(store.iter_artifacts())
    assert store.missing_artifacts() == [("analyze", "cd" * 32)]


# ------------------------------------------------------------------ item 4: portable roots


def test_moved_root_keeps_working(tmp_path: Path) -> None:
    ref = _publish(ArtifactStore(tmp_path / "a"))
    assert ref.uri == f"artifacts/analyze/{KEY}"
    (tmp_path / "a").rename(tmp_path / "b")
    store = ArtifactStore(tmp_path / "b")
    [entry] = RunLineage(store.root, "r").entries()
    assert json.loads(next((store.root / "runs" / "r" / "lineage").iterdir()).read_text())["ref"]["uri"] == ref.uri
    assert store.read_table(entry.ref).num_rows == 200
    assert store.lookup("analyze", KEY) == ref
    assert connect(store.root).sql("SELECT count(*) FROM tokens").fetchall() == [(200,)]


def test_copied_root_never_reads_the_original(tmp_path: Path) -> None:
    original = ArtifactStore(tmp_path / "a")
    ref = _publish(original)
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    copy = ArtifactStore(tmp_path / "c")
    shutil.rmtree(copy.path_of(ref))
    with pytest.raises(ArtifactError, match=str(tmp_path / "c")):
        copy.read_table(ref)  # missing in the copy, although the original still has it
    with pytest.raises(ArtifactError, match="missing"):
        connect(copy.root)
    assert original.read_table(ref).num_rows == 200


# ------------------------------------------------------------------ item 2: verified reads, with a ledger


def test_views_verify_by_default_and_the_ledger_avoids_rehashing(tmp_path: Path, monkeypatch) -> None:
    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    hashed: list[Path] = []
    real = storage.writer.sha256_file
    monkeypatch.setattr(storage.writer, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    connect(tmp_path)
    part = store.path_of(ref) / "tokens" / "part-00000.parquet"
    assert hashed == []  # the writer's hashes are in the ledger
    os.utime(part)  # the same bytes, another mtime
    connect(tmp_path)
    assert hashed == [part]
    connect(tmp_path)
    assert hashed == [part]  # unchanged since: not hashed again
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    part.write_bytes(bytes(data))  # same size; the write changes the mtime
    with pytest.raises(ArtifactError, match="part-00000.parquet is corrupted"):
        connect(tmp_path)
    connect(tmp_path, verify=False)  # the fast path checks sizes only


def test_views_hash_the_tables_they_read_not_a_checkpoint_beside_them(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    with store.writer("update", KEY) as w:
        w.write_table("updates", updates_table(3))
        (w.path / "model").mkdir()
        (w.path / "model" / "weights.bin").write_bytes(b"\x00" * 4096)
        ref = w.commit()
    RunLineage(tmp_path, "r").record(0, "update", ref)
    _flip_file(store.path_of(ref) / "model" / "weights.bin")
    assert connect(tmp_path).sql("SELECT count(*) FROM updates").fetchall() == [(3,)]  # weights not read
    with pytest.raises(ArtifactError, match="weights.bin is corrupted"):
        store.verify(ref)  # `opd verify` reads everything


def _flip_file(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ item 3: `opd sql` cannot write or reach out


@pytest.fixture
def con(tmp_path: Path):
    store = ArtifactStore(tmp_path / "root")
    _publish(store)
    (tmp_path / "secret.csv").write_text("a,b\n1,2\n")
    return connect(store.root)


def test_reads_the_views(con) -> None:
    assert read_only_query(con, "SELECT count(*) FROM tokens").fetchall() == [(200,)]
    assert read_only_query(con, "WITH t AS (SELECT 1 AS x) SELECT x FROM t").fetchall() == [(1,)]
    assert read_only_query(con, "DESCRIBE tokens").fetchall()


@pytest.mark.parametrize("sql, kind", [
    ("COPY (SELECT 1) TO '{tmp}/out.csv'", "COPY"),
    ("ATTACH '{tmp}/x.db'", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET enable_external_access = true", "SET"),
    ("CREATE TABLE z AS SELECT 1", "CREATE"),
    ("PRAGMA version", "PRAGMA"),
    ("EXPORT DATABASE '{tmp}/exp'", "EXPORT"),
    ("SELECT 1; SELECT 2", None),
])
def test_statements_that_are_not_reads_are_refused(con, tmp_path: Path, sql: str, kind: str | None) -> None:
    with pytest.raises(ConfigError, match=kind or "one statement"):
        read_only_query(con, sql.format(tmp=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root", "secret.csv"]  # nothing written


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_csv('{tmp}/secret.csv')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM '{tmp}/secret.csv'",
    "SELECT * FROM read_parquet('{tmp}/root/artifacts/*/*/*/*.parquet')",  # a glob, not the listed files
    "SELECT * FROM 'https://example.com/x.parquet'",
])
def test_reads_outside_the_views_are_refused(con, tmp_path: Path, sql: str) -> None:
    with pytest.raises(duckdb.PermissionException):
        read_only_query(con, sql.format(tmp=tmp_path))


def test_configuration_is_locked_even_without_the_statement_check(con) -> None:
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    with pytest.raises(duckdb.Error):
        con.execute("SET allowed_directories = ['/']")
    assert con.execute("SELECT current_setting('autoinstall_known_extensions')").fetchall() == [(False,)]


def test_unknown_run_is_named(tmp_path: Path) -> None:
    _publish(ArtifactStore(tmp_path))
    with pytest.raises(ConfigError, match=r"no run named .nope. under .* \(runs there: r\)"):
        connect(tmp_path, runs=["nope"])


def test_arrow_tables_can_still_be_registered(con) -> None:
    con.register("_extra", pa.table({"x": [1, 2]}))  # what the report does after connect
    con.execute("CREATE TABLE extra AS SELECT * FROM _extra")
    assert con.sql("SELECT sum(x) FROM extra").fetchall() == [(3,)]


# ------------------------------------------------------------------ disk full anywhere: one clear, permanent error


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_disk_full_in_a_pointer_write_names_the_file_and_leaves_nothing(tmp_path: Path, monkeypatch, code) -> None:
    lin = RunLineage(tmp_path, "r")
    lin.init(method="opd")
    before = (lin.dir / "run.json").read_bytes()

    def full(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*run\.json") as info:
        lin.init(method="topd")
    assert not info.value.retryable
    assert (lin.dir / "run.json").read_bytes() == before and sorted(p.name for p in lin.dir.iterdir()) == ["run.json"]


def test_disk_full_inside_a_stage_is_a_disk_full_error(tmp_path: Path) -> None:
    from opd_tasks.stages import PROMPTS, Stage, StageContext, run_stage

    def writes_a_checkpoint(ctx, inputs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))

    stage = Stage("update", 1, PROMPTS.inputs, ("checkpoint",), writes_a_checkpoint, "", gpu=False)
    ctx = StageContext(str(tmp_path), None, "update", KEY)
    with pytest.raises(DiskFullError, match="stage 'update' was writing its artifact.*model.safetensors"):
        run_stage(stage, ctx, PROMPTS.inputs.model_construct())

    from safetensors import SafetensorError

    def safetensors_full(ctx, inputs):  # what safetensors raises: the OS error only in its message
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    stage = Stage("update", 1, PROMPTS.inputs, ("checkpoint",), safetensors_full, "", gpu=False)
    with pytest.raises(DiskFullError, match="File too large"):
        run_stage(stage, ctx, PROMPTS.inputs.model_construct())

    def other(ctx, inputs):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")

    stage = Stage("update", 1, PROMPTS.inputs, ("checkpoint",), other, "", gpu=False)
    with pytest.raises(SafetensorError):  # anything else passes through unchanged
        run_stage(stage, ctx, PROMPTS.inputs.model_construct())


def test_a_full_disk_when_a_run_takes_its_lock_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    """Issue 32, class 10: ENOSPC while writing the pid into a run's lock is a DiskFullError naming the lock (was an
    uncaught OSError); nothing stays held, so the next run takes the lock."""
    import storage.lineage as lineage

    real = os.write
    monkeypatch.setattr(lineage.os, "write", lambda fd, data: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFullError, match=r"disk full while taking the lock .*runs/r/.lock of run 'r'"):
        with lineage.run_lock(tmp_path, ["r"]):
            pass
    monkeypatch.setattr(lineage.os, "write", real)
    assert lineage._held == {}
    with lineage.run_lock(tmp_path, ["r"]):
        assert (tmp_path / "runs" / "r" / ".lock").read_text().strip() == str(os.getpid())


def test_a_forged_ledger_row_does_not_pass_a_replaced_file(tmp_path: Path) -> None:
    """Whoever writes the root can also write the ledger: a row claiming a replaced part verified (its size, mtime
    and inode, the manifest's sha256) carries no valid seal, so the file is hashed and the hit refused."""
    import sqlite3

    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    part = store.path_of(ref) / "tokens" / "part-00000.parquet"
    assert ArtifactStore(tmp_path).lookup("analyze", KEY) == ref  # the ledger now holds the part, sealed
    want = json.loads(_manifest(store, ref).read_bytes())["files"][0]["sha256"]
    _flip_file(part)
    st = part.stat()
    con = sqlite3.connect(tmp_path / "verified.sqlite")
    con.execute("UPDATE sealed SET size = ?, mtime_ns = ?, inode = ?, sha256 = ? WHERE path LIKE '%part-00000%'",
                (st.st_size, st.st_mtime_ns, st.st_ino, want))
    con.commit()
    con.close()
    fresh = ArtifactStore(tmp_path)
    assert fresh.lookup("analyze", KEY) is None and "part-00000.parquet is corrupted" in fresh.quarantined[0]


def test_two_processes_retiring_one_artifact_is_a_miss_for_the_second(tmp_path: Path, monkeypatch) -> None:
    """The second to judge an untrusted artifact finds it gone (the first moved it): a miss, not an OSError; and an
    artifact published in its place meanwhile is put back, not retired."""
    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    data = _manifest(store, ref).read_bytes()
    first = ArtifactStore(tmp_path)
    assert first._retire_local("analyze", KEY, reason="corrupted", expect=data) is not None
    assert ArtifactStore(tmp_path)._retire_local("analyze", KEY, reason="corrupted", expect=data) is None
    again = ArtifactStore(tmp_path).put_table("analyze", KEY, "tokens", tokens_table(200, seed=0))
    assert ArtifactStore(tmp_path)._retire_local("analyze", KEY, expect=b"{}") is None  # not the one judged
    assert ArtifactStore(tmp_path).lookup("analyze", KEY) == again == ref


def test_a_writer_that_loses_the_race_to_an_unusable_artifact_publishes_its_own(tmp_path: Path) -> None:
    """Another writer's artifact took the key but has no record (it crashed between its rename and its record)
    and other content: ours is kept until theirs is judged, then takes its place; nothing is recomputed."""
    store = ArtifactStore(tmp_path)
    theirs = store.put_table("analyze", KEY, "tokens", tokens_table(50, seed=5))
    store.layout.published_record("analyze", KEY).unlink()  # the crash before the record
    ours = ArtifactStore(tmp_path).put_table("analyze", KEY, "tokens", tokens_table(200, seed=0))
    assert ours.sha256 != theirs.sha256 and ArtifactStore(tmp_path).lookup("analyze", KEY) == ours


def test_a_process_with_another_key_is_refused_not_left_to_retire(tmp_path: Path, monkeypatch) -> None:
    """A pod sharing the root with another key file: one error naming OPD_SEAL_KEY_FILE, and nothing retired."""
    import storage.seal as seal

    store = ArtifactStore(tmp_path)
    ref = _publish(store)
    assert (tmp_path / seal.ROOT_ID).is_file()
    monkeypatch.setenv(seal.KEY_ENV, str(tmp_path.parent / f"{tmp_path.name}-other.key"))
    monkeypatch.setattr(seal, "_cache", {})
    monkeypatch.setattr(seal, "_checked_roots", set())
    with pytest.raises(ConfigError, match=r"was sealed with another key .* point OPD_SEAL_KEY_FILE"):
        ArtifactStore(tmp_path).lookup("analyze", KEY)
    assert store.path_of(ref).is_dir() and not (tmp_path / "retired").exists()
