"""The remote mirror of the artifact store (storage/remote.py) on real fsspec file systems: memory:// and file://.

No S3 or GCS is reachable here; these two implementations exercise the same fsspec calls (cat_file, put, get,
pipe_file, exists, rm_file) that s3fs and gcsfs implement.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import pytest

from opd_tasks.config import RunConfig
from opd_tasks.config_files import load_config
from storage.errors import ArtifactError, ConfigError
from storage.hashing import canonical_json, sha256_bytes, sha256_file
from storage.layout import MANIFEST, TMP_PREFIX
from storage.remote import check_remote_uri
from storage.store import ArtifactStore
from tests.helpers import tokens_table, updates_table

KEY = "cd" * 32
CKPT_KEY = "ef" * 32
CKPT_FILES = {
    "model/config.json": b'{"hidden_size": 32}',
    "model/model.safetensors": bytes(range(256)) * 40,
    "state/optimizer.bin": b"\x00\x01" * 3000,
}


@pytest.fixture(params=["memory", "file"])
def remote(request: pytest.FixtureRequest, tmp_path: Path):
    """A fresh remote URI on a real fsspec file system; memory:// is process-global, so it is cleaned after."""
    if request.param == "file":
        yield f"file://{tmp_path / 'remote'}"
        return
    uri = f"memory://opd-test-{uuid.uuid4().hex[:12]}"
    yield uri
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _fs(uri: str):
    return fsspec.core.url_to_fs(uri)


def _write_checkpoint(store: ArtifactStore, key: str = CKPT_KEY):
    with store.writer("update", key) as w:
        w.write_table("updates", updates_table(4))
        for rel, data in CKPT_FILES.items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.path / rel).write_bytes(data)
        return w.commit()


def _local_keys(store: ArtifactStore, stage: str) -> list[str]:
    d = store.layout.artifacts / stage
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_push_then_pull_into_fresh_root_gives_identical_tables_and_checkpoint(tmp_path: Path, remote: str) -> None:
    a = ArtifactStore(tmp_path / "a", remote=remote)
    t_ref = a.put_table("analyze", KEY, "tokens", tokens_table(500), meta={"note": "x"})
    c_ref = _write_checkpoint(a)

    # The remote layout: the manifest at the key, the files under the manifest's hash.
    fs, base = _fs(remote)
    for ref in (t_ref, c_ref):
        rdir = f"{base.rstrip('/')}/artifacts/{ref.stage}/{ref.key}"
        assert sha256_bytes(fs.cat_file(f"{rdir}/{MANIFEST}")) == ref.sha256
        for e in json.loads(fs.cat_file(f"{rdir}/{MANIFEST}"))["files"]:
            assert fs.cat_file(f"{rdir}/{ref.sha256}/{e['path']}") == (a.path_of(ref) / e["path"]).read_bytes()

    b = ArtifactStore(tmp_path / "b", remote=remote)
    t2 = b.lookup("analyze", KEY)
    c2 = b.lookup("update", CKPT_KEY)
    assert t2 is not None and c2 is not None
    assert (t2.sha256, c2.sha256) == (t_ref.sha256, c_ref.sha256)
    assert b.path_of(t2) == b.root / "artifacts" / "analyze" / KEY  # published into b's own root
    assert b.read_table(t2).equals(a.read_table(t_ref))
    assert b.read_table(c2, "updates").equals(a.read_table(c_ref, "updates"))
    cdir = b.checkpoint_dir(c2)
    for rel, data in CKPT_FILES.items():
        assert (cdir / rel).read_bytes() == data
    assert b.manifest(t2)["meta"] == {"note": "x"}
    assert b.published == []  # a pull is a cache hit, not a computation
    assert not list(b.layout.artifacts.glob(f"*/{TMP_PREFIX}*"))


def test_ref_from_another_machine_is_pulled_when_read(tmp_path: Path, remote: str) -> None:
    """A ref whose uri is another root (another pod) that no longer exists here: reading it pulls it."""
    a = ArtifactStore(tmp_path / "a", remote=remote)
    ref = _write_checkpoint(a)
    want = a.read_table(ref, "updates")
    import shutil

    shutil.rmtree(tmp_path / "a")
    b = ArtifactStore(tmp_path / "b", remote=remote)
    assert b.read_table(ref, "updates").equals(want)
    assert (b.checkpoint_dir(ref) / "model/config.json").read_bytes() == CKPT_FILES["model/config.json"]
    assert _local_keys(b, "update") == [CKPT_KEY]

    local_only = ArtifactStore(tmp_path / "c")
    with pytest.raises(ArtifactError, match="is missing"):
        local_only.read_table(ref, "updates")


