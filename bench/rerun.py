"""Cached-rerun benchmark: `opd run` on the embedded default twice, as a user runs it (new processes, no
PREFECT_API_URL, so each starts its temporary server), in a fresh storage root and Prefect home; the second run is
all cache hits. Reports both wall times (process start to exit), their ratio, and whether either output holds a
traceback or the server's "Error flushing" noise (issue 20: the second at most 15% of the first, nothing printed).

    python -m bench rerun [--config configs/testbed.yaml] [--reps 2]
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
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OPD_HOME": f"{tmp}/opd", "PREFECT_HOME": f"{tmp}/prefect"}
        env.pop("PREFECT_API_URL", None)
        console.print(f"first run of {args.config} (computes every stage) ...")
        first, out = _opd_run(args.config, env)
        noisy = ["first"] if "Traceback" in out or "Error flushing" in out else []
        cached = []
        for i in range(args.reps):
            console.print(f"cached rerun {i + 1} of {args.reps} ...")
            seconds, out = _opd_run(args.config, env)
            cached.append(seconds)
            noisy += [f"rerun {i + 1}"] if "Traceback" in out or "Error flushing" in out else []
    result = {"config": args.config, "first_s": first, "cached_s": cached, "cached_median_s": median(cached),
              "ratio": median(cached) / first, "outputs_with_tracebacks": noisy}
    console.print(f"first {first:.1f} s, cached rerun {median(cached):.1f} s (median of {len(cached)}): "
                  f"{100 * result['ratio']:.1f}% of the first; tracebacks in: {', '.join(noisy) or 'none'}")
    console.print(f"results: {save('rerun', result)}")
    return result


if __name__ == "__main__":
    main()
