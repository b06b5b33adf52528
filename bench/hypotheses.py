"""The pre-registered hypotheses of issue 17 (docs/results.md, "Pre-registration"), evaluated from the experiment's
report JSON files (each `report.json` of `opd experiment`, copied to bench/results/).

Every figure is recomputed from the per-seed values in those files (opd_tasks/stats.py), so each number in
docs/results.md can be checked:

    python -m bench hypotheses --h1 bench/results/experiment-17-h1.json --h2 bench/results/experiment-17-h2.json \\
        --abl bench/results/experiment-17-abl.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import save

console = Console(width=160)


def _pairs(summary: dict, arm: str, base: str, metric: str) -> tuple[list[float], list[float], list[int]]:
    a, b = summary["methods"][base][f"{metric}_by_seed"], summary["methods"][arm][f"{metric}_by_seed"]
    seeds = sorted(set(a) & set(b), key=int)
    return [a[s] for s in seeds], [b[s] for s in seeds], [int(s) for s in seeds]


def _comparison(summary: dict, arm: str, base: str = "opd") -> dict:
    """arm - base on the final accuracy (points): mean, per-seed differences, paired t (two-sided p, 95% and 90%
    CIs), Wilcoxon p, and the report's seed-then-problem bootstrap CI; the same for the final early-stop rate."""
    from opd_tasks.stats import paired_t, t_quantile, wilcoxon

    out: dict = {"arm": arm, "base": base}
    for metric in ("final", "early_stop", "area"):
        a, b, seeds = _pairs(summary, arm, base, metric)
        if len(seeds) < 2:
            continue
        t = paired_t(a, b)
        half90 = t_quantile(0.95, t.n - 1) * t.sd / t.n**0.5
        entry = {"seeds": seeds, "diffs": [100 * (y - x) for x, y in zip(a, b, strict=True)], "mean": 100 * t.mean,
                 "sd": 100 * t.sd, "t_p_two_sided": t.p, "ci95": [100 * c for c in t.ci95],
                 "ci90": [100 * (t.mean - half90), 100 * (t.mean + half90)], "wilcoxon_p": wilcoxon(a, b).p}
        c = next((c for c in summary["comparisons"] if {c["a"], c["b"]} == {arm, base}), None)
        if metric == "final" and c and c["final"].get("bootstrap_ci95"):
            sign = 1 if c["b"] == arm else -1
            entry["bootstrap_ci95"] = sorted(100 * sign * x for x in c["final"]["bootstrap_ci95"])
        out[metric] = entry
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.hypotheses", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--h1", required=True, help="report.json of the consequential main arms")
    ap.add_argument("--h2", required=True, help="report.json of the harmless arms")
    ap.add_argument("--abl", required=True, help="report.json of the ablations and baselines")
    args = ap.parse_args(argv)
    h1, h2, abl = (json.loads(Path(p).read_text())["summary"] for p in (args.h1, args.h2, args.abl))
    res: dict = {}
    oracle = _comparison(h1, "topd-oracle")
    f = oracle["final"]
    one_sided = f["t_p_two_sided"] / 2 if f["mean"] > 0 else 1 - f["t_p_two_sided"] / 2
    res["H1"] = oracle | {"one_sided_p": one_sided, "holds": one_sided < 0.05}
    eq = _comparison(h2, "topd-oracle")
    res["H2"] = eq | {"holds": -2 < eq["final"]["ci90"][0] and eq["final"]["ci90"][1] < 2}
    res["H3"] = {}
    for arm in ("topd-probe", "topd-swap"):
        c = _comparison(h1, arm)
        ratio = c["final"]["mean"] / f["mean"] if f["mean"] else None
        res["H3"][arm] = c | {"recovered_share": ratio, "assessed": res["H1"]["holds"],
                              "holds": bool(res["H1"]["holds"] and ratio is not None and ratio >= 0.5)}
    stop = oracle.get("early_stop")
    res["H4"] = {"early_stop": stop, "holds": bool(stop and stop["ci95"][1] < 0)}
    res["ablations_vs_opd"] = {a: _comparison(abl, a) for a in abl["methods"] if a != "opd"}
    res["ablations_vs_oracle"] = {a: _comparison(abl, a, "topd-oracle") for a in abl["methods"]
                                  if a not in ("opd", "topd-oracle")}
    t = Table("hypothesis / comparison", "seeds", "mean diff (points)", "95% CI (t)", "bootstrap 95% CI",
              "p (t)", "Wilcoxon p", "holds", title="issue 17: pre-registered hypotheses (final sampled accuracy)")

    def row(name: str, e: dict, holds, p=None) -> None:
        t.add_row(name, str(len(e["seeds"])), f"{e['mean']:+.2f}", "[{:+.2f}, {:+.2f}]".format(*e["ci95"]),
                  "[{:+.2f}, {:+.2f}]".format(*e["bootstrap_ci95"]) if "bootstrap_ci95" in e else "-",
                  f"{e['t_p_two_sided'] if p is None else p:.3g}", f"{e['wilcoxon_p']:.3g}", str(holds))

    row("H1 topd-oracle - opd (consequential; one-sided p)", res["H1"]["final"], res["H1"]["holds"], one_sided)
    row("H2 topd-oracle - opd (harmless; 90% CI " + "[{:+.2f}, {:+.2f}])".format(*res["H2"]["final"]["ci90"]),
        res["H2"]["final"], res["H2"]["holds"])
    for arm, c in res["H3"].items():
        row(f"H3 {arm} - opd (share of H1's gain {c['recovered_share']:.2f})" if c["recovered_share"] is not None
            else f"H3 {arm} - opd", c["final"], c["holds"])
    if stop:
        row("H4 early-stop rate, topd-oracle - opd", stop, res["H4"]["holds"])
    for arm, c in res["ablations_vs_opd"].items():
        if "final" in c:
            row(f"{arm} - opd (ablation/baseline)", c["final"], "-")
    for arm, c in res["ablations_vs_oracle"].items():
        if "final" in c:
            row(f"{arm} - topd-oracle", c["final"], "-")
    console.print(t)
    console.print(f"results: {save('experiment-17-hypotheses', {'args': vars(args), 'hypotheses': res})}")
    return res


if __name__ == "__main__":
    main()
