"""The report's numbers per method and the paired comparisons between them (opd_tasks/stats.py), and the verdict."""

from __future__ import annotations

import statistics
from typing import Any

from opd_tasks.report.queries import RunInfo, ordered_methods


def summarize(runs: list[RunInfo], data: dict[str, list[dict]], primary: str | None = None) -> dict[str, Any]:
    """Per method (arm): baseline and final accuracy over seeds, the learning-curve area, surface share, seconds per
    iteration; the paired comparison of every pair; the verdict (`primary`, default `topd`, against `opd`)."""
    out: dict[str, Any] = {"methods": {}}
    evaluated: dict[str, set[int]] = {}  # the steps each run evaluated
    curves: dict[str, dict[int, float]] = {}  # accuracy per step (none for prompt-only data: no references)
    rkl: dict[str, dict[int, float]] = {}  # reverse KL to the teacher per step, where the evaluation measured it
    for a in data["accuracy"]:
        evaluated.setdefault(a["run"], set()).add(a["step"])
        if a["accuracy"] is not None:
            curves.setdefault(a["run"], {})[a["step"]] = a["accuracy"]
        if a.get("rkl_per_token") is not None:
            rkl.setdefault(a["run"], {})[a["step"]] = a["rkl_per_token"]
    # Every run is compared at the same step: the last one that all runs reached.
    reached = [max(v) for v in evaluated.values() if len(v) > 1]
    final_step = min(reached) if reached else None
    out["final_step"] = final_step
    if reached and max(reached) != final_step:
        out["note"] = (f"runs differ in length (last steps {sorted(set(reached))}); final accuracies are compared "
                       f"at step {final_step}, the last one every run reached")
    for m in ordered_methods(r.method for r in runs):
        per_run = {r.run: curves[r.run] for r in runs if r.method == m and r.run in curves}
        finals = [v[final_step] for v in per_run.values() if final_step is not None and final_step in v]
        base = [v[0] for v in per_run.values() if 0 in v]
        steps = sorted({max(evaluated[r.run]) for r in runs if r.method == m and r.run in evaluated})
        reg = [r for r in data["regimes"] if r["method"] == m]
        high = sum(r["tokens"] for r in reg)
        surface = sum(r["tokens"] for r in reg if r["regime"] == "surface")
        classified = sum(r["tokens"] for r in reg if r["regime"] in ("surface", "divergent"))
        cost = {c["stage"]: c["seconds"] for c in data["costs"] if c["method"] == m}
        mine = [r for r in runs if r.method == m and r.run in evaluated]
        stops = {(e["run"], e["step"]): e["rate"] for e in data.get("early_stops", [])}
        kept = [k["kept"] for k in data.get("kept", []) if k["method"] == m]
        area = {str(r.seed): _area(per_run.get(r.run, {}), final_step) for r in mine}
        area = {k: v for k, v in area.items() if v is not None}
        rkl_base = [rkl[r.run][0] for r in mine if 0 in rkl.get(r.run, {})]
        rkl_final = [rkl[r.run][final_step] for r in mine if final_step in rkl.get(r.run, {})]
        out["methods"][m] = {
            "runs": len(mine),
            "seeds": sorted({r.seed for r in runs if r.method == m}),
            "iterations": steps,
            "baseline_mean": statistics.mean(base) if base else None,
            "final_mean": statistics.mean(finals) if finals else None,
            "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0 if finals else None,
            "final_min": min(finals) if finals else None,
            "final_max": max(finals) if finals else None,
            "final_by_seed": {str(r.seed): per_run[r.run][final_step] for r in mine
                              if final_step in per_run.get(r.run, {})},
            "area_mean": statistics.mean(area.values()) if area else None,
            "rkl_baseline_mean": statistics.mean(rkl_base) if rkl_base else None,
            "rkl_final_mean": statistics.mean(rkl_final) if rkl_final else None,
            "area_by_seed": area,
            "surface_share": surface / high if high else None,
            "surface_share_classified": surface / classified if classified else None,
            "seconds_per_iteration": sum(cost.values()) if cost else None,
            "stage_seconds": cost,
            "kept_tokens_per_iteration": statistics.mean(kept) if kept else None,
            "seconds_per_kept_token": (sum(cost.values()) / statistics.mean(kept)) if cost and kept else None,
            "early_stop_by_seed": {str(r.seed): stops[(r.run, final_step)] for r in mine
                                   if (r.run, final_step) in stops},
        }
    methods = list(out["methods"])
    problems = _problem_scores(data.get("problems", []), runs, final_step)
    out["comparisons"] = [compare(a, b, out["methods"][a], out["methods"][b], problems)
                          for i, a in enumerate(methods) for b in methods[i + 1 :]]
    primary = primary or "topd"
    out["verdict"] = verdict(next((c for c in out["comparisons"] if {c["a"], c["b"]} == {"opd", primary}), None),
                             primary)
    return out


