"""Cached-rerun benchmark: `opd run` on the embedded default, then again (all cache hits), as a user runs it: new
processes, no PREFECT_API_URL, a fresh storage root and Prefect home. Two modes, side by side in one run:
- `shared` (the default of `opd run`): the first command starts the shared local server, the reruns reuse it;
- `temporary` (`OPD_SERVER_IDLE_MINUTES=0`): every command starts and stops a server of its own.
Reports the wall times (process start to exit), the ratio rerun / first, and whether any output holds a traceback
or the server's "Error flushing" noise (issue 20: the rerun at most 15% of the first, nothing printed).

    python -m bench rerun [--config configs/testbed.yaml] [--reps 2] [--modes shared temporary]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from bench.common import median, save

console = Console()
REPO = Path(__file__).resolve().parents[1]


def _opd_run(config: str, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", config], cwd=REPO, env=env,
                         capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"opd run failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return seconds, out.stdout + out.stderr


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench rerun", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/testbed.yaml")
    ap.add_argument("--reps", type=int, default=2, help="Cached reruns after the first run (median reported).")
    ap.add_argument("--modes", nargs="+", choices=["shared", "temporary"], default=["shared", "temporary"])
    args = ap.parse_args(argv)
    result: dict = {"config": args.config, "modes": {}}
    for mode in args.modes:
        result["modes"][mode] = row = _first_then_reruns(args.config, args.reps, mode)
        console.print(f"{mode}: first {row['first_s']:.1f} s, cached rerun {row['cached_median_s']:.1f} s (median "
                      f"of {args.reps}): {100 * row['ratio']:.1f}% of the first; tracebacks in: "
                      f"{', '.join(row['outputs_with_tracebacks']) or 'none'}")
    console.print(f"results: {save('rerun', result)}")
    return result


def _first_then_reruns(config: str, reps: int, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OPD_HOME": f"{tmp}/opd", "PREFECT_HOME": f"{tmp}/prefect",
               "OPD_SERVER_IDLE_MINUTES": "0" if mode == "temporary" else "10"}
        env.pop("PREFECT_API_URL", None)
        try:
            console.print(f"[{mode}] first run of {config} (computes every stage) ...")
            first, out = _opd_run(config, env)
            noisy = ["first"] if "Traceback" in out or "Error flushing" in out else []
            cached = []
            for i in range(reps):
                console.print(f"[{mode}] cached rerun {i + 1} of {reps} ...")
                seconds, out = _opd_run(config, env)
                cached.append(seconds)
                noisy += [f"rerun {i + 1}"] if "Traceback" in out or "Error flushing" in out else []
        finally:
            if mode == "shared":
                subprocess.run([sys.executable, "-m", "flows.cli", "server", "stop"], cwd=REPO, env=env,
                               capture_output=True)
    return {"first_s": first, "cached_s": cached, "cached_median_s": median(cached), "ratio": median(cached) / first,
            "outputs_with_tracebacks": noisy}


if __name__ == "__main__":
    main()