def test_remote_artifact_without_manifest_is_ignored_then_completed(tmp_path: Path, remote: str) -> None:
    # An upload cut off before its manifest: the files are on the remote, the commit marker is not.
    a_local = ArtifactStore(tmp_path / "a")
    ref = a_local.put_table("score", KEY, "updates", updates_table(3))
    files = json.loads((a_local.path_of(ref) / MANIFEST).read_bytes())["files"]
    fs, _ = _fs(remote)
    mirror = ArtifactStore(tmp_path / "scratch", remote=remote).remote
    assert mirror is not None
    for e in files:
        dest = mirror.file_path("score", KEY, ref.sha256, e["path"])
        fs.makedirs(fs._parent(dest), exist_ok=True)
        fs.put_file(str(a_local.path_of(ref) / e["path"]), dest)
    assert fs.exists(mirror.file_path("score", KEY, ref.sha256, files[0]["path"]))

    b = ArtifactStore(tmp_path / "b", remote=remote)
    assert b.lookup("score", KEY) is None
    assert _local_keys(b, "score") == []  # nothing published, no temp dir left

    # The writer's next lookup (a rerun) finds it locally and completes the push; now b sees it.
    a = ArtifactStore(tmp_path / "a", remote=remote)
    assert a.lookup("score", KEY) == ref
    pulled = b.lookup("score", KEY)
    assert pulled is not None and pulled.sha256 == ref.sha256
    assert b.read_table(pulled).equals(a.read_table(ref))


def test_failed_upload_writes_no_manifest_and_is_retried_by_the_next_lookup(tmp_path: Path, caplog) -> None:
    """A real upload failure (file://, a directory squats on one target): no manifest; the local hit is still
    returned (mirroring is best effort on a local hit, with a warning), and the next lookup retries the push."""
    remote = f"file://{tmp_path / 'remote'}"
    local = ArtifactStore(tmp_path / "a")
    ref = _write_checkpoint(local)
    a = ArtifactStore(tmp_path / "a", remote=remote)
    blocker = Path(a.remote.file_path("update", CKPT_KEY, ref.sha256, "model/model.safetensors"))
    blocker.mkdir(parents=True)
    with caplog.at_level("WARNING", logger="storage.store"):
        assert a.lookup("update", CKPT_KEY) == ref  # a local hit the remote lacks: pushed, and the push fails
    assert "no manifest was written" in caplog.text
    assert not Path(a.remote.manifest_path("update", CKPT_KEY)).exists()
    assert (Path(a.remote.file_path("update", CKPT_KEY, ref.sha256, "model/config.json"))).is_file()
    assert ArtifactStore(tmp_path / "b", remote=remote).lookup("update", CKPT_KEY) is None

    blocker.rmdir()
    assert a.lookup("update", CKPT_KEY) == ref  # the retry completes the push
    got = ArtifactStore(tmp_path / "b", remote=remote).lookup("update", CKPT_KEY)
    assert got is not None and got.sha256 == ref.sha256


