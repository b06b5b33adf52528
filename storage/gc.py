"""`opd gc`: reclaim disk under a storage root without breaking any run (docs/operations.md, "Disk").

What goes, for a retention of the last `keep_last` checkpoints of each run:
- **old checkpoints**: a checkpoint artifact (the stage `checkpoint_stage`, e.g. `update`) that no run keeps loses its
  checkpoint files (every file that is not part of a table: the weights and the optimizer state); its tables (the
  update's `updates` log) stay, so `opd sql` and `opd report` still show the training curve. A run keeps its last
  `keep_last` checkpoints and the iterations listed in its run.json `keep_checkpoints` (`opd gc --keep RUN:ITER`).
- **optimizer state** of every kept checkpoint that is not the latest of any run (`optimizer_files`).
- **unreferenced artifacts**: artifacts that no run's lineage points at (a deleted run, a crash between publish and
  record, a `--refresh` that replaced them).
- **retired artifacts** (`<root>/retired/`: `--refresh` and found-corrupted copies) and a crashed gc's `<root>/trash/`.
- **temp files of dead writers**: a `.tmp-*` directory (an artifact's, an import's) whose writer, a process of this
  host named in it (`storage.layout.temp_name`), no longer runs; one of another host, or of a live process, stays.

How it stays safe:
- Nothing a running run needs can go: runs hold `<root>/gc.lock` shared while they run (`storage.lineage.run_lock`),
  and gc takes it exclusively, so gc refuses while any run is live and no run starts while gc deletes.
- Removing files from an artifact is recorded first (`ArtifactStore.prune`), so a crash halfway leaves a consistent
  store (`opd verify` clean); an artifact is deleted by removing its record, then renaming its directory into
  `<root>/trash/` (atomic), then deleting the trash.
- A checkpoint whose weights were removed is recomputed when a rerun looks it up (the lookup moves it to
  `retired/`; on the CPU the bytes are identical), and a deleted unreferenced artifact like any missing one.
- `plan` changes nothing (`opd gc --dry-run` prints it with the bytes it would free); `execute` carries it out.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from storage.errors import ConfigError
from storage.layout import MANIFEST, TMP_PREFIX, Layout, temp_writer_gone
from storage.lineage import LOCK_FILE, list_runs
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


@dataclass(frozen=True)
class Removal:
    """One thing gc removes: files of an artifact (`paths`), a whole artifact, or a directory (retired, trash)."""

    what: str  # "checkpoint files", "optimizer state", "unreferenced artifact", "retired", "trash",
    # "temp of a dead writer"
    target: str  # stage/key, or a path relative to the root
    bytes: int
    why: str
    ref: ArtifactRef | None = None
    paths: tuple[str, ...] = ()


@contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """Hold `<root>/gc.lock` exclusively; ConfigError naming the live runs when a run holds it."""
    layout = Layout(root)
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.gc_lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            live = [r.run for r in list_runs(layout) if (r.dir / LOCK_FILE).is_file()]
            raise ConfigError(f"opd gc: run(s) {', '.join(live) or '(starting)'} are running under {root}; gc runs "
                              "when no run is live (use --dry-run to see the plan now)") from None
        yield
    finally:
        os.close(fd)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def plan(store: ArtifactStore, keep_last: int, checkpoint_stage: str = "update",
         optimizer_files: tuple[str, ...] = (), also_keep: frozenset[tuple[str, int]] = frozenset()) -> list[Removal]:
    """What gc would remove under `store`'s root (see the module docstring); changes nothing. `also_keep`: (run,
    iteration) checkpoints kept besides each run's `keep_checkpoints`."""
    if keep_last < 1:
        raise ConfigError(f"opd gc: --keep-last must be >= 1 (the latest checkpoint of a run is always kept), got "
                          f"{keep_last}")
    layout = store.layout
    referenced: set[tuple[str, str]] = set()
    kept: set[tuple[str, str]] = set()  # checkpoints some run keeps
    latest: set[tuple[str, str]] = set()  # checkpoints that are some run's latest
    for run in list_runs(layout):
        entries = run.entries()
        referenced |= {(e.ref.stage, e.ref.key) for e in entries}
        ckpts = sorted((e for e in entries if e.stage == checkpoint_stage), key=lambda e: e.iteration)
        marked = set(run.info().get("keep_checkpoints") or []) | {i for r, i in also_keep if r == run.run}
        kept |= {(e.ref.stage, e.ref.key) for e in ckpts[-keep_last:]}
        kept |= {(e.ref.stage, e.ref.key) for e in ckpts if e.iteration in marked}
        if ckpts:
            latest.add((ckpts[-1].ref.stage, ckpts[-1].ref.key))
    out: list[Removal] = []
    for ref in store.iter_artifacts(on_bad=lambda msg: None):  # corrupted ones: `opd verify` / the next lookup
        ident, target = (ref.stage, ref.key), f"{ref.stage}/{ref.key}"
        manifest = store.manifest(ref)
        files = {e["path"]: e["bytes"] for e in manifest["files"]}
        pruned = store.pruned(ref)
        if ident not in referenced:
            out.append(Removal("unreferenced artifact", target, _du(store.path_of(ref)),
                               "no run's lineage points at it", ref))
            continue
        if ref.stage != checkpoint_stage:
            continue
        tables = tuple(f"{t}/" for t in manifest["tables"])
        if ident not in kept:
            doomed = sorted(p for p in files if not p.startswith(tables) and p not in pruned)
            why = f"a checkpoint older than the last {keep_last} of every run that uses it"
            what = "checkpoint files"
        elif ident not in latest:
            doomed = sorted(p for p in files if p in optimizer_files and p not in pruned)
            why, what = "optimizer state of a kept checkpoint that is no run's latest", "optimizer state"
        else:
            continue
        if doomed:
            out.append(Removal(what, target, sum(files[p] for p in doomed), why, ref, tuple(doomed)))
    for name, why in (("retired", "moved out of the cache by --refresh or as corrupted"),
                      ("trash", "left by an interrupted opd gc")):
        base = layout.root / name
        for d in sorted(base.glob("*/*") if name == "retired" else base.glob("*")):
            out.append(Removal(name, d.relative_to(layout.root).as_posix(), _du(d), why))
    for pattern in (f"{TMP_PREFIX}*", f"*/{TMP_PREFIX}*", f"artifacts/*/{TMP_PREFIX}*"):
        for t in sorted(layout.root.glob(pattern)):
            if temp_writer_gone(t.name):
                out.append(Removal("temp of a dead writer", t.relative_to(layout.root).as_posix(),
                                   _du(t) if t.is_dir() else t.stat().st_size,
                                   f"left by process {t.name.rsplit('-', 2)[1]}, which no longer runs"))
    return out


def execute(store: ArtifactStore, removals: list[Removal]) -> int:
    """Carry out `removals` (from `plan`, under `exclusive`); returns the bytes freed."""
    layout, freed = store.layout, 0
    trash = layout.root / "trash"
    for r in removals:
        if r.paths:
            freed += store.prune(r.ref, list(r.paths), r.why)
            continue
        if r.ref is not None:  # a whole artifact: forget it, then move it out of sight, then delete it
            src = layout.artifact_dir(r.ref.stage, r.ref.key)
            if not (src / MANIFEST).is_file():
                continue
            layout.published_record(r.ref.stage, r.ref.key).unlink(missing_ok=True)
            layout.pruned_record(r.ref.stage, r.ref.key).unlink(missing_ok=True)
        else:
            src = layout.root / r.target
        trash.mkdir(parents=True, exist_ok=True)
        dest = trash / f"{src.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(src, dest)
        except FileNotFoundError:
            continue
        (shutil.rmtree if dest.is_dir() else os.unlink)(dest)
        freed += r.bytes
    return freed
