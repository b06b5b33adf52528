"""The real recipe, measured: `python -m bench real_recipe [--config F] [--root DIR] [--set k=v ...] [--out F]`.

Runs configs/smollm2-context.yaml (on-policy context distillation of SmolLM2-135M-Instruct, docs/real-models.md)
with the plain driver and writes what a user sizing such a run needs (bench/results/real_recipe.json unless --out):
- per step (0 = the initial student, i = after iteration i-1): accuracy, reverse KL to the teacher per token,
  truncated share; the teacher's own accuracy (the headroom gate's evaluation) when the run made one;
- per stage call: wall seconds and the process's peak resident memory while it ran (sampled every 0.1 s from
  /proc/self/status, assigned to the call whose [start, end] window holds the sample);
- disk: bytes per stage artifact and per iteration, as stored.
The imported model must exist under the root (`make real`). `--set device=cuda` runs it on a GPU (scripts/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "smollm2-context.yaml"


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler:
    """(time, resident bytes) every `every` seconds, in a daemon thread, until stopped."""

    def __init__(self, every: float = 0.1):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), _rss_bytes()))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> int | None:
        inside = [b for t, b in self.samples if start <= t <= end]
        return max(inside) if inside else None


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(config: Path, overrides: list[str]) -> dict:
    from opd_tasks.config_files import load_config
    from opd_tasks.pipeline import run_plain
    from storage.layout import Layout
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    cfg = load_config(config, overrides)
    started = time.time()
    with RssSampler() as rss:
        out = run_plain(cfg, log=lambda m: print(m, flush=True), progress=True)
    wall = time.time() - started
    root = Layout(cfg.root).root
    store = ArtifactStore(root)
    calls, disk = [], {}
    for e in sorted(RunLineage(root, cfg.name).entries(), key=lambda e: e.recorded_at):
        size = _dir_bytes(store.path_of(e.ref)) if store.path_of(e.ref).exists() else None
        peak = rss.peak(e.recorded_at - (e.seconds or 0), e.recorded_at)
        calls.append({"iteration": e.iteration, "stage": e.stage, "cached": e.cached,
                      "seconds": None if e.seconds is None else round(e.seconds, 2),
                      "peak_rss_mb": None if peak is None else round(peak / 2**20),
                      "artifact_mb": None if size is None else round(size / 2**20, 1)})
        if size is not None:
            disk[e.iteration] = disk.get(e.iteration, 0) + size

    def step_figures(stage: str, iteration: int) -> dict | None:
        entry = RunLineage(root, cfg.name).get(iteration, stage)
        if entry is None:
            return None
        meta = store.manifest(entry.ref)["meta"]
        return {k: meta.get(k) for k in ("accuracy", "rkl_per_token", "rkl_per_sequence", "truncated", "n")}

    steps = [{"step": 0, **(step_figures("baseline", 0) or {})}]
    steps += [{"step": it.iteration + 1, **(step_figures("evaluate", it.iteration) or {})} for it in out.iterations]
    return {
        "config": str(config), "overrides": overrides, "run": cfg.name, "method": cfg.method, "seed": cfg.seed,
        "device": cfg.device, "wall_seconds": round(wall, 1),
        "peak_rss_mb": round(max((b for _, b in rss.samples), default=0) / 2**20),
        "teacher": step_figures("teacher_eval", 0), "steps": steps, "stage_calls": calls,
        "disk_mb_per_iteration": {str(k): round(v / 2**20, 1) for k, v in sorted(disk.items())},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench real_recipe", description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=RECIPE)
    ap.add_argument("--root", type=Path, default=None, help="Storage root (default: the config's, $OPD_HOME, .opd).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "real_recipe.json")
    args = ap.parse_args(argv)
    overrides = [*args.overrides, *([f"root={args.root}"] if args.root else [])]
    result = measure(args.config, overrides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for s in result["steps"]:
        print(f"step {s['step']}: accuracy {s.get('accuracy')}, reverse KL {s.get('rkl_per_token')} nats/token, "
              f"truncated {s.get('truncated')}")
    print(f"teacher: {result['teacher']}; wall {result['wall_seconds']} s; peak RSS {result['peak_rss_mb']} MB; "
          f"disk per iteration {result['disk_mb_per_iteration']} MB; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