@pytest.mark.parametrize("target", ["updates/part-00000.parquet", "model/model.safetensors"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_remote_file_is_retired_there_and_recomputed_not_published(
    tmp_path: Path, remote: str, target: str, damage: str
) -> None:
    """A damaged remote copy never reaches the local root and never blocks a run: the pull retires it on the remote
    with a warning naming the file, the lookup misses, and the recomputed artifact replaces it on the remote."""
    a = ArtifactStore(tmp_path / "a", remote=remote)
    ref = _write_checkpoint(a)
    fs, _ = _fs(remote)
    rpath = a.remote.file_path("update", CKPT_KEY, ref.sha256, target)
    data = bytearray(fs.cat_file(rpath))
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[:-7]
    fs.pipe_file(rpath, bytes(data))

    b = ArtifactStore(tmp_path / "b", remote=remote)
    assert b.lookup("update", CKPT_KEY) is None
    [msg] = b.quarantined
    assert target in msg and "is corrupted" in msg and remote.rstrip("/") in msg and "nothing was published" in msg
    assert _local_keys(b, "update") == []  # no artifact and no temp dir
    assert not a.remote.has_manifest("update", CKPT_KEY)  # retired there: the next root does not try it again
    again = _write_checkpoint(b)  # the stage recomputes (the same bytes on the CPU) and pushes
    assert again.sha256 == ref.sha256
    c = ArtifactStore(tmp_path / "c", remote=remote)
    assert c.lookup("update", CKPT_KEY) == ref and c.quarantined == []


def test_a_consistently_rewritten_remote_copy_is_not_adopted(tmp_path: Path, remote: str) -> None:
    """Issue 32, class 4: whoever can write the remote replaces a file and the manifest's hash of it (and may copy
    the old seal along); a fresh root finds no seal for the new manifest that verifies, so it retires the copy
    and recomputes instead of adopting it."""
    import pyarrow.parquet as pq

    from storage.remote import SEAL_FILE
    from storage.writer import manifest_sha256

    a = ArtifactStore(tmp_path / "a", remote=remote)
    ref = a.put_table("update", KEY, "updates", updates_table(3, loss0=1.0))
    fs, _ = _fs(remote)
    forged_rows = tmp_path / "forged.parquet"
    pq.write_table(updates_table(3, loss0=9.0), forged_rows)
    m = json.loads(fs.cat_file(a.remote.manifest_path("update", KEY)))
    m["files"][0].update(sha256=sha256_file(forged_rows), bytes=forged_rows.stat().st_size)
    forged = canonical_json(m)
    fsha = manifest_sha256(forged)
    part = a.remote.file_path("update", KEY, fsha, m["files"][0]["path"])
    fs.makedirs(fs._parent(part), exist_ok=True)
    fs.pipe_file(part, forged_rows.read_bytes())
    fs.pipe_file(a.remote.file_path("update", KEY, fsha, SEAL_FILE),
                 fs.cat_file(a.remote.file_path("update", KEY, ref.sha256, SEAL_FILE)))  # the old seal, copied
    fs.rm_file(a.remote.manifest_path("update", KEY))
    fs.pipe_file(a.remote.manifest_path("update", KEY), forged)
    b = ArtifactStore(tmp_path / "b", remote=remote)
    assert b.lookup("update", KEY) is None and "no seal that verifies" in b.quarantined[0]
    assert not (b.root / "artifacts" / "update" / KEY).exists()
    assert b.put_table("update", KEY, "updates", updates_table(3, loss0=1.0)) == ref  # recomputed, pushed again
    assert ArtifactStore(tmp_path / "c", remote=remote).lookup("update", KEY) == ref


def test_existing_remote_manifest_is_never_overwritten(tmp_path: Path, remote: str) -> None:
    a = ArtifactStore(tmp_path / "a", remote=remote)
    first = a.put_table("update", KEY, "updates", updates_table(3, loss0=1.0))
    fs, _ = _fs(remote)
    mpath = a.remote.manifest_path("update", KEY)
    before = fs.cat_file(mpath)

    # Same bytes from another root: the push is a no-op, not an error.
    same = ArtifactStore(tmp_path / "same", remote=remote)
    with same.writer("update", KEY) as w:
        w.write_table("updates", updates_table(3, loss0=1.0))
        assert w.commit().sha256 == first.sha256

    # Different bytes for the same key (a racing, nondeterministic writer): the remote is untouched, and the
    # first writer's artifact is what the commit returns (as in the local store), with a warning.
    c = ArtifactStore(tmp_path / "c", remote=remote)
    with c.writer("update", KEY) as w:
        w.write_table("updates", updates_table(3, loss0=9.0))
        adopted = w.commit()
    assert adopted.sha256 == first.sha256
    assert fs.cat_file(mpath) == before
    # c's own copy was moved aside; its lookups use the remote artifact.
    assert list((c.root / "retired" / "update").iterdir())
    got = c.lookup("update", KEY)
    assert got is not None and got.sha256 == first.sha256
    assert c.read_table(got).column("loss")[0].as_py() == 1.0


def test_retire_unpublishes_the_remote_copy_too(tmp_path: Path, remote: str) -> None:
    a = ArtifactStore(tmp_path / "a", remote=remote)
    ref = a.put_table("evaluate", KEY, "updates", updates_table(2, loss0=1.0))
    a.retire(ref)
    assert a.lookup("evaluate", KEY) is None  # not pulled straight back
    assert ArtifactStore(tmp_path / "b", remote=remote).lookup("evaluate", KEY) is None
    fs, base = _fs(remote)
    retired = fs.find(f"{base.rstrip('/')}/retired/evaluate")
    assert len(retired) == 1 and retired[0].endswith(MANIFEST)
    # Recomputing the stage (other bytes) publishes again without a conflict.
    new = a.put_table("evaluate", KEY, "updates", updates_table(2, loss0=5.0))
    assert new.sha256 != ref.sha256
    assert ArtifactStore(tmp_path / "c", remote=remote).lookup("evaluate", KEY).sha256 == new.sha256


def test_remote_manifest_with_unsafe_path_is_never_followed(tmp_path: Path, remote: str) -> None:
    fs, base = _fs(remote)
    manifest = {"format": 1, "stage": "score", "key": KEY, "tables": {}, "bytes": 1, "meta": {},
                "files": [{"path": "../../escape.txt", "sha256": "0" * 64, "bytes": 1}]}
    mpath = f"{base.rstrip('/')}/artifacts/score/{KEY}/{MANIFEST}"
    fs.makedirs(fs._parent(mpath), exist_ok=True)
    fs.pipe_file(mpath, canonical_json(manifest))
    b = ArtifactStore(tmp_path / "b", remote=remote)
    assert b.lookup("score", KEY) is None and "no seal that verifies" in b.quarantined[0]  # unsealed: not read
    assert not list(tmp_path.rglob("escape.txt"))
    assert _local_keys(b, "score") == []


def test_bad_uris_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fsspec knows no scheme 'nosuchfs'"):
        ArtifactStore(tmp_path, remote="nosuchfs://bucket/x")
    with pytest.raises(ConfigError, match="not a plain fsspec URI"):
        ArtifactStore(tmp_path, remote="/mnt/shared/opd")
    with pytest.raises(ConfigError, match="chained"):
        ArtifactStore(tmp_path, remote="simplecache::s3://bucket/x")
    with pytest.raises(ConfigError, match="embeds a password") as ei:
        ArtifactStore(tmp_path, remote="ftp://user:hunter2@host/opd")
    assert "hunter2" not in str(ei.value)


def test_missing_implementation_names_the_package(tmp_path: Path) -> None:
    import importlib.util

    from fsspec.registry import known_implementations

    for scheme in ("s3", "gs", "abfs", "oci"):
        pkg = known_implementations[scheme]["class"].split(".")[0]
        if importlib.util.find_spec(pkg) is None:
            break
    else:
        pytest.skip("s3fs, gcsfs, adlfs and ocifs are all installed")
    with pytest.raises(ConfigError, match=rf"scheme '{scheme}' needs the package '{pkg}'.*pip install {pkg}"):
        ArtifactStore(tmp_path, remote=f"{scheme}://bucket/opd")


def test_config_remote_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPD_REMOTE", raising=False)
    assert RunConfig().remote is None and RunConfig().resolved_remote() is None
    assert RunConfig(remote="s3://bucket/opd/").remote == "s3://bucket/opd"  # validated without s3fs
    assert check_remote_uri("file:///") == "file:///"
    with pytest.raises(ConfigError, match=r"remote: .*fsspec knows no scheme 'bogus'"):
        load_config(None, ["remote=bogus://x"])
    with pytest.raises(ConfigError, match="remote: .*embeds a password") as ei:
        load_config(None, ["remote=ftp://me:s3cret@host/x"])
    assert "s3cret" not in str(ei.value)

    monkeypatch.setenv("OPD_REMOTE", "memory://from-env")
    assert RunConfig().resolved_remote() == "memory://from-env"
    assert RunConfig(remote="file:///srv/opd").resolved_remote() == "file:///srv/opd"  # the config wins
    monkeypatch.setenv("OPD_REMOTE", "not a uri")
    with pytest.raises(ConfigError, match="OPD_REMOTE: remote 'not a uri'"):
        RunConfig().resolved_remote()


def test_a_scheme_that_cannot_hold_a_mirror_is_refused_before_any_lookup(tmp_path: Path, monkeypatch) -> None:
    """Issue 32, class 10: http(s), hf and other read-only file systems fsspec knows are config errors, raised
    without opening them (no network)."""
    import fsspec

    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda *a, **k: pytest.fail("the remote was opened"))
    for uri in ("https://example.com/opd", "http://127.0.0.1:9/opd", "hf://datasets/x/y", "zip://a.zip"):
        with pytest.raises(ConfigError, match=r"is not one a remote mirror can use"):
            ArtifactStore(tmp_path, remote=uri)
