"""Run lineage: which artifact each iteration of a run used, per stage (DESIGN.md section 3).

A run is a set of pointers under `<root>/runs/<name>/`:
```
run.json                          name, created_at, anything the caller records (config hash, method)
lineage/it0003.rollout.json       {run, iteration, stage, ref, recorded_at, cached, seconds, compute_seconds}
history/<time>-it0003.rollout.json  a pointer that was replaced (e.g. after --refresh), kept, never lost
.lock                             while a process writes the run (`run_lock`: an fcntl.flock, the holder's pid)
```
Each pointer file is written to a temp file and renamed into place. Artifacts are shared: two runs that
used the same inputs point at the same artifact directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import ArtifactError, ConfigError, DiskFullError
from storage.hashing import canonical_json
from storage.layout import Layout, atomic_write, check_name
from storage.refs import ArtifactRef


@dataclass(frozen=True)
class LineageEntry:
    run: str
    iteration: int
    stage: str
    ref: ArtifactRef
    recorded_at: float
    cached: bool | None = None
    seconds: float | None = None
    #: What computing the artifact cost: `seconds` when this call computed it; for a cache hit, carried over from the
    #: pointer it replaces when that one pointed at the same artifact (so a cached rerun keeps the real cost).
    compute_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "iteration": self.iteration,
            "stage": self.stage,
            "ref": self.ref.model_dump(mode="json"),
            "recorded_at": self.recorded_at,
            "cached": self.cached,
            "seconds": self.seconds,
            "compute_seconds": self.compute_seconds,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LineageEntry:
        return cls(
            run=d["run"],
            iteration=int(d["iteration"]),
            stage=d["stage"],
            ref=ArtifactRef.model_validate(d["ref"]),
            recorded_at=float(d["recorded_at"]),
            cached=d.get("cached"),
            seconds=d.get("seconds"),
            compute_seconds=d.get("compute_seconds", d.get("seconds") if d.get("cached") is False else None),
        )


def _read_record(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in a run's record `path`; ArtifactError naming the file when it is not one (edited or
    damaged: a run's records are not artifacts, so nothing recomputes them)."""
    try:
        d = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: damaged {what}: {e}; restore it, or remove the run's directory "
                            f"{path.parent if what == 'run record' else path.parent.parent}") from None
    if not isinstance(d, dict):
        raise ArtifactError(f"{path}: damaged {what}: a JSON object was expected, found {type(d).__name__}")
    return d


def _read_entry(path: Path) -> LineageEntry:
    d = _read_record(path, "lineage pointer")
    try:
        return LineageEntry.from_json(d)
    except (KeyError, TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
        raise ArtifactError(f"{path}: damaged lineage pointer: {type(e).__name__}: {e}".splitlines()[0]) from None


class RunLineage:
    """The lineage of one named run."""

    def __init__(self, root: str | Path | Layout | None, run: str):
        self.layout = root if isinstance(root, Layout) else Layout(root)
        self.run = check_name("run", run)
        self.dir = self.layout.run_dir(run)

    def exists(self) -> bool:
        return (self.dir / "run.json").is_file()

    def info(self) -> dict[str, Any]:
        p = self.dir / "run.json"
        return _read_record(p, "run record") if p.is_file() else {}

    def init(self, **info: Any) -> None:
        """Create the run (or update its info). `created_at` is kept from the first call."""
        current = self.info()
        merged = {**current, **info, "name": self.run, "created_at": current.get("created_at", time.time())}
        atomic_write(self.dir / "run.json", canonical_json(merged))

    def _entry_path(self, iteration: int, stage: str) -> Path:
        check_name("stage", stage)
        if iteration < 0:
            raise ArtifactError(f"iteration must be >= 0, got {iteration}")
        return self.dir / "lineage" / f"it{iteration:04d}.{stage}.json"

    def record(
        self,
        iteration: int,
        stage: str,
        ref: ArtifactRef,
        cached: bool | None = None,
        seconds: float | None = None,
    ) -> LineageEntry:
        """Point (iteration, stage) at `ref`. A different earlier pointer is moved to history/, not lost."""
        if not self.exists():
            self.init()
        path = self._entry_path(iteration, stage)
        old = _read_entry(path) if path.is_file() else None
        same = old is not None and old.ref.sha256 == ref.sha256
        compute = seconds if not cached else (old.compute_seconds if same else None)
        entry = LineageEntry(self.run, iteration, stage, ref, time.time(), cached, seconds, compute)
        if old is not None and not same:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(old.recorded_at))
            atomic_write(self.dir / "history" / f"{stamp}-{path.name}", path.read_bytes())
        atomic_write(path, canonical_json(entry.to_json()))
        return entry

    def entries(self) -> list[LineageEntry]:
        d = self.dir / "lineage"
        if not d.is_dir():
            return []
        out = [_read_entry(p) for p in sorted(d.glob("it*.json"))]
        return sorted(out, key=lambda e: (e.iteration, e.recorded_at))

    def get(self, iteration: int, stage: str) -> LineageEntry | None:
        p = self._entry_path(iteration, stage)
        return _read_entry(p) if p.is_file() else None

    def latest(self, stage: str) -> LineageEntry | None:
        """The entry of `stage` at the highest iteration (e.g. the latest checkpoint)."""
        found = [e for e in self.entries() if e.stage == stage]
        return max(found, key=lambda e: e.iteration) if found else None


