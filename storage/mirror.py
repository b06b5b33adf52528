"""The store's remote half: pushing an artifact to the remote mirror and pulling one from it, with the seal that
lets a pull trust a copy (storage/remote.py has the protocol and the layout; storage/seal.py the seal). Used by
`ArtifactStore.lookup`, `path_of` and every commit."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

from storage import seal
from storage.errors import ArtifactError, TransientError
from storage.layout import MANIFEST
from storage.refs import ArtifactRef
from storage.remote import check_rel_path
from storage.writer import MANIFEST_FORMAT, ArtifactWriter, _hash_files, _same_content, _sha_or_bad, manifest_sha256

if TYPE_CHECKING:
    from storage.store import ArtifactStore

log = logging.getLogger("storage.store")  # its messages read as the store's, as they did


def push(store: ArtifactStore, ref: ArtifactRef, verified: bool = False) -> ArtifactRef:
    """Mirror a local artifact to the remote: files, then the manifest; returns the artifact to use.

    A remote manifest is never overwritten, unless its seal does not verify (then it is retired on the remote:
    nothing vouches for it). If the remote already has a different sealed one for the key (two writers
    computed different bytes for one cache key: the first to commit wins, as in the local store), the local
    copy is moved to `<root>/retired/` and the remote artifact is pulled and returned."""
    remote = store.remote
    if remote is None:
        return ref
    adir = store.layout.artifact_dir(ref.stage, ref.key)
    data = (adir / MANIFEST).read_bytes()
    theirs = remote.manifest_bytes(ref.stage, ref.key)
    if theirs is not None and not sealed(store, ref.stage, ref.key, theirs):
        retire(store, ref.stage, ref.key, "its seal does not verify under this machine's key")
        theirs = None
    if theirs is None:
        if not verified:
            store.verify(ref)  # never mirror a corrupted local file under a manifest that vouches for it
        rels = [check_rel_path(e["path"], str(adir / MANIFEST)) for e in json.loads(data)["files"]]
        sha = manifest_sha256(data)
        remote.upload(ref.stage, ref.key, sha, adir, rels, data, seal.seal(ref.stage, ref.key, sha))
        theirs = remote.manifest_bytes(ref.stage, ref.key)
    if theirs is None or theirs == data or _same_content(theirs, data):
        return ref  # the same artifact (another writer's provenance at most differs)
    moved = store._retire_local(ref.stage, ref.key)
    log.warning(
        "artifact %s/%s: %s holds a different manifest (sha256 %s..., ours %s...); two writers computed "
        "different bytes for one cache key. The remote one was first and is used; ours was moved to %s",
        ref.stage, ref.key, remote.display(remote.manifest_path(ref.stage, ref.key)),
        _sha_or_bad(theirs)[:16], manifest_sha256(data)[:16], moved)
    pulled = pull(store, ref.stage, ref.key)
    if pulled is None:
        raise TransientError(f"artifact {ref.stage}/{ref.key}: the remote manifest that differs from ours "
                             "disappeared while it was being read; retry the stage")
    return pulled


def sealed(store: ArtifactStore, stage: str, key: str, data: bytes) -> bool:
    """Whether the remote manifest `data` of (stage, key) carries a seal that verifies under this key."""
    try:
        sha = manifest_sha256(data)
    except ValueError:
        return False
    mac = store.remote.seal_text(stage, key, sha)
    return mac is not None and seal.sealed(stage, key, sha, mac)


def retire(store: ArtifactStore, stage: str, key: str, why: str) -> None:
    """Move the remote copy of (stage, key) aside (`<remote>/retired/`), with a warning: it is not used, and a
    recomputed artifact can take its place."""
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}-untrusted"
    where = store.remote.display(store.remote.manifest_path(stage, key))
    moved = store.remote.retire(stage, key, stamp)
    msg = f"warning: the remote copy of artifact {stage}/{key} ({where}) is not used: {why}; moved to {moved}"
    log.warning("%s; the stage recomputes", msg)
    store.quarantined.append(msg)


def pull(store: ArtifactStore, stage: str, key: str) -> ArtifactRef | None:
    """Download (stage, key) from the remote into a temp dir, verify its seal and every file, publish it
    locally; None when the remote has none, or has one that fails (then retired there, with a warning)."""
    remote = store.remote
    if remote is None:
        return None
    data = remote.manifest_bytes(stage, key)
    if data is None:
        return None  # no artifact, or a push cut off before its manifest: both mean "not there"
    if not sealed(store, stage, key, data):
        retire(store, stage, key, "no seal that verifies under this machine's key (a copy rewritten "
                            "on the remote, pushed before seals or by a machine with another seal key)")
        return None
    where = remote.display(remote.manifest_path(stage, key))
    try:
        m = json.loads(data)
        entries = list(m["files"])
        if m["format"] != MANIFEST_FORMAT or m["stage"] != stage or m["key"] != key:
            raise ArtifactError(
                f"{where}: manifest is for {m['stage']}/{m['key']} (format {m['format']}), "
                f"expected {stage}/{key} (format {MANIFEST_FORMAT})"
            )
        rels = [check_rel_path(e["path"], where) for e in entries]
        sizes = [int(e["bytes"]) for e in entries]
        wanted = [str(e["sha256"]) for e in entries]
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{where} is not a valid manifest: {e}") from None
    sha = manifest_sha256(data)
    w = ArtifactWriter(store, stage, key)
    try:
        remote.download(stage, key, sha, rels, w.path)
        paths = [w.path / r for r in rels]
        got_sizes = [p.stat().st_size for p in paths]
        hashes = _hash_files(paths)
        for rel, size, got_size, want, got in zip(rels, sizes, got_sizes, wanted, hashes, strict=True):
            if got_size != size or got != want:
                raise ArtifactError(
                    f"artifact {stage}/{key} pulled from {remote.display(remote.file_path(stage, key, sha, rel))}"
                    f": file {rel} is corrupted ({got_size} bytes, sha256 {got[:16]}...; the manifest says "
                    f"{size} bytes, {want[:16]}...); nothing was published under {w.final}"
                )
    except ArtifactError as e:
        w.abort()
        retire(store, stage, key, str(e))
        return None
    except BaseException:
        w.abort()
        raise
    ref, _ = w._publish(data, paths)
    return ref
