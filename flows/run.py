"""`opd run`: run the `distill` Prefect flow and print what happened and where to look next.

Without `PREFECT_API_URL`, Prefect starts a temporary local server for the run (a few seconds); with a
running `prefect server start` (see docs/operations.md), runs and artifacts show in its UI.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd_tasks.config import RunConfig
from opd_tasks.errors import ConfigError

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
    """Hold `<root>/runs/<run>/.lock` of each run (an `fcntl.flock`; the file holds the pid) while they run.

    A run held by another process is a ConfigError naming it and the holder; what this call took is given back.
    The kernel drops a flock when its process dies, so the file of a killed run never blocks. Re-entrant in one
    process (the CLI takes the lock before the Prefect server starts, the distill flow again). Released and removed
    at the end."""
    from storage.layout import Layout

    layout, taken = Layout(root), []
    try:
        for run in runs:
            path = layout.run_dir(run) / LOCK_FILE
            if path not in _held:
                fd = _acquire(path)
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
                _release(path, _held.pop(path)[0])


def run_and_report(cfg: RunConfig, console: Console, refresh: list[str] | None = None, resume: bool = False) -> dict:
    """The distill flow on `cfg`, then its table. The run is locked (`run_lock`) before the Prefect server starts;
    the caller has checked the flags (flows/cli.py, `run_cmd`), so a refused command writes nothing."""
    from flows.distill import distill

    root = cfg.resolved_root().resolve()
    with run_lock(root, [cfg.name]):
        console.rule(f"[bold]opd run[/] {cfg.name}: method {cfg.method}, {cfg.iterations} iterations, root {root}")
        console.print(
            f"teacher {cfg.models.teacher.path} | student {cfg.models.student.path} | data {cfg.data.source} | "
            f"{cfg.data.prompts_per_iteration} prompts x {cfg.rollout.samples_per_prompt} samples per iteration | "
            f"device {cfg.device}", highlight=False,
        )
        t0 = time.perf_counter()
        out = distill(cfg.model_dump(mode="json"), refresh=refresh or [], resume=resume)
    t = Table("iteration", "accuracy (per sample)", "mean loss", "high-loss tokens: surface / divergent / unprobed",
              "stages computed / cached", "seconds",
              title=f"run {cfg.name}: accuracy on {cfg.data.eval_size} held-out prompts per iteration "
                    f"(baseline {out['baseline_accuracy']:.1%})")
    for iteration in out["iterations"]:
        stages = iteration["stages"]
        cached = sum(1 for r in stages if r["state"] == "Cached")
        analysis = iteration["analysis"]
        shares = (" / ".join(f"{analysis['share'][r]:.0%}" for r in ("surface", "divergent", "unprobed"))
                  if analysis else "-")
        t.add_row(str(iteration["iteration"]), f"{iteration['accuracy']:.1%}", f"{iteration['mean_loss']:.4f}",
                  shares, f"{len(stages) - cached} / {cached}", f"{sum(r['seconds'] for r in stages):.1f}")
    console.print(t)
    console.print(f"done in {time.perf_counter() - t0:.0f}s. Artifacts: {root}/artifacts; lineage: "
                  f"{root}/runs/{cfg.name}", highlight=False)
    query = (f"SELECT iteration, stage, avg(correct::INT) AS accuracy FROM evals WHERE run='{cfg.name}' "
             "GROUP BY 1, 2 ORDER BY 1, 2")
    console.print(f'next: opd report {cfg.name} | opd runs | opd sql "{query}" | opd verify {cfg.name}',
                  highlight=False, markup=False)
    return out
