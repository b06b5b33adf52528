"""Orchestration overhead: the Prefect flow `distill` vs the plain driver on the same config, side by side, and the
cost of a fully cached rerun, for a growing number of iterations.

For each N: (a) the plain driver (`opd_tasks.pipeline.run_plain`) in a fresh root; (b) the Prefect flow in another
fresh root (same inputs, so the same work); (c) the flow again on (b)'s root (every stage cached). Overhead =
(b - a) / a; per task = (b - a) / the flow's stage task runs; cached rerun = c / b. The flow runs against the API a
user's `opd run` gets (flows/server.py: the shared local server, started before timing), with Prefect's logging to
the API on unless PREFECT_LOGGING_TO_API_ENABLED=false.

`--pad-seconds S` makes every computed stage take at least S seconds (it sleeps after computing, in both drivers):
the overhead on stages of realistic length, where a testbed stage computes in 0.1-0.6 s.

    python -m bench orchestration --iterations 1 4 16 --method opd
    python -m bench orchestration --iterations 1 --pad-seconds 30
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import save
from opd_tasks.config_files import load_config

console = Console(width=160)


@contextmanager
def padded_stages(seconds: float):
    """Every stage's compute function takes at least `seconds` (the same wrapper for both drivers)."""
    from opd_tasks.stages import STAGES

    real = {name: stage.compute for name, stage in STAGES.items()}

    def pad(fn):
        def padded(ctx, inputs):
            t0 = time.perf_counter()
            ref = fn(ctx, inputs)
            time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
            return ref
        return padded

    try:
        for name, stage in STAGES.items():
            if seconds > 0:
                object.__setattr__(stage, "compute", pad(real[name]))
        yield
    finally:
        for name, stage in STAGES.items():
            object.__setattr__(stage, "compute", real[name])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench orchestration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--method", default="opd")
    ap.add_argument("--pad-seconds", type=float, default=0.0, help="Minimum seconds per computed stage (default 0).")
    args = ap.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.distill import distill
    from flows.server import prefect_api
    from opd_tasks.pipeline import run_plain

    logging_to_api = os.environ.get("PREFECT_LOGGING_TO_API_ENABLED", "true").lower() != "false"
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, prefect_api(console.print):
        server_s = time.perf_counter() - t0
        # Warm up torch, the models' files and the tokenizer so that the first timed side does not pay for it.
        run_plain(load_config(None, [f"method={args.method}", "iterations=1", "name=warmup",
                                     f"root={Path(tmp) / 'warmup'}"]), log=lambda m: None, progress=False)
        for n in args.iterations:
            sets = [f"method={args.method}", f"iterations={n}", "name=bench"]
            cfg_a = load_config(None, [*sets, f"root={Path(tmp) / f'plain-{n}'}"])
            cfg_b = load_config(None, [*sets, f"root={Path(tmp) / f'flow-{n}'}"])
            with padded_stages(args.pad_seconds):
                t0 = time.perf_counter()
                run_plain(cfg_a, log=lambda m: None, progress=False)
                plain = time.perf_counter() - t0
                t0 = time.perf_counter()
                first = distill(cfg_b.model_dump(mode="json"))
                flow_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = distill(cfg_b.model_dump(mode="json"))
            cached = time.perf_counter() - t0
            tasks = 2 + sum(len(it["stages"]) for it in first["iterations"])  # + eval prompts and baseline
            states = {r["state"] for it in again["iterations"] for r in it["stages"]}
            rows.append({"iterations": n, "task_runs": tasks, "plain_s": plain, "flow_s": flow_s,
                         "cached_rerun_s": cached, "overhead": (flow_s - plain) / plain,
                         "per_task_ms": 1000 * (flow_s - plain) / tasks, "cached_ratio": cached / flow_s,
                         "rerun_states": sorted(states)})
            console.print(rows[-1])
    t = Table("iterations", "stage task runs", "plain driver s", "Prefect flow s", "overhead", "per task ms",
              "cached rerun s", "rerun / first",
              title=f"orchestration overhead ({args.method}; stages padded to {args.pad_seconds:g} s; server ready "
                    f"in {server_s:.1f} s, not included; Prefect logs to the API: {logging_to_api})")
    for r in rows:
        t.add_row(str(r["iterations"]), str(r["task_runs"]), f"{r['plain_s']:.1f}", f"{r['flow_s']:.1f}",
                  f"{r['overhead']:+.1%}", f"{r['per_task_ms']:.0f}", f"{r['cached_rerun_s']:.1f}",
                  f"{r['cached_ratio']:.0%}")
    console.print(t)
    tag = ("-nolog" if not logging_to_api else "") + (f"-pad{args.pad_seconds:g}" if args.pad_seconds else "")
    out = save(f"orchestration{tag}", {"args": vars(args), "server_start_s": server_s, "rows": rows,
                                       "logging_to_api": logging_to_api})
    console.print(f"results: {out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
