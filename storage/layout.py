"""Where things live under the storage root (DESIGN.md section 3).

```
<root>/artifacts/<stage>/<cache_key>/   part files + _manifest.json (immutable, content-addressed)
<root>/artifacts/<stage>/.tmp-*         in-flight writes (`temp_name`); never read; a dead writer's go at the key's next
                                        publish, and in `opd gc`
<root>/published/<stage>/<cache_key>    "<sha256> <seal>": the manifest the store published under the key (its record),
                                        sealed with a key outside the root (storage/seal.py)
<root>/retired/<stage>/<key>-<time>     artifacts moved out of the cache (--refresh, or found corrupted)
<root>/pruned/<stage>/<cache_key>       the files `opd gc` removed from an artifact, and why (JSON)
<root>/gc.lock                          runs hold it shared, `opd gc` exclusive (storage/gc.py)
<root>/runs/<name>/                     run.json + lineage/<iteration>-<stage>.json pointers
<root>/prefect/results/                 Prefect's result store (same lifetime as the artifacts)
<root>/cache/datasets/                  the `datasets` library's cache (unless HF_DATASETS_CACHE or HF_HOME is set)
<root>/verified.sqlite                  the ledger of verified files (storage/ledger.py)
```
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path

from storage.errors import ConfigError, DiskFullError

MANIFEST = "_manifest.json"
TMP_PREFIX = ".tmp-"

#: This machine, as temp names carry it (letters, digits and '_' only, so a name splits on '-').
HOST = "".join(ch if ch.isalnum() else "_" for ch in socket.gethostname()) or "host"


def temp_name(label: str) -> str:
    """The name of a temp file or directory a process writes before renaming it into place:
    `.tmp-<label>-<host>-<pid>-<random>`, so that whoever finds it can tell whether its writer still runs
    (`temp_writer_gone`)."""
    return f"{TMP_PREFIX}{label}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_writer_gone(name: str) -> bool:
    """Whether the temp `name` (`temp_name`'s shape) was left by a process of this host that no longer runs (killed
    mid-write). A name of another shape, another host's (shared storage) or a live process's is not: it is left
    alone. A pid reused by a new process keeps a temp a while longer, never the other way round."""
    parts = name.rsplit("-", 3)
    if not name.startswith(TMP_PREFIX) or len(parts) != 4 or parts[1] != HOST or not parts[2].isdigit():
        return False
    return int(parts[2]) != os.getpid() and not pid_alive(int(parts[2]))


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_KEY = re.compile(r"^[0-9a-f]{8,128}$")


def default_root() -> Path:
    """$OPD_HOME if set, else ./.opd (relative to the current directory)."""
    env = os.environ.get("OPD_HOME")
    return Path(env).expanduser() if env else Path(".opd")


def check_name(kind: str, name: str) -> str:
    """A run or stage name safe to use as one path component: no separators, no '..'."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ConfigError(
            f"{kind} name {name!r} is not allowed: use 1-128 letters, digits, '_', '.', '-', "
            "starting with a letter or digit, with no path separators and no '..'"
        )
    return name


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key):
        raise ConfigError(f"cache key {key!r} must be lowercase hex (8-128 characters)")
    return key


class Layout:
    """Paths under one storage root."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root if root is not None else default_root()).expanduser().resolve()

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def prefect_results(self) -> Path:
        return self.root / "prefect" / "results"

    @property
    def published(self) -> Path:
        return self.root / "published"

    def published_record(self, stage: str, key: str) -> Path:
        """Where the store records the manifest sha256 it published under (stage, key)."""
        return self.published / check_name("stage", stage) / check_key(key)

    @property
    def gc_lock(self) -> Path:
        """Held shared by every running run and exclusively by `opd gc` (storage/gc.py)."""
        return self.root / "gc.lock"

    def pruned_record(self, stage: str, key: str) -> Path:
        """Where `opd gc` records the files it removed from artifact (stage, key) (storage/gc.py)."""
        return self.root / "pruned" / check_name("stage", stage) / check_key(key)

    def relative(self, path: Path) -> str:
        """`path` under the root, as the POSIX path relative to it (what refs and records hold)."""
        return path.relative_to(self.root).as_posix()

    def stage_dir(self, stage: str) -> Path:
        return self.artifacts / check_name("stage", stage)

    def artifact_dir(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / check_key(key)

    def run_dir(self, run: str) -> Path:
        return self.runs / check_name("run", run)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file, fsync and rename: a reader sees the old bytes or the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if full := DiskFullError.wrap(e, f"writing {path}"):
            raise full from e
        raise