def _area(curve: dict[int, float], final_step: int | None) -> float | None:
    """The learning-curve area: the mean accuracy after iterations 1..final_step (None without them all)."""
    if not final_step or any(s not in curve for s in range(1, final_step + 1)):
        return None
    return statistics.mean(curve[s] for s in range(1, final_step + 1))


def _problem_scores(rows: list[dict], runs: list[RunInfo], step: int | None) -> dict[tuple[str, int], dict]:
    """(method, seed) -> {prompt_id: score} at `step` (the final step compared)."""
    by_run = {r.run: r for r in runs}
    out: dict[tuple[str, int], dict] = {}
    for row in rows:
        r = by_run.get(row["run"])
        if r is not None and row["step"] == step:
            out.setdefault((r.method, r.seed), {})[row["prompt_id"]] = row["correct"]
    return out


def compare(a: str, b: str, ma: dict, mb: dict, problems: dict[tuple[str, int], dict]) -> dict[str, Any]:
    """Method b against method a on the seeds both ran: per-seed paired differences of the final accuracy, of the
    learning-curve area and (on the testbed) of the final early-stop rate, each with a paired t-test and a Wilcoxon
    signed-rank test; for the final accuracy also a seed-then-problem bootstrap 95% CI (both methods at the same
    problems). Differences are b - a."""
    from opd_tasks.stats import bootstrap_ci, paired_t, wilcoxon

    out: dict[str, Any] = {"a": a, "b": b}
    for metric in ("final", "area", "early_stop"):
        xa, xb = ma[f"{metric}_by_seed"], mb[f"{metric}_by_seed"]
        seeds = sorted(set(xa) & set(xb), key=int)
        entry: dict[str, Any] = {"seeds": [int(s) for s in seeds],
                                 "diff_by_seed": {s: xb[s] - xa[s] for s in seeds}}
        if len(seeds) >= 2:
            t = paired_t([xa[s] for s in seeds], [xb[s] for s in seeds])
            entry |= {"mean_diff": t.mean, "sd_diff": t.sd, "t_ci95": list(t.ci95), "t_p": t.p,
                      "wilcoxon_p": wilcoxon([xa[s] for s in seeds], [xb[s] for s in seeds]).p}
        elif seeds:
            entry["mean_diff"] = xb[seeds[0]] - xa[seeds[0]]
        if metric == "final" and len(seeds) >= 2:
            pa, pb = [problems.get((a, int(s)), {}) for s in seeds], [problems.get((b, int(s)), {}) for s in seeds]
            if all(x and set(x) == set(y) for x, y in zip(pa, pb, strict=True)):
                keys = [sorted(x) for x in pa]
                entry["bootstrap_ci95"] = list(bootstrap_ci(
                    [[x[k] for k in ks] for x, ks in zip(pa, keys, strict=True)],
                    [[y[k] for k in ks] for y, ks in zip(pb, keys, strict=True)]))
            else:
                entry["bootstrap_note"] = "the methods were not evaluated on the same problems: no bootstrap"
        out[metric] = entry
    return out


def verdict(comparison: dict | None, primary: str = "topd") -> dict[str, Any] | None:
    """`primary` (TOPD by default) vs OPD from their paired comparison: a win only when the 95% CI of the paired
    difference of the final accuracy (the seed-then-problem bootstrap, else the t interval) lies above 0."""
    if comparison is None:
        return None
    final = comparison["final"]
    sign = 1.0 if comparison["b"] == primary else -1.0  # report primary - OPD
    if "mean_diff" not in final:
        return None
    diff = sign * final["mean_diff"]
    name = "TOPD" if primary == "topd" else primary
    key = {"topd_minus_opd": diff, "primary": primary}
    if len(final["seeds"]) < 2:
        return key | {"ci95": None, "topd_wins": False,
                      "text": f"{name} - OPD = {diff * 100:+.1f} points with a single seed: no verdict (run 2 or more "
                              "seeds)."}
    ci = final.get("bootstrap_ci95") or final["t_ci95"]
    lo, hi = sorted(sign * c for c in ci)
    how = "seed-then-problem bootstrap" if "bootstrap_ci95" in final else "paired t"
    stats_text = (f"95% CI [{lo * 100:+.1f}, {hi * 100:+.1f}] ({how}), paired t p = {final['t_p']:.3g}, Wilcoxon p = "
                  f"{final['wilcoxon_p']:.3g}, {len(final['seeds'])} seeds")
    if lo > 0:
        text = f"{name} beats OPD: final accuracy {diff * 100:+.1f} points, {stats_text}."
    elif hi < 0:
        text = f"{name} is worse than OPD: final accuracy {diff * 100:+.1f} points, {stats_text}."
    else:
        text = f"No difference resolved between {name} and OPD: final accuracy {diff * 100:+.1f} points, {stats_text}."
    return key | {"ci95": [lo, hi], "topd_wins": lo > 0, "text": text}
