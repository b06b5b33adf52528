"""Run lineage: which artifact each iteration of a run used, per stage (DESIGN.md section 3).

A run is a set of pointers under `<root>/runs/<name>/`:
```
run.json                          name, created_at, anything the caller records (config hash, method)
lineage/it0003.rollout.json       {run, iteration, stage, ref, recorded_at, cached, seconds}
history/<time>-it0003.rollout.json  a pointer that was replaced (e.g. after --refresh), kept, never lost
```
Each pointer file is written to a temp file and renamed into place. Artifacts are shared: two runs that
used the same inputs point at the same artifact directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.errors import ArtifactError
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

    def to_json(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "iteration": self.iteration,
            "stage": self.stage,
            "ref": self.ref.model_dump(mode="json"),
            "recorded_at": self.recorded_at,
            "cached": self.cached,
            "seconds": self.seconds,
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
        )


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
        return json.loads(p.read_text()) if p.is_file() else {}

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
        entry = LineageEntry(self.run, iteration, stage, ref, time.time(), cached, seconds)
        if path.is_file():
            old = LineageEntry.from_json(json.loads(path.read_text()))
            if old.ref.sha256 != ref.sha256:
                stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(old.recorded_at))
                atomic_write(self.dir / "history" / f"{stamp}-{path.name}", path.read_bytes())
        atomic_write(path, canonical_json(entry.to_json()))
        return entry

    def entries(self) -> list[LineageEntry]:
        d = self.dir / "lineage"
        if not d.is_dir():
            return []
        out = [LineageEntry.from_json(json.loads(p.read_text())) for p in sorted(d.glob("it*.json"))]
        return sorted(out, key=lambda e: (e.iteration, e.recorded_at))

    def get(self, iteration: int, stage: str) -> LineageEntry | None:
        p = self._entry_path(iteration, stage)
        return LineageEntry.from_json(json.loads(p.read_text())) if p.is_file() else None

    def latest(self, stage: str) -> LineageEntry | None:
        """The entry of `stage` at the highest iteration (e.g. the latest checkpoint)."""
        found = [e for e in self.entries() if e.stage == stage]
        return max(found, key=lambda e: e.iteration) if found else None


def list_runs(root: str | Path | Layout | None) -> list[RunLineage]:
    layout = root if isinstance(root, Layout) else Layout(root)
    if not layout.runs.is_dir():
        return []
    return [RunLineage(layout, p.name) for p in sorted(layout.runs.iterdir()) if (p / "run.json").is_file()]
