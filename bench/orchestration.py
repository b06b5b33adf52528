"""Orchestration overhead: the Prefect flow `distill` vs the plain driver on the same config, side by side,
and the cost of a fully cached rerun, for a growing number of iterations.

For each N: (a) plain driver (`opd_tasks.pipeline.run_plain`) in a fresh root; (b) the Prefect flow in
another fresh root (same inputs, so the same work); (c) the flow again on (b)'s root (every stage cached).
Overhead = (b - a) / a; cached rerun = c / b. The temporary Prefect server is started once before timing.

    python -m bench orchestration --iterations 1 4 16 --method opd
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import save
from opd_tasks.config import load_config

console = Console(width=160)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench orchestration", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--method", default="opd")
    args = ap.parse_args(argv)
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from prefect import flow

    from flows.distill import distill
    from opd_tasks.pipeline import run_plain

    @flow
    def warmup() -> int:
        return 1

    t0 = time.perf_counter()
    warmup()
    server_s = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # Warm up torch, the models' files and the tokenizer so that the first timed side does not pay for it.
        run_plain(load_config(None, [f"method={args.method}", "iterations=1", "name=warmup",
                                     f"root={Path(tmp) / 'warmup'}"]), log=lambda m: None, progress=False)
        for n in args.iterations:
            sets = [f"method={args.method}", f"iterations={n}", "name=bench"]
            cfg_a = load_config(None, [*sets, f"root={Path(tmp) / f'plain-{n}'}"])
            cfg_b = load_config(None, [*sets, f"root={Path(tmp) / f'flow-{n}'}"])
            t0 = time.perf_counter()
            run_plain(cfg_a, log=lambda m: None, progress=False)
            plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            distill(cfg_b.model_dump(mode="json"))
            flow_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = distill(cfg_b.model_dump(mode="json"))
            cached = time.perf_counter() - t0
            states = {r["state"] for it in again["iterations"] for r in it["stages"]}
            rows.append({"iterations": n, "plain_s": plain, "flow_s": flow_s, "cached_rerun_s": cached,
                         "overhead": (flow_s - plain) / plain, "cached_ratio": cached / flow_s,
                         "rerun_states": sorted(states)})
            console.print(rows[-1])
    t = Table("iterations", "plain driver s", "Prefect flow s", "overhead", "cached rerun s", "rerun / first",
              title=f"orchestration overhead ({args.method}; temporary server start {server_s:.1f}s not included; "
                    f"PREFECT_LOGGING_TO_API_ENABLED={os.environ.get('PREFECT_LOGGING_TO_API_ENABLED', 'true')})")
    for r in rows:
        t.add_row(str(r["iterations"]), f"{r['plain_s']:.1f}", f"{r['flow_s']:.1f}", f"{r['overhead']:+.0%}",
                  f"{r['cached_rerun_s']:.1f}", f"{r['cached_ratio']:.0%}")
    console.print(t)
    tag = "-nolog" if os.environ.get("PREFECT_LOGGING_TO_API_ENABLED", "true").lower() == "false" else ""
    out = save(f"orchestration{tag}", {"args": vars(args), "server_start_s": server_s, "rows": rows,
                                       "logging_to_api": not tag})
    console.print(f"results: {out}")
    return {"rows": rows}


if __name__ == "__main__":
    main()
