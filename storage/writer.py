"""Writing one artifact: `ArtifactWriter` fills a private temp directory beside the final one, hashes each file,
writes the manifest, fsyncs, and renames the directory into place (storage/store.py's docstring says why and what
a reader then sees). Also the artifact's hash of its manifest (`manifest_sha256`, without the `provenance`
field) and the helpers both the writer and the store use."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.errors import ArtifactError, DiskFullError, TransientError
from storage.hashing import canonical_json, sha256_bytes, sha256_file
from storage.layout import MANIFEST, TMP_PREFIX, check_key, check_name, temp_name, temp_writer_gone
from storage.refs import ArtifactRef
from storage.schemas import conform, get_schema

if TYPE_CHECKING:
    from storage.store import ArtifactStore

MANIFEST_FORMAT = 1
#: The manifest field that records what computed an artifact; not part of its sha256 (module docstring).
PROVENANCE = "provenance"

log = logging.getLogger(__name__)


def manifest_sha256(data: bytes) -> str:
    """An artifact's sha256: of its manifest `data` as canonical JSON without the `provenance` field. For a manifest
    the store wrote without one, this is the sha256 of its bytes. ValueError if `data` is not a JSON object."""
    m = json.loads(data)
    if not isinstance(m, dict):
        raise ValueError("a manifest is a JSON object")
    m.pop(PROVENANCE, None)
    return sha256_bytes(canonical_json(m))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_dead_writers(stage_dir: Path, key: str) -> None:
    """Delete temp dirs of earlier writers of `key` whose process is gone (`temp_writer_gone`: killed mid-write on
    this host). Temp dirs are never read: this only reclaims space (`opd gc` reclaims every key's)."""
    for t in stage_dir.glob(f"{TMP_PREFIX}{key}-*"):
        if temp_writer_gone(t.name):
            shutil.rmtree(t, ignore_errors=True)


def _hash_files(paths: list[Path]) -> list[str]:
    """sha256 of several files; two threads (hashlib releases the GIL on large updates)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(sha256_file, paths))


def _sha_or_bad(data: bytes) -> str:
    try:
        return manifest_sha256(data)
    except ValueError:
        return "(not a manifest)"


def _same_content(a: bytes, b: bytes) -> bool:
    """Whether manifests `a` and `b` are of the same artifact (equal but for their provenance)."""
    return _sha_or_bad(a) == _sha_or_bad(b) != "(not a manifest)"


class ArtifactWriter:
    """Builds one artifact in a temp dir; `commit()` publishes it atomically. Use via `ArtifactStore.writer`.

    - `write_table(name, table)` appends a part file to table `name` (schema from storage/schemas.py);
    - `path` is the temp dir, for free-form files (e.g. `model.save_pretrained(w.path / "model")`);
    - `meta` is a JSON-able dict stored in the manifest (stage summary, config slice, ...);
    - `provenance` is a JSON-able dict of what computed it (library versions, device), stored in the manifest but
      not in the artifact's sha256.
    """

    def __init__(self, store: ArtifactStore, stage: str, key: str):
        self.store = store
        self.stage = check_name("stage", stage)
        self.key = check_key(key)
        self.final = store.layout.artifact_dir(stage, key)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_writers(self.final.parent, key)
        self.path = self.final.parent / temp_name(key)
        self.path.mkdir()
        self.meta: dict[str, Any] = {}
        self.provenance: dict[str, Any] = {}
        self._tables: dict[str, dict[str, Any]] = {}
        self._done = False

    # -- tables -------------------------------------------------------------------------------------
    def write_table(self, name: str, table: pa.Table, row_group_size: int | None = None) -> None:
        """Validate `table` against schema `name` and write it as the table's next part file."""
        schema = get_schema(name)
        table = conform(table, schema)
        info = self._tables.setdefault(name, {"schema_version": schema.version, "rows": 0, "parts": 0})
        part_dir = self.path / name
        part_dir.mkdir(exist_ok=True)
        part = part_dir / f"part-{info['parts']:05d}.parquet"
        try:
            pq.write_table(table, part, row_group_size=row_group_size)
        except OSError as e:
            raise self._os_error(e, part) from e
        info["rows"] += table.num_rows
        info["parts"] += 1

    def declare_table(self, name: str) -> None:
        """Record an empty table (0 rows, no parts) so readers get an empty table, not a missing one."""
        schema = get_schema(name)
        self._tables.setdefault(name, {"schema_version": schema.version, "rows": 0, "parts": 0})

    def _os_error(self, e: OSError, where: Path) -> ArtifactError:
        if full := DiskFullError.wrap(e, f"writing {where} (artifact {self.stage}/{self.key} discarded)"):
            return full
        return ArtifactError(f"cannot write {where}: {e}")

    # -- publish ------------------------------------------------------------------------------------
    def commit(self) -> ArtifactRef:
        if self._done:
            raise ArtifactError(f"artifact {self.stage}/{self.key} was already committed or aborted")
        try:
            files = sorted(p for p in self.path.rglob("*") if p.is_file())
            if any(p.name == MANIFEST for p in files):
                raise ArtifactError(f"{MANIFEST} is reserved; do not write it into an artifact")
            hashes = _hash_files(files)
            entries = []
            total = 0
            for p, h in zip(files, hashes, strict=True):
                size = p.stat().st_size
                total += size
                entries.append({"path": p.relative_to(self.path).as_posix(), "sha256": h, "bytes": size})
            manifest = {
                "format": MANIFEST_FORMAT,
                "stage": self.stage,
                "key": self.key,
                "tables": self._tables,
                "files": entries,
                "bytes": total,
                "meta": self.meta,
            }
            if self.provenance:
                manifest[PROVENANCE] = self.provenance
            data = canonical_json(manifest)
        except OSError as e:
            self.abort()
            raise self._os_error(e, self.path) from e
        except BaseException:
            self.abort()
            raise
        ref, fresh = self._publish(data, files)
        if fresh:
            self.store.published.append(ref)
        # a no-op without a remote or when the remote has it already; theirs when the remote differs
        return self.store._push(ref, verified=fresh)

    def _publish(self, data: bytes, files: list[Path]) -> tuple[ArtifactRef, bool]:
        """Write manifest `data` beside `files`, fsync, and rename the temp dir into place.

        Returns (ref, True), or (the existing verified ref, False) when someone published this key first.
        """
        try:
            with open(self.path / MANIFEST, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            for p in files:
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
            _fsync_dir(self.path)
        except OSError as e:
            self.abort()
            raise self._os_error(e, self.path) from e
        except BaseException:
            self.abort()
            raise
        for attempt in range(2):
            try:
                os.rename(self.path, self.final)
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    self.abort()
                    raise self._os_error(e, self.final) from e
            # Someone published this key first: keep theirs (checked as a cache hit), drop ours. Ours waits until
            # theirs is judged: one that is not usable was retired, and ours takes its place (the second try).
            ref = self.store._lookup_local(self.stage, self.key, witness=data)
            if ref is not None:
                self.abort()
                return ref, False
            if attempt:
                self.abort()
                raise TransientError(f"{self.final}: other writers' artifacts keep taking this key and are not "
                                     "usable (see the warnings above); retry the stage") from None
        self._done = True
        _fsync_dir(self.final.parent)
        self.store._record(self.stage, self.key, data)
        for e in json.loads(data)["files"]:  # hashed above: the next lookup of it costs a stat, not a rehash
            path = self.final / e["path"]
            self.store.ledger.add(path, e["sha256"], path.stat())
        return self.store._ref_from_manifest(self.final, data), True

    def abort(self) -> None:
        self._done = True
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            # An exception inside the block, or a block that forgot to commit: nothing is published.
            if not self._done:
                self.abort()


