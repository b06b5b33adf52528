"""The content-addressed artifact store (DESIGN.md section 3).

An artifact is an immutable directory `<root>/artifacts/<stage>/<key>/` of part files plus a
`_manifest.json` that lists every file with its sha256 and size, and, for tables, their schema and rows.
The artifact's sha256 is the sha256 of the manifest (canonical JSON) without its `provenance` field, so one hash
pins every byte of every file, every table's rows and the stage's meta. `provenance` says what computed the artifact
(the versions of python, torch, transformers, pyarrow, vllm where used, and the device: `manifest_sha256`): it is
recorded, shown by `opd show` and the report, and left out of the hash, so the same bytes computed under another
library release are the same artifact with the same downstream cache keys. It is therefore a label, not evidence:
editing it changes no hash.

Writing (storage/writer.py): an `ArtifactWriter` fills a private temp directory beside the final one, hashes each file
(streamed, 1 MiB chunks), writes the manifest, fsyncs, and renames the directory into place. A rename is
atomic, so a reader sees either no artifact or a complete one. If another writer published the same key
first, the rename fails, our copy is discarded and the existing (verified) artifact is returned: nothing
stored is ever overwritten.

Reading: `read_table` / `checkpoint_dir` verify the manifest hash against the ref and every file's hash
against the manifest, and raise `ArtifactError` naming the bad file before any byte is consumed.

The store's record: when it publishes an artifact, the store also writes the manifest's sha256 to
`<root>/published/<stage>/<key>`, sealed with a keyed MAC whose key lives outside the root (storage/seal.py), so
that whoever rewrites an artifact, its manifest and its record together still cannot make the record vouch for
the rewrite. A lookup (a cache hit) adopts an artifact only when its record's seal verifies, the manifest is the
one it names, and every file is as the manifest says (a part file changed, truncated or deleted is corrupted
too), checked through the root's ledger of verified files (storage/ledger.py): a file hashed before and
unchanged since by size, mtime and inode is not hashed again, so a cached rerun costs a `stat` per file; what the
ledger cannot see (a change that keeps all three) only `opd verify` finds. Anything else (a manifest that differs
from the record or does not parse, a damaged file, a record that is missing or not sealed by this key: a root
written before records were sealed, a crash between the rename and the record, another machine's root) is moved
to `<root>/retired/` with a warning naming it, and the lookup misses, so the stage recomputes; it is never
adopted.

Paths: refs, records and lineage hold locations relative to the root (`artifacts/<stage>/<key>`), and the store
finds an artifact by its stage and key under its own root, so a moved root keeps working and a copied one never
reads the original.

An artifact may hold several tables (e.g. the analysis stage writes `tokens` and `probes`) and free-form
files (a checkpoint's `save_pretrained` directory). Table parts live at `<table>/part-NNNNN.parquet`.

Remote mirror (optional, `ArtifactStore(root, remote="s3://bucket/prefix")`, storage/remote.py for the protocol,
storage/mirror.py for the push and the pull): the local root
stays the working copy. A commit pushes the new artifact to the remote (files first, the manifest last); a
`lookup` that misses locally pulls the artifact from the remote, checks every file's size and sha256 against
the remote manifest, and publishes it locally with the same atomic rename; a local hit whose remote copy is
missing (a push cut off by a crash) is pushed again. A remote manifest is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage import mirror, seal
from storage.errors import ArtifactError, TransientError
from storage.hashing import canonical_json
from storage.layout import MANIFEST, TMP_PREFIX, Layout, atomic_write
from storage.ledger import VerifiedLedger
from storage.refs import ArtifactRef
from storage.remote import RemoteMirror
from storage.schemas import TableSchema, check_file_schema, get_schema
from storage.writer import (
    MANIFEST_FORMAT,
    PROVENANCE,
    ArtifactWriter,
    _hash_files,
    _same_content,
    manifest_sha256,
)

__all__ = ["MANIFEST_FORMAT", "PROVENANCE", "ArtifactStore", "ArtifactWriter", "manifest_sha256"]

log = logging.getLogger(__name__)

class ArtifactStore:
    """Content-addressed artifacts under one storage root, optionally mirrored to a remote fsspec URI.

    `remote` (e.g. "s3://bucket/opd", "file:///mnt/shared/opd") makes the store push what it publishes and pull
    what it misses (storage/remote.py); `storage_options` go to fsspec (prefer fsspec's and the file system's
    own credential mechanisms). Without a remote the store is local only, as before.
    """

    def __init__(self, root: str | Path | None = None, remote: str | None = None,
                 storage_options: dict[str, Any] | None = None):
        self.layout = Layout(root)
        self.root = self.layout.root
        self.remote: RemoteMirror | None = RemoteMirror(remote, storage_options) if remote else None
        #: Artifacts this instance published (not found in the cache): lets a driver tell computed from cached.
        self.published: list[ArtifactRef] = []
        #: What this instance's lookups moved out of the cache (corrupted, or emptied by opd gc), one message each,
        #: for the driver's log.
        self.quarantined: list[str] = []
        self._ledger: VerifiedLedger | None = None

    @property
    def ledger(self) -> VerifiedLedger:
        """The root's ledger of verified files (opened on first use)."""
        if self._ledger is None:
            self._ledger = VerifiedLedger(self.root)
        return self._ledger

    @property
    def remote_uri(self) -> str | None:
        """The remote URI (as configured), or None; pass it on so another process opens the same mirror."""
        return self.remote.uri if self.remote is not None else None

    # -- writing ------------------------------------------------------------------------------------
    def writer(self, stage: str, key: str) -> ArtifactWriter:
        return ArtifactWriter(self, stage, key)

    def put_table(self, stage: str, key: str, name: str, table: pa.Table, meta: dict | None = None,
                  provenance: dict | None = None) -> ArtifactRef:
        """Publish a one-table artifact (or return the existing one for this key)."""
        existing = self.lookup(stage, key)
        if existing is not None:
            self.verify(existing)
            return existing
        with self.writer(stage, key) as w:
            w.write_table(name, table)
            w.meta.update(meta or {})
            w.provenance.update(provenance or {})
            return w.commit()

    # -- lookup -------------------------------------------------------------------------------------
    def _ref_from_manifest(self, adir: Path, data: bytes) -> ArtifactRef:
        try:
            m = json.loads(data)
            if (m["stage"], m["key"]) != (adir.parent.name, adir.name):
                raise ValueError(f"it names artifact {m['stage']}/{m['key']}")
            tables = m["tables"]
            rows = sum(int(t["rows"]) for t in tables.values())
            if len(tables) == 1:
                schema_name, info = next(iter(tables.items()))
                version = int(info["schema_version"])
            else:
                schema_name = "+".join(sorted(tables)) if tables else "files"
                version = 0
            return ArtifactRef(
                uri=self.layout.relative(adir),
                stage=m["stage"],
                key=m["key"],
                sha256=manifest_sha256(data),
                rows=rows,
                bytes=int(m["bytes"]),
                schema_name=schema_name,
                schema_version=version,
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{adir / MANIFEST} is not a valid manifest: {e}") from None

    def lookup(self, stage: str, key: str) -> ArtifactRef | None:
        """The published artifact for (stage, key), its manifest and files checked (the module docstring), or None.

        With a remote: a local miss pulls the artifact from the remote when it has one (every file verified);
        a local hit that the remote lacks is pushed (after verifying the local files).
        """
        ref = self._lookup_local(stage, key)
        if self.remote is None:
            return ref
        if ref is not None:
            try:  # best effort: a local hit never needs the remote (it may be down)
                if not self.remote.has_manifest(stage, key):
                    ref = self._push(ref)
            except TransientError as e:
                log.warning("artifact %s/%s: not mirrored to the remote now (%s); the next lookup tries again",
                            stage, key, e)
            return ref
        return self._pull(stage, key)

    def _lookup_local(self, stage: str, key: str, witness: bytes | None = None) -> ArtifactRef | None:
        """The local artifact under (stage, key) if its sealed record names its manifest and its files check out;
        anything else is moved to `<root>/retired/` (see the module docstring) and the lookup misses. `witness`:
        the manifest this process computed for the key and found published by another writer a moment before (a
        race for one key): that writer seals its record right after its rename, so a missing record is waited
        for a few seconds, and an artifact with our own content needs no other witness."""
        adir = self.layout.artifact_dir(stage, key)
        mpath = adir / MANIFEST
        if not mpath.is_file():
            return None
        data = mpath.read_bytes()
        unsealed = False
        try:
            if witness is not None:
                deadline = time.monotonic() + 5
                while self.recorded_sha256(stage, key) is None and time.monotonic() < deadline:
                    if _same_content(data, witness):
                        self.verify(self._ref_from_manifest(adir, data))
                        self._record(stage, key, data)
                        break
                    time.sleep(0.05)
            ref = self._checked_ref(adir, data)
            if self.recorded_sha256(stage, key) is None:
                unsealed, record = True, self.layout.published_record(stage, key)
                raise ArtifactError(
                    f"{record} is {'not sealed by this key' if record.exists() else 'missing'}: nothing vouches "
                    "for the artifact (a root written before records were sealed, another machine's or user's "
                    f"root without its seal key {seal.key_file()}, a crash before the record, or a rewrite)")
            self.verify(ref, ledger=self.ledger)  # adopt only if every file is as the manifest says
        except ArtifactError as e:
            moved = self._retire_local(stage, key, reason="unsealed" if unsealed else "corrupted", expect=data)
            if moved is None:  # another process retired it (or published a new one) first: a miss either way
                return self._lookup_local(stage, key) if (mpath.is_file() and mpath.read_bytes() != data) else None
            msg = (f"warning: artifact {stage}/{key} {'cannot be trusted' if unsealed else 'is corrupted'} and was "
                   f"moved out of the cache to {moved}: {e}")
            log.warning("%s; the stage recomputes", msg)
            self.quarantined.append(msg)
            return None
        if self._emptied(ref):  # opd gc removed all its non-table files (a checkpoint's weights): not usable
            if moved := self._retire_local(stage, key, reason="pruned", expect=data):
                self.quarantined.append(f"artifact {stage}/{key}: opd gc had removed its files; moved to {moved}")
            return None
        return ref

    def _emptied(self, ref: ArtifactRef) -> bool:
        """Whether `opd gc` pruned every file of `ref` that is not part of a table (what a checkpoint is for)."""
        pruned = self.pruned(ref)
        if not pruned:
            return False
        m = self.manifest(ref)
        tables = tuple(f"{t}/" for t in m["tables"])
        free = [e["path"] for e in m["files"] if not e["path"].startswith(tables)]
        return bool(free) and all(p in pruned for p in free)

    def _checked_ref(self, adir: Path, data: bytes) -> ArtifactRef:
        """The ref of manifest `data` in `adir`; ArtifactError if it does not parse or is not the manifest the store
        recorded when it published the artifact (no record: not checked here)."""
        ref = self._ref_from_manifest(adir, data)
        recorded = self.recorded_sha256(ref.stage, ref.key)
        if recorded is not None and ref.sha256 != recorded:
            raise ArtifactError(f"{adir / MANIFEST}: sha256 {ref.sha256[:16]}... is not the {recorded[:16]}... "
                                "recorded when the artifact was published (the manifest was edited or corrupted)")
        return ref

    def _record(self, stage: str, key: str, manifest: bytes) -> None:
        """Record the sha256 of the manifest published under (stage, key), sealed (a complete artifact: nothing
        pruned)."""
        sha = manifest_sha256(manifest)
        seal.check_root(self.root)
        atomic_write(self.layout.published_record(stage, key), f"{sha} {seal.seal(stage, key, sha)}\n".encode())
        self.layout.pruned_record(stage, key).unlink(missing_ok=True)

    # -- pruning (opd gc, storage/gc.py) ---------------------------------------------------------------
    def pruned(self, ref: ArtifactRef) -> dict[str, str]:
        """The files `opd gc` removed from `ref` ({path in the artifact: why}); empty for a complete artifact."""
        try:
            return dict(json.loads(self.layout.pruned_record(ref.stage, ref.key).read_bytes()))
        except FileNotFoundError:
            return {}

    def prune(self, ref: ArtifactRef, paths: list[str], why: str) -> int:
        """Remove files `paths` of artifact `ref` (e.g. a checkpoint's weights), recording them first, so that a
        crash halfway leaves a consistent store: `verify` skips what is recorded as pruned, a read of a pruned file
        names the pruning, and a lookup retires an artifact whose non-table files are all pruned (`_emptied`), so
        its stage recomputes it. Returns bytes freed."""
        listed = {e["path"]: e["bytes"] for e in self.manifest(ref)["files"]}
        if unknown := sorted(set(paths) - set(listed)):
            raise ArtifactError(f"artifact {ref.stage}/{ref.key} has no file(s) {unknown}")
        atomic_write(self.layout.pruned_record(ref.stage, ref.key),
                     canonical_json({**self.pruned(ref), **{p: why for p in paths}}))
        base = self.path_of(ref)
        for rel in paths:
            (base / rel).unlink(missing_ok=True)
        for d in sorted({(base / rel).parent for rel in paths}, key=lambda d: -len(d.parts)):
            while d != base and d.is_dir() and not any(d.iterdir()):  # drop directories left empty
                d.rmdir()
                d = d.parent
        return sum(listed[p] for p in paths)

    def recorded_sha256(self, stage: str, key: str) -> str | None:
        """The sha256 of the manifest the store published under (stage, key), or None if it has no record whose
        seal verifies (storage/seal.py)."""
        try:
            sha, mac = self.layout.published_record(stage, key).read_text().split()
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError, ValueError):
            return None
        seal.check_root(self.root)  # a process with another key is refused, not left to retire what others sealed
        return sha if len(sha) == 64 and seal.sealed(stage, key, sha, mac) else None

    # -- remote mirror (storage/mirror.py) ---------------------------------------------------------------
    def _push(self, ref: ArtifactRef, verified: bool = False) -> ArtifactRef:
        return mirror.push(self, ref, verified)

    def _pull(self, stage: str, key: str) -> ArtifactRef | None:
        return mirror.pull(self, stage, key)

    def path_of(self, ref: ArtifactRef) -> Path:
        """The directory of `ref` under this root (found by stage and key, never by a path the ref carries); with
        a remote, pulled from it if only the remote has the artifact."""
        own = self.layout.artifact_dir(ref.stage, ref.key)
        if self.remote is not None and not (own / MANIFEST).is_file():
            self._pull(ref.stage, ref.key)
        return own

    def iter_artifacts(self, on_bad: Callable[[str], None] | None = None) -> Iterator[ArtifactRef]:
        """Every published artifact under the root (temp dirs are skipped). One whose manifest does not parse or
        is not the one the store recorded raises ArtifactError, or, with `on_bad`, is passed to it (the message)
        and skipped. Read-only: unlike a lookup, this never moves anything."""
        if not self.layout.artifacts.is_dir():
            return
        for sdir in sorted(self.layout.artifacts.iterdir()):
            if not sdir.is_dir():
                continue
            for adir in sorted(sdir.iterdir()):
                if adir.name.startswith(TMP_PREFIX) or not (adir / MANIFEST).is_file():
                    continue
                try:
                    ref = self._checked_ref(adir, (adir / MANIFEST).read_bytes())
                except ArtifactError as e:
                    if on_bad is None:
                        raise
                    on_bad(str(e))
                    continue
                yield ref

    def missing_artifacts(self) -> list[tuple[str, str]]:
        """(stage, key) of every artifact the store recorded publishing whose directory is gone."""
        if not self.layout.published.is_dir():
            return []
        return [(rec.parent.name, rec.name) for rec in sorted(self.layout.published.glob("*/*"))
                if not rec.name.startswith(".") and not (self.layout.artifact_dir(rec.parent.name, rec.name)
                                                         / MANIFEST).is_file()]

    # -- verification -------------------------------------------------------------------------------
    def manifest(self, ref: ArtifactRef) -> dict[str, Any]:
        """The artifact's manifest, checked against `ref.sha256`."""
        mpath = self.path_of(ref) / MANIFEST
        try:
            data = mpath.read_bytes()
        except FileNotFoundError:
            also = f" (nor a manifest on {self.remote!r})" if self.remote is not None else ""
            raise ArtifactError(f"artifact {ref.stage}/{ref.key} is missing: no {mpath}{also}") from None
        try:
            got = manifest_sha256(data)
        except ValueError as e:
            raise ArtifactError(f"{mpath} is not a valid manifest: {e}") from None
        if got != ref.sha256:
            raise ArtifactError(f"{mpath}: sha256 {got[:16]}... does not match the ref's {ref.sha256[:16]}...")
        return json.loads(data)

    def verify(self, ref: ArtifactRef, files: list[str] | None = None,
               ledger: VerifiedLedger | None = None) -> dict[str, Any]:
        """Check the manifest and every listed file (or only `files`); raise ArtifactError naming the bad one.

        With a `ledger` (storage/ledger.py), a file it saw hashed to the expected sha256, unchanged since by size,
        mtime and inode, is not hashed again, and each file hashed here is added to it."""
        m = self.manifest(ref)
        base = self.path_of(ref)
        pruned = self.pruned(ref)
        if files is not None and (gone := sorted(set(files) & set(pruned))):
            raise ArtifactError(f"artifact {ref.stage}/{ref.key}: file(s) {gone} were removed by opd gc "
                                f"({pruned[gone[0]]}); a rerun of its stage recomputes them")
        entries = [e for e in m["files"] if (files is None or e["path"] in files) and e["path"] not in pruned]
        paths = [base / e["path"] for e in entries]
        for p in paths:
            if not p.is_file():
                raise ArtifactError(f"artifact {ref.stage}/{ref.key}: file {p} is missing")
        if ledger is not None:
            todo = [(e, p) for e, p in zip(entries, paths, strict=True) if not ledger.known(p, e["sha256"])]
            entries, paths = [e for e, _ in todo], [p for _, p in todo]
        before = [p.stat() for p in paths]
        for e, p, h, st in zip(entries, paths, _hash_files(paths), before, strict=True):
            if h != e["sha256"]:
                raise ArtifactError(
                    f"artifact {ref.stage}/{ref.key}: file {p} is corrupted "
                    f"(sha256 {h[:16]}..., manifest says {e['sha256'][:16]}...)"
                )
            if ledger is not None and p.stat() == st:  # unchanged while it was hashed
                ledger.add(p, h, st)
        return m

    def stray_files(self, ref: ArtifactRef) -> list[str]:
        """Files inside the artifact's directory that its manifest does not list (nothing should put any there:
        a stray file beside a checkpoint's weights could change what loads). `opd verify` names them."""
        base = self.path_of(ref)
        listed = {e["path"] for e in self.manifest(ref)["files"]} | {MANIFEST}
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                      if not p.is_dir() and p.relative_to(base).as_posix() not in listed)

    # -- reading ------------------------------------------------------------------------------------
    def table_files(self, ref: ArtifactRef, name: str, verify: bool = True) -> list[Path]:
        """The part files of table `name` in the artifact, verified by hash unless verify=False."""
        m = self.manifest(ref)
        if name not in m["tables"]:
            raise ArtifactError(
                f"artifact {ref.stage}/{ref.key} has no table {name!r} (it has {sorted(m['tables'])})"
            )
        schema = get_schema(name)
        version = int(m["tables"][name]["schema_version"])
        if version != schema.version:
            raise ArtifactError(
                f"artifact {ref.stage}/{ref.key}: table {name!r} has schema version {version}, "
                f"this code reads version {schema.version}"
            )
        rels = sorted(e["path"] for e in m["files"] if e["path"].startswith(f"{name}/"))
        if verify:
            self.verify(ref, files=rels)
        base = self.path_of(ref)
        return [base / r for r in rels]

    def read_table(self, ref: ArtifactRef, name: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """Read (and verify) table `name` of an artifact; `name` may be omitted for one-table artifacts.

        The part files are hashed in a background thread while pyarrow decodes them (both release the GIL);
        the table is returned only after every hash matched, so a corrupted byte is never consumed.
        """
        name = name or self._only_table(ref)
        schema: TableSchema = get_schema(name)
        files = self.table_files(ref, name, verify=False)
        if not files:
            empty = schema.arrow.empty_table()
            return empty.select(columns) if columns else empty
        rels = [f.relative_to(self.path_of(ref)).as_posix() for f in files]
        with ThreadPoolExecutor(max_workers=1) as pool:
            check = pool.submit(self.verify, ref, rels)
            parts = []
            try:
                for f in files:
                    check_file_schema(pq.read_schema(f), schema, str(f))
                    parts.append(pq.read_table(f, columns=columns))
            except (OSError, pa.ArrowException) as e:
                check.result()  # a hash mismatch explains the decode error better: raise that first
                raise ArtifactError(f"artifact {ref.stage}/{ref.key}: cannot read {name!r}: {e}") from e
            check.result()
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def _only_table(self, ref: ArtifactRef) -> str:
        tables = list(self.manifest(ref)["tables"])
        if len(tables) != 1:
            raise ArtifactError(f"artifact {ref.stage}/{ref.key} holds tables {tables}; name one")
        return tables[0]

    def checkpoint_dir(self, ref: ArtifactRef, needs: tuple[str, ...] = ("",)) -> Path:
        """The verified directory of a free-form artifact (e.g. a checkpoint). Treat it as read-only. `needs`: path
        prefixes the caller reads (default: everything); one that `opd gc` pruned is an ArtifactError."""
        if gone := sorted(p for p in self.pruned(ref) if p.startswith(needs)):
            raise ArtifactError(f"artifact {ref.stage}/{ref.key}: opd gc removed {gone[0]}"
                                f"{f' and {len(gone) - 1} more files' if len(gone) > 1 else ''} "
                                f"({self.pruned(ref)[gone[0]]}); a rerun of its stage recomputes it")
        self.verify(ref)
        return self.path_of(ref)

    def find(self, sha256: str) -> ArtifactRef:
        """The artifact whose manifest hash starts with `sha256` (a prefix of >= 8 hex digits)."""
        matches = [r for r in self.iter_artifacts() if r.sha256.startswith(sha256)]
        if len(matches) != 1:
            raise ArtifactError(f"{len(matches)} artifacts match sha256 prefix {sha256!r}")
        return matches[0]

    def retire(self, ref: ArtifactRef) -> Path:
        """Move a published artifact out of the cache (to `<root>/retired/<stage>/<key>-<time>`), so that its
        stage recomputes (`--refresh`). Nothing is deleted: no command removes retired artifacts yet (delete
        `<root>/retired/` by hand to reclaim the space).

        With a remote, its manifest is moved first (to `<remote>/retired/...`), or the next lookup would pull the
        artifact straight back."""
        stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        if self.remote is not None:
            self.remote.retire(ref.stage, ref.key, stamp)
        return self._retire_local(ref.stage, ref.key, stamp=stamp)

    def _retire_local(self, stage: str, key: str, stamp: str | None = None, reason: str = "",
                      expect: bytes | None = None) -> Path | None:
        """Move the local artifact (stage, key) to `<root>/retired/` and drop the store's record of it. With
        `expect` (the manifest the caller judged), only that artifact: None when another process moved it first,
        or published another one in its place (then put back untouched)."""
        stamp = stamp or f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        dest = self.root / "retired" / stage / f"{key}-{stamp}{'-' + reason if reason else ''}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = self.layout.artifact_dir(stage, key)
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            if expect is None:
                raise
            return None
        if expect is not None:
            try:
                moved = (dest / MANIFEST).read_bytes()
            except OSError:
                moved = None
            if moved != expect:  # not the artifact judged: a fresh one another process published meanwhile
                try:
                    os.rename(dest, src)
                except OSError:
                    pass
                return None
        self.layout.published_record(stage, key).unlink(missing_ok=True)
        return dest
