"""Progress on a terminal: one rich display per run, with log lines printed above it; nothing elsewhere.

`run_display(console, total)` (flows/run.py, around a run on a terminal) is a live display at the bottom of the
terminal: a row for the run (the stage now running, stages done out of `total`, elapsed time) and a row for each
bar of that stage (`bar`: rollout batches, update steps, probes). While it lasts, Prefect's console log lines and
`print` go through the same console, so they scroll above the display instead of cutting through a bar.

When output is not a terminal (a log file, a pipe, CI) there is no display: a stage's progress is the one line
the stage runner logs when it ends (opd_tasks/pipeline.py). A stage that asks for a bar with no run display
(a stage called directly from a terminal, `opd bootstrap`) gets a transient display of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

T = TypeVar("T")

_display: Progress | None = None  # the run display in progress, if any
_run_row: TaskID | None = None


def _progress(console: Console, transient: bool) -> Progress:
    return Progress(TextColumn("{task.description:<28}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"), TimeElapsedColumn(), TextColumn("{task.fields[note]}"),
                    console=console, transient=transient)


def _console_handlers() -> list[logging.Handler]:
    """Prefect's console log handlers (they hold a rich Console of their own, bound to the real stderr)."""
    out = []
    for logger in [logging.getLogger(), *logging.root.manager.loggerDict.values()]:
        for h in getattr(logger, "handlers", []):
            if type(h).__name__ == "PrefectConsoleHandler" and hasattr(h, "console"):
                out.append(h)
    return out


@contextmanager
def run_display(console: Console, total: int | None, title: str = "run") -> Iterator[None]:
    """The run's one live display while the body runs, if `console` is a terminal (else nothing)."""
    global _display, _run_row
    if not console.is_terminal or _display is not None:
        yield
        return
    progress = _progress(console, transient=True)
    handlers = _console_handlers()
    saved = [h.console for h in handlers]
    with progress:
        _display, _run_row = progress, progress.add_task(title, total=total, unit="stages", note="")
        for h in handlers:
            h.console = progress.console  # log lines print above the display
        try:
            yield
        finally:
            for h, c in zip(handlers, saved, strict=True):
                h.console = c
            _display = _run_row = None


@contextmanager
def stage_running(label: str) -> Iterator[None]:
    """The run row names the stage while it runs and counts it when it ends (a no-op without a run display)."""
    if _display is None or _run_row is None:
        yield
        return
    _display.update(_run_row, description=label)
    try:
        yield
    finally:
        if _display is not None:
            _display.advance(_run_row)


class Bar:
    """A bar of the running stage: a row of the run display, a transient display of its own on a terminal, or
    nothing (`enabled` False, or not a terminal)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True):
        self._own: Progress | None = None
        self._progress = _display if enabled else None
        if enabled and self._progress is None:
            console = Console(stderr=True)
            if console.is_terminal:
                self._own = self._progress = _progress(console, transient=True)
                self._own.start()
        self._task = self._progress.add_task(f"  {desc}", total=total, unit=unit, note="") if self._progress else None

    def update(self, n: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def note(self, **figures: str) -> None:
        """Figures shown after the bar, e.g. `note(loss="0.41")`."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, note=" ".join(f"{k} {v}" for k, v in figures.items()))

    def close(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        if self._own is not None:
            self._own.stop()
            self._own = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(iterable: Iterable[T], desc: str, unit: str = "it", enabled: bool = True,
        total: int | None = None) -> Iterator[T]:
    """Iterate with a `Bar` (total: `len(iterable)` when it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Bar(total, desc, unit, enabled) as b:
        for item in iterable:
            yield item
            b.update()
