"""How well each near-future detector tells surface-form forks from reasoning forks on the testbed.

For each detector setting, `topd` runs (plain driver) over the seeds; then, over every probed high-loss token
of every iteration (regime `surface` or `divergent`), against the testbed's ground-truth roles:
- the base rate of `form` tokens among them (a detector that calls everything `surface` has that precision);
- AUC: the chance that a reasoning/answer token gets a larger D_t than a form token (0.5 = no separation),
  computed in DuckDB over the `tokens` Parquet files;
- surface precision / recall at the run's own threshold, and the final accuracy;
- against the `consequential` fork's ground truth (`--set data.testbed.fork=consequential`): how many probed
  tokens are `fork`, the AUC of a fork against a surface-form token (form, filler), and the share of forks called
  `divergent` (fork recall);
- the calibrated threshold: the absolute `analysis.delta` that best separates the ground truth on these (pilot)
  seeds (largest Youden J = recall of divergent + recall of surface - 1), with the J it reaches. Run it on pilot
  seeds and use that delta, absolute, on the seeds that are reported (DESIGN.md section 5: calibrated on held-out
  pilot seeds, never a batch quantile).

    python -m bench detectors --seeds 0 1 2 --iterations 5
    python -m bench detectors --seeds 0 --iterations 2 --set data.testbed.fork=consequential --tag fork
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import duckdb
from rich.console import Console
from rich.table import Table

from bench.common import save

console = Console(width=160)

SETTINGS: dict[str, list[str]] = {
    "swap, delta 0": ["analysis.detector=swap", "analysis.delta_mode=absolute", "analysis.delta=0.0"],
    "probe xent, median": ["analysis.detector=probe", "analysis.distance=xent", "analysis.delta_mode=quantile",
                           "analysis.delta=0.5"],
    "probe xent, delta 1.5": ["analysis.detector=probe", "analysis.distance=xent", "analysis.delta_mode=absolute",
                              "analysis.delta=1.5"],
    "probe ot, median": ["analysis.detector=probe", "analysis.distance=ot", "analysis.delta_mode=quantile",
                         "analysis.delta=0.5"],
    "window, median": ["analysis.detector=window", "analysis.delta_mode=quantile", "analysis.delta=0.5"],
    "probe realised ot-input, median": ["analysis.detector=probe", "analysis.probe_student=realised",
                                        "analysis.distance=ot", "analysis.ot_embedding=input",
                                        "analysis.delta_mode=quantile", "analysis.delta=0.5"],
    "oracle": ["analysis.detector=oracle"],
}

QUERY = """
WITH t AS (SELECT near_future_div AS d, list_contains($surface_roles, role) AS form, role, regime
           FROM read_parquet($files) WHERE regime IN ('surface', 'divergent')),
     f AS (SELECT d FROM t WHERE form), o AS (SELECT d FROM t WHERE NOT form),
     k AS (SELECT d FROM t WHERE role = 'fork')
SELECT (SELECT count(*) FROM t) AS probed,
       (SELECT avg(form::INT) FROM t) AS form_share,
       (SELECT avg(CASE WHEN o.d > f.d THEN 1.0 WHEN o.d = f.d THEN 0.5 ELSE 0.0 END) FROM o, f) AS auc,
       (SELECT count(*) FILTER (regime = 'surface' AND form) / count(*) FILTER (regime = 'surface') FROM t) AS p,
       (SELECT count(*) FILTER (regime = 'surface' AND form) / count(*) FILTER (form) FROM t) AS r,
       (SELECT count(*) FROM k) AS forks,
       (SELECT avg(CASE WHEN k.d > f.d THEN 1.0 WHEN k.d = f.d THEN 0.5 ELSE 0.0 END) FROM k, f) AS fork_auc,
       (SELECT count(*) FILTER (regime = 'divergent' AND role = 'fork') / nullif(count(*) FILTER (role = 'fork'), 0)
        FROM t) AS fork_recall
"""


def calibrate(d: list[float], divergent: list[bool]) -> tuple[float | None, float | None]:
    """(delta, J): the threshold on D_t (divergent iff D_t >= delta) with the largest Youden J against the truth."""
    import numpy as np

    x, y = np.asarray(d, dtype=np.float64), np.asarray(divergent, dtype=bool)
    if y.all() or not y.any():
        return None, None
    best = (None, -1.0)
    for cut in np.unique(x):
        call = x >= cut
        j = call[y].mean() + (~call[~y]).mean() - 1.0
        if j > best[1]:
            best = (float(cut), float(j))
    return best


def measure(root: Path) -> dict:
    from opd_tasks.topd.signals import TRUE_REGIME

    files = sorted(str(p) for p in root.glob("artifacts/analyze/*/tokens/*.parquet"))
    surface = [role for role, regime in TRUE_REGIME.items() if regime == "surface"]  # form, filler
    con = duckdb.connect()
    row = con.execute(QUERY, {"files": files, "surface_roles": surface}).fetchone()
    truth = con.execute("SELECT near_future_div, role FROM read_parquet($files) WHERE regime IN ('surface', "
                        "'divergent') AND role IS NOT NULL", {"files": files}).fetchall()
    known = [(d, TRUE_REGIME[r] == "divergent") for d, r in truth if r in TRUE_REGIME]
    delta, j = calibrate([d for d, _ in known], [y for _, y in known])
    return dict(zip(["probed", "form_share", "auc", "surface_precision", "surface_recall", "forks", "fork_auc",
                     "fork_recall"], row, strict=True)) | {"calibrated_delta": delta, "youden_j": j}


def main(argv: list[str] | None = None) -> dict:
    from opd_tasks.config_files import load_config
    from opd_tasks.pipeline import run_plain

    ap = argparse.ArgumentParser(prog="python -m bench detectors", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for all (repeatable)")
    ap.add_argument("--tag", default=None, help="results go to bench/results/detectors[-TAG].json")
    args = ap.parse_args(argv)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.settings:
            root = Path(tmp) / name.replace(" ", "_").replace(",", "")
            finals = []
            t0 = time.perf_counter()
            for seed in args.seeds:
                cfg = load_config(None, ["method=topd", f"seed={seed}", f"iterations={args.iterations}",
                                         f"root={root}", f"name=s{seed}", *SETTINGS[name], *args.sets])
                res = run_plain(cfg, log=lambda m: None, progress=False)
                finals.append(res.iterations[-1].accuracy)
            out[name] = measure(root) | {"final_accuracy": finals, "seconds": time.perf_counter() - t0,
                                         "overrides": SETTINGS[name]}
            console.print(f"{name}: {out[name]}")
    t = Table("detector", "probed", "form share (base rate)", "AUC", "surface P / R", "forks", "fork AUC",
              "fork recall", "calibrated delta (J)", "final accuracy",
              title="near-future detectors vs ground truth (topd runs)")

    def num(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    for name, m in out.items():
        t.add_row(name, str(m["probed"]), num(m["form_share"]), num(m["auc"]),
                  f"{num(m['surface_precision'])} / {num(m['surface_recall'])}", str(m["forks"]), num(m["fork_auc"]),
                  num(m["fork_recall"]), f"{num(m['calibrated_delta'])} ({num(m['youden_j'])})",
                  f"{sum(m['final_accuracy']) / len(m['final_accuracy']):.1%}")
    console.print(t)
    path = save("detectors" + (f"-{args.tag}" if args.tag else ""), {"args": vars(args), "detectors": out})
    console.print(f"results: {path}")
    return out


if __name__ == "__main__":
    main()