def list_runs(root: str | Path | Layout | None) -> list[RunLineage]:
    layout = root if isinstance(root, Layout) else Layout(root)
    if not layout.runs.is_dir():
        return []
    return [RunLineage(layout, p.name) for p in sorted(layout.runs.iterdir()) if (p / "run.json").is_file()]


def check_runs(root: str | Path | Layout | None, names: Iterable[str]) -> None:
    """ConfigError naming each of `names` that is no run under the root, and the runs that are (up to 10)."""
    layout = root if isinstance(root, Layout) else Layout(root)
    known = [r.run for r in list_runs(layout)]
    if unknown := [n for n in names if n not in known]:
        there = ", ".join(known[:10]) + (f" and {len(known) - 10} more (opd runs)" if len(known) > 10 else "")
        raise ConfigError(f"no run named {', '.join(map(repr, unknown))} under {layout.root} (runs there: "
                          f"{there or 'none'})")


# ----------------------------------------------------------------------------------------- the run lock

LOCK_FILE = ".lock"
_held: dict[Path, list[int]] = {}  # lock file -> [fd, depth] of the locks this process holds


def _acquire(path: Path) -> int | None:
    """The fd holding `path`'s flock, or None when another process holds it."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # a holder releasing removed the directory in between
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        except FileNotFoundError:
            pass
        except OSError:  # e.g. the disk is full: run_lock names it
            os.close(fd)
            raise
        os.close(fd)  # a holder releasing removed the file we opened: take a new one


def _release(path: Path, fd: int) -> None:
    path.unlink(missing_ok=True)  # while still held: a process that opened this file sees it gone and retries
    for d in (path.parent, path.parent.parent):  # the run's dir and runs/, when the run wrote nothing in them
        try:
            d.rmdir()
        except OSError:
            break
    os.close(fd)


@contextmanager
def run_lock(root: str | Path | None, runs: Iterable[str]) -> Iterator[None]:
    """Hold `<root>/runs/<run>/.lock` of each run (an `fcntl.flock`; the file holds the pid) while they run, and
    `<root>/gc.lock` shared (so that `opd gc` never deletes under a live run, and a run never starts during gc).

    A run held by another process is a ConfigError naming it and the holder; what this call took is given back.
    The kernel drops a flock when its process dies, so the file of a killed run never blocks. Re-entrant in one
    process (a process may take a run it already holds, e.g. a test inside a run or an experiment flow over its
    runs). Released and removed at the end."""
    layout, taken = Layout(root), []
    try:
        gc = layout.gc_lock
        if gc not in _held:
            try:
                layout.root.mkdir(parents=True, exist_ok=True)
                fd = os.open(gc, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                full = DiskFullError.wrap(e, f"opening {gc}")
                raise full or ArtifactError(f"cannot open {gc} under the storage root: {e}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConfigError(f"opd gc is running on {layout.root}; start the run when it has finished") from None
            _held[gc] = [fd, 0]
        _held[gc][1] += 1
        taken.append(gc)
        for run in runs:
            path = layout.run_dir(run) / LOCK_FILE
            if path not in _held:
                try:
                    fd = _acquire(path)
                except OSError as e:
                    full = DiskFullError.wrap(e, f"taking the lock {path} of run {run!r}")
                    raise full or ArtifactError(f"cannot take the lock {path} of run {run!r}: {e}") from e
                if fd is None:
                    holder = path.read_text().strip() if path.is_file() else "?"
                    raise ConfigError(f"run {run!r} is being written by another opd process (pid {holder}; lock "
                                      f"{path}): wait for it to finish, or use another --name")
                _held[path] = [fd, 0]
            _held[path][1] += 1
            taken.append(path)
        yield
    finally:
        for path in reversed(taken):
            _held[path][1] -= 1
            if not _held[path][1]:
                fd = _held.pop(path)[0]
                if path.name == LOCK_FILE:
                    _release(path, fd)
                else:
                    os.close(fd)  # the gc lock file stays: other runs may hold it shared


def check_unlocked(root: str | Path | None, runs: Iterable[str]) -> None:
    """ConfigError, as `run_lock` raises it, if another process holds one of `runs` (or `opd gc` runs); the lock is
    taken and given back at once. For a command that refuses early, before it starts a server; the run itself
    takes the lock (`opd_tasks.pipeline.opened_run`)."""
    with run_lock(root, runs):
        pass
