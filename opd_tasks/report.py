"""`opd report`: a self-contained HTML (and markdown) report over one or more runs, with PNG plots.

Every figure comes from a SQL query in `opd_tasks/report_sql/` run by DuckDB over the storage views
(`storage.views.connect`), plus a `run_info(run, method, seed)` table read from each run's lineage. The report
shows:
- test accuracy per iteration per method: the mean over seeds, a band from the lowest to the highest seed, and
  each seed as a thin line;
- the share of high-loss tokens in each regime per iteration (methods that ran the analysis);
- the regime classifier's precision/recall against the testbed's ground-truth token roles;
- token examples: rollouts with high-loss tokens highlighted by regime, the probes' continuations at probed
  positions;
- stage costs (median computed seconds per stage);
- the libraries and devices that computed the artifacts (their manifests' provenance);
- a summary table (final accuracy mean and range over seeds, learning-curve area, surface share, seconds per
  iteration);
- paired comparisons of every pair of methods (opd_tasks/stats.py): per-seed paired differences of the final
  accuracy and of the learning-curve area, a paired t-test, a Wilcoxon signed-rank test and, for the final
  accuracy, a seed-then-problem bootstrap 95% CI; the verdict "does TOPD beat OPD" reads that CI.

Output: `<out>/report.html` (images embedded as data URIs, so the file can be mailed or attached),
`<out>/report.md` (links the PNG files next to it), `<out>/*.png`, `<out>/report.json` (the query results).
The directory is written to a temporary sibling and renamed into place; an existing directory is replaced
only when it holds a previous report (its `report.json`), never a directory of something else.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import json
import os
import secrets
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opd_tasks.errors import ConfigError, DataError, OpdError

SQL_DIR = Path(__file__).with_name("report_sql")
QUERIES = ("accuracy", "problems", "regimes", "classifier", "forks", "costs", "kept", "examples")
METHOD_ORDER = ("opd", "opd_suppress", "topd")
METHOD_COLORS = {"opd": "#1f77b4", "opd_suppress": "#ff7f0e", "topd": "#2ca02c"}
#: Colours for the other arms (an experiment's labels), in order: distinct from each other and from the above.
EXTRA_COLORS = ("#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#000000")


def _colors(methods: list[str]) -> dict[str, str]:
    """One colour per method or arm: the known methods keep theirs, the others take the next free one."""
    free = iter(EXTRA_COLORS * (1 + len(methods) // len(EXTRA_COLORS)))
    return {m: METHOD_COLORS.get(m) or next(free) for m in methods}
REGIME_COLORS = {"surface": "#8ecae6", "divergent": "#e76f51", "unprobed": "#e9c46a"}
STAGE_ORDER = ("prompts", "rollout", "score", "gates", "analyze", "update", "evaluate")
REPORT_MARKER = "report.json"


def sql(name: str) -> str:
    """The text of report query `name` (a file in opd_tasks/report_sql/)."""
    if name not in QUERIES:
        raise ConfigError(f"unknown report query {name!r}; queries are {', '.join(QUERIES)}")
    return (SQL_DIR / f"{name}.sql").read_text()


@dataclass(frozen=True)
class RunInfo:
    run: str
    method: str  # what the report groups by: the run's arm label (an experiment's), else its method
    seed: int
    config: dict = field(default_factory=dict, compare=False, repr=False)


def select_runs(root: str | Path, patterns: list[str]) -> list[RunInfo]:
    """The runs named by `patterns` (exact names or shell patterns such as `exp-*`), with method and seed from
    their lineage. A pattern that matches no run is an error that lists the runs there are."""
    from storage.lineage import list_runs

    if not patterns:
        raise ConfigError("opd report: name at least one run (or a pattern such as 'exp-*')")
    runs = {r.run: r for r in list_runs(root)}
    chosen: list[str] = []
    for p in patterns:
        hits = sorted(n for n in runs if fnmatch.fnmatchcase(n, p))
        if not hits:
            known = ", ".join(sorted(runs)) or "none"
            raise ConfigError(f"opd report: no run matches {p!r} under {Path(root).resolve()} (runs: {known})")
        chosen += [h for h in hits if h not in chosen]
    out = []
    for name in chosen:
        info = runs[name].info()
        cfg = info.get("config") or {}
        method = info.get("arm") or info.get("method") or cfg.get("method")  # an experiment's arm label
        if method is None or "seed" not in cfg:
            raise DataError(f"run {name!r}: its run.json records no method/config (was it made by `opd run`?)")
        out.append(RunInfo(name, str(method), int(cfg["seed"]), cfg))
    return out


def _methods(names) -> list[str]:
    names = set(names)
    return [m for m in METHOD_ORDER if m in names] + sorted(names - set(METHOD_ORDER))


def _rows(con, name: str, params: dict | None = None) -> list[dict]:
    rel = con.execute(sql(name), params or {})
    cols = [d[0] for d in rel.description]
    return [dict(zip(cols, r, strict=True)) for r in rel.fetchall()]


def collect(root: str | Path, runs: list[RunInfo]) -> dict[str, list[dict]]:
    """Run the report's queries over `runs`; returns {query name: rows}."""
    import pyarrow as pa

    from storage.views import connect

    con = connect(root, runs=[r.run for r in runs])
    con.register("_run_info", pa.table({"run": [r.run for r in runs], "method": [r.method for r in runs],
                                        "seed": pa.array([r.seed for r in runs], pa.int64())}))
    con.execute("CREATE TABLE run_info AS SELECT * FROM _run_info")
    from opd_tasks.topd.signals import TRUE_REGIME

    con.register("_role_regime", pa.table({"role": list(TRUE_REGIME), "regime": list(TRUE_REGIME.values())}))
    con.execute("CREATE TABLE role_regime AS SELECT * FROM _role_regime")
    data = {q: _rows(con, q) for q in ("accuracy", "problems", "regimes", "classifier", "forks", "costs", "kept")}
    data["early_stops"] = _early_stops(root, runs)
    data["environments"] = _environments(root, runs)
    data["_con"] = con  # examples need the connection (and a tokenizer); see examples()
    return data


def _environments(root: str | Path, runs: list[RunInfo]) -> list[dict]:
    """What computed the runs' artifacts (their manifests' provenance): one row per distinct environment."""
    from opd_tasks.provenance import environments
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    store = ArtifactStore(root)
    refs = {e.ref.sha256: e.ref for r in runs for e in RunLineage(store.layout, r.run).entries()}
    return [{"computed_with": line, "artifacts": n}
            for line, n in environments(store.manifest(ref) for ref in refs.values())]


def _early_stops(root: str | Path, runs: list[RunInfo]) -> list[dict]:
    """Per run and step: the evaluation's early-stop rate (the testbed's premature stops; its manifest's
    `early_stop_rate`, opd_tasks/stages/evaluate.py), where the evaluation recorded one."""
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    store, out = ArtifactStore(root), []
    for r in runs:
        for e in RunLineage(store.layout, r.run).entries():
            if e.stage in ("baseline", "evaluate"):
                rate = store.manifest(e.ref)["meta"].get("early_stop_rate")
                if rate is not None:
                    out.append({"run": r.run, "method": r.method, "seed": r.seed, "rate": rate,
                                "step": 0 if e.stage == "baseline" else e.iteration + 1})
    return sorted(out, key=lambda x: (x["method"], x["seed"], x["step"]))


def summarize(runs: list[RunInfo], data: dict[str, list[dict]], primary: str | None = None) -> dict[str, Any]:
    """Per method (arm): baseline and final accuracy over seeds, the learning-curve area, surface share, seconds per
    iteration; the paired comparison of every pair; the verdict (`primary`, default `topd`, against `opd`)."""
    out: dict[str, Any] = {"methods": {}}
    curves: dict[str, dict[int, float]] = {}
    for a in data["accuracy"]:
        curves.setdefault(a["run"], {})[a["step"]] = a["accuracy"]
    # Every run is compared at the same step: the last one that all runs reached.
    reached = [max(v) for v in curves.values() if len(v) > 1]
    final_step = min(reached) if reached else None
    out["final_step"] = final_step
    if reached and max(reached) != final_step:
        out["note"] = (f"runs differ in length (last steps {sorted(set(reached))}); final accuracies are compared "
                       f"at step {final_step}, the last one every run reached")
    for m in _methods(r.method for r in runs):
        per_run = {r.run: curves[r.run] for r in runs if r.method == m and r.run in curves}
        finals = [v[final_step] for v in per_run.values() if final_step is not None and final_step in v]
        base = [v[0] for v in per_run.values() if 0 in v]
        steps = sorted({max(v) for v in per_run.values()})
        reg = [r for r in data["regimes"] if r["method"] == m]
        high = sum(r["tokens"] for r in reg)
        surface = sum(r["tokens"] for r in reg if r["regime"] == "surface")
        classified = sum(r["tokens"] for r in reg if r["regime"] in ("surface", "divergent"))
        cost = {c["stage"]: c["seconds"] for c in data["costs"] if c["method"] == m}
        mine = [r for r in runs if r.method == m and r.run in per_run]
        stops = {(e["run"], e["step"]): e["rate"] for e in data.get("early_stops", [])}
        kept = [k["kept"] for k in data.get("kept", []) if k["method"] == m]
        area = {str(r.seed): _area(per_run[r.run], final_step) for r in mine}
        area = {k: v for k, v in area.items() if v is not None}
        out["methods"][m] = {
            "runs": len(per_run),
            "seeds": sorted({r.seed for r in runs if r.method == m}),
            "iterations": steps,
            "baseline_mean": statistics.mean(base) if base else None,
            "final_mean": statistics.mean(finals) if finals else None,
            "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0 if finals else None,
            "final_min": min(finals) if finals else None,
            "final_max": max(finals) if finals else None,
            "final_by_seed": {str(r.seed): per_run[r.run][final_step] for r in mine if final_step in per_run[r.run]},
            "area_mean": statistics.mean(area.values()) if area else None,
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


# ----------------------------------------------------------------------------------------------- examples


def examples(data: dict, runs: list[RunInfo], k: int = 3) -> dict[str, Any] | None:
    """Token examples from the first run that ran the analysis (TOPD preferred), at its first iteration."""
    con = data["_con"]
    analysed = {r[0] for r in con.execute("SELECT DISTINCT run FROM tokens").fetchall()}
    cands = [r for r in runs if r.run in analysed]
    if not cands or k <= 0:
        return None
    cands.sort(key=lambda r: (r.method != "topd", r.seed, r.run))
    pick = cands[0]
    iteration = con.execute("SELECT min(iteration) FROM tokens WHERE run = ?", [pick.run]).fetchone()[0]
    rows = _rows(con, "examples", {"run": pick.run, "iteration": iteration, "k": k})
    from opd_tasks.config import ModelRef
    from opd_tasks.models import load_tokenizer

    try:
        tok = load_tokenizer(ModelRef.model_validate(pick.config["models"]["student"]))
    except (OpdError, OSError, ValueError):  # the model moved or is gone: show token ids instead of text
        tok = None

    def text(ids) -> str:
        if ids is None:
            return ""
        return tok.decode(list(ids), skip_special_tokens=False) if tok is not None else " ".join(
            f"[{i}]" for i in ids)

    seqs: list[dict] = []
    for r in rows:
        if not seqs or (seqs[-1]["prompt_id"], seqs[-1]["sample_id"]) != (r["prompt_id"], r["sample_id"]):
            seqs.append({"prompt_id": r["prompt_id"], "sample_id": r["sample_id"], "prompt": r["prompt"] or "",
                         "tokens": []})
        seqs[-1]["tokens"].append({
            "text": text([r["token_id"]]), "pos": r["pos"], "regime": r["regime"], "role": r["role"],
            "k1": r["k1"], "d": r["near_future_div"], "weight": r["weight"],
            "teacher": text(r["teacher_continuation"]) if r["teacher_continuation"] is not None else None,
            "student": text(r["student_continuation"]) if r["student_continuation"] is not None else None,
            "distance": r["distance"],
        })
    return {"run": pick.run, "method": pick.method, "iteration": iteration, "sequences": seqs}


# ------------------------------------------------------------------------------------------------- plots


def _plots(data: dict, summary: dict, out: Path) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs: list[dict] = []
    methods = list(summary["methods"])
    colors = _colors(methods)

    # accuracy per iteration: mean line, min-max band, each seed thin
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for m in methods:
        rows = [a for a in data["accuracy"] if a["method"] == m]
        steps = sorted({a["step"] for a in rows})
        by_step = {s: [a["accuracy"] for a in rows if a["step"] == s] for s in steps}
        c = colors[m]
        for run in sorted({a["run"] for a in rows}):
            pts = sorted((a["step"], a["accuracy"]) for a in rows if a["run"] == run)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], color=c, alpha=0.25, lw=0.8)
        ax.fill_between(steps, [100 * min(by_step[s]) for s in steps], [100 * max(by_step[s]) for s in steps],
                        color=c, alpha=0.15, lw=0)
        ax.plot(steps, [100 * statistics.mean(by_step[s]) for s in steps], color=c, lw=2, marker="o", ms=3,
                label=f"{m} (n={summary['methods'][m]['runs']})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration (0 = baseline student)")
    ax.set_ylabel("accuracy per sample (%)")
    ax.set_title("Test accuracy (per sample): mean over seeds, band = min-max")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    figs.append(_save(fig, out, "accuracy.png", "Test accuracy (per sample) per iteration per method (mean line, "
                                                 "min-max band over seeds, thin lines = single seeds)."))

    reg_methods = [m for m in methods if any(r["method"] == m for r in data["regimes"])]
    if reg_methods:
        fig, axes = plt.subplots(1, len(reg_methods), figsize=(3.6 * len(reg_methods) + 0.6, 3.6), dpi=110,
                                 squeeze=False, sharey=True)
        for ax, m in zip(axes[0], reg_methods, strict=True):
            rows = [r for r in data["regimes"] if r["method"] == m]
            its = sorted({r["iteration"] for r in rows})
            bottom = [0.0] * len(its)
            for regime in ("surface", "divergent", "unprobed"):
                vals = [100 * next((r["share"] for r in rows if r["iteration"] == i and r["regime"] == regime), 0.0)
                        for i in its]
                ax.bar(its, vals, bottom=bottom, color=REGIME_COLORS[regime], label=regime)
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
            ax.set_title(m)
            ax.set_xlabel("iteration")
            ax.set_xticks(its)
        axes[0][0].set_ylabel("share of high-loss tokens (%)")
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
        fig.suptitle("High-loss tokens by regime (pooled over seeds)")
        fig.tight_layout()
        figs.append(_save(fig, out, "regimes.png", "Share of high-loss tokens in each regime per iteration."))

    cls = [c for c in data["classifier"] if c["method"] in reg_methods]
    if cls:
        fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
        for m in reg_methods:
            rows = sorted((c for c in cls if c["method"] == m), key=lambda c: c["iteration"])
            its = [c["iteration"] for c in rows]
            col = colors[m]
            for key, style in (("surface_precision", "-"), ("surface_recall", "--")):
                ax.plot(its, [c[key] if c[key] is not None else float("nan") for c in rows], style, color=col,
                        marker="o", ms=3, label=f"{m}: {key.replace('_', ' ')}")
        ax.axhline(0.8, color="grey", lw=0.8, ls=":")
        ax.axhline(0.6, color="grey", lw=0.8, ls=":")
        ax.set_ylim(0, 1.02)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("iteration (the analysis of rollouts from the student before update i)")
        ax.set_title("Surface classifier vs ground-truth form tokens (targets: P 0.8, R 0.6)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower left")
        figs.append(_save(fig, out, "classifier.png", "Precision and recall of the `surface` regime against the "
                                                       "testbed's `form` tokens."))

    if data["costs"]:
        fig, ax = plt.subplots(figsize=(7, 1.2 + 0.5 * len(methods)), dpi=110)
        stages = [s for s in STAGE_ORDER if any(c["stage"] == s for c in data["costs"])]
        stages += sorted({c["stage"] for c in data["costs"]} - set(stages))
        cmap = plt.get_cmap("tab10")
        left = [0.0] * len(methods)
        for j, s in enumerate(stages):
            vals = [next((c["seconds"] for c in data["costs"] if c["method"] == m and c["stage"] == s), 0.0)
                    for m in methods]
            ax.barh(methods, vals, left=left, color=cmap(j % 10), label=s)
            left = [a + v for a, v in zip(left, vals, strict=True)]
        ax.set_xlabel("seconds per iteration (median of computed stage runs)")
        ax.invert_yaxis()
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_title("Stage costs")
        figs.append(_save(fig, out, "costs.png", "Median wall seconds per computed stage run, per method."))
    return figs


def _save(fig, out: Path, name: str, caption: str) -> dict:
    import matplotlib.pyplot as plt

    path = out / name
    fig.savefig(path, format="png", bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return {"file": name, "caption": caption}


# ----------------------------------------------------------------------------------------------- render


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def summary_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    head = ["method", "runs (seeds)", "baseline", "final accuracy (per sample), mean", "min-max",
            "learning-curve area", "surface share of high-loss tokens (of probed ones)", "s / iteration"]
    rows = []
    for m, s in summary["methods"].items():
        rows.append([m, f"{s['runs']} ({', '.join(map(str, s['seeds']))})", _pct(s["baseline_mean"]),
                     _pct(s["final_mean"]), f"{_pct(s['final_min'])}-{_pct(s['final_max'])}", _pct(s["area_mean"]),
                     f"{_pct(s['surface_share'])} ({_pct(s['surface_share_classified'])})" if s["surface_share"]
                     is not None else "-",
                     _num(s["seconds_per_iteration"], "{:.1f}")])
    return head, rows


PAIRED_NOTE = ("Per seed, the two methods share the eval set, the prompts and the sampling stream; the differences "
               "(in points) are per-seed paired, tested with a paired t-test and a Wilcoxon signed-rank test, and the "
               "final accuracy's 95% CI is also bootstrapped over seeds, then problems. The learning-curve area is "
               "the mean accuracy over the iterations; the early-stop rate is the share of evaluated answers that "
               "stop before the last step (the testbed's consequential fork; lower is better).")


def comparison_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """One row per method pair and metric: the paired difference (points) and its tests."""
    head = ["comparison", "metric", "seeds", "mean difference", "95% CI (t)", "95% CI (bootstrap)", "paired t p",
            "Wilcoxon p"]
    rows = []
    names = {"final": "final accuracy", "area": "learning-curve area", "early_stop": "final early-stop rate"}
    for c in summary.get("comparisons", []):
        for metric, label in names.items():
            e = c[metric]
            if not e["seeds"]:
                continue
            ci = e.get("t_ci95")
            boot = e.get("bootstrap_ci95")
            rows.append([f"{c['b']} - {c['a']}", label,
                         str(len(e["seeds"])), _num(e.get("mean_diff") and 100 * e["mean_diff"], "{:+.1f}"),
                         f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "-",
                         f"[{100 * boot[0]:+.1f}, {100 * boot[1]:+.1f}]" if boot else "-",
                         _num(e.get("t_p"), "{:.3g}"), _num(e.get("wilcoxon_p"), "{:.3g}")])
    return head, rows


def _detail_rows(data: dict, summary: dict) -> tuple[list[str], list[list[str]]]:
    """Per method: cost per iteration and per kept token, the early-stop rate per step (mean over seeds), and the
    detector against the premature stops."""
    head = ["method", "s / iteration", "kept tokens / iteration", "ms / kept token", "early-stop rate by step",
            "forks examined", "fork AUC", "fork recall"]
    forks = {f["method"]: f for f in data.get("forks", [])}
    rows = []
    for m, s in summary["methods"].items():
        by_step: dict[int, list[float]] = {}
        for e in data.get("early_stops", []):
            if e["method"] == m:
                by_step.setdefault(e["step"], []).append(e["rate"])
        curve = " ".join(f"{100 * statistics.mean(v):.1f}" for _, v in sorted(by_step.items())) or "-"
        f = forks.get(m, {})
        rows.append([m, _num(s["seconds_per_iteration"], "{:.1f}"), _num(s["kept_tokens_per_iteration"], "{:.0f}"),
                     _num(s["seconds_per_kept_token"] and 1000 * s["seconds_per_kept_token"], "{:.2f}"), curve,
                     str(f.get("forks", "-")), _num(f.get("fork_auc"), "{:.3f}"), _num(f.get("fork_recall"))])
    return head, rows


def _environment_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """The libraries and devices that computed the runs' artifacts (their manifests' provenance)."""
    return ["libraries and device", "artifacts"], [[e["computed_with"], str(e["artifacts"])]
                                                   for e in data.get("environments", [])]


def _classifier_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    head = ["method", "iteration", "classified", "surface P", "surface R", "divergent P", "divergent R"]
    rows = [[c["method"], str(c["iteration"]), str(c["classified"]), _num(c["surface_precision"]),
             _num(c["surface_recall"]), _num(c["divergent_precision"]), _num(c["divergent_recall"])]
            for c in data["classifier"]]
    return head, rows


def _html_table(head, rows) -> str:
    h = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(head, rows) -> str:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |"
                                                                                  for r in esc])


def _show(s: str) -> str:
    return s.replace("\n", "\\n")


def _examples_html(ex: dict | None) -> str:
    if ex is None:
        return "<p>No run in this report ran the analysis stage, so there are no token examples.</p>"
    parts = [f"<p>Run <code>{html.escape(ex['run'])}</code> ({html.escape(ex['method'])}), iteration "
             f"{ex['iteration']}: the rollouts with the most classified high-loss tokens. Hover a token for its "
             "k1, near-future divergence D, weight and ground-truth role. "
             + "".join(f'<span class="tok {r}">{r}</span> ' for r in REGIME_COLORS) + "</p>"]
    for s in ex["sequences"]:
        toks = []
        for t in s["tokens"]:
            title = (f"pos {t['pos']} | regime {t['regime']} | role {t['role']} | k1 {_num(t['k1'], '{:.3f}')} | "
                     f"D {_num(t['d'], '{:.3f}')} | weight {_num(t['weight'], '{:.2f}')}")
            span = (f'<span class="tok {html.escape(t["regime"])}" title="{html.escape(title)}">'
                    f"{html.escape(_show(t['text']))}</span>")
            if t["teacher"] is not None:
                span += f'<span class="probe">[{html.escape(_probe_text(t))}]</span>'
            toks.append(span)
        parts.append(f'<div class="ex"><div class="prompt">{html.escape(_show(s["prompt"]))}</div>'
                     f'<div class="completion">{"".join(toks)}</div></div>')
    return "\n".join(parts)


def _probe_text(t: dict) -> str:
    """A probed position's continuations and distance: both continuations (probe detector), or with the swap
    detector the teacher's bridge continuation where there is one."""
    parts = []
    if t["teacher"]:
        parts.append(f"teacher: {_show(t['teacher'])}")
    if t["student"]:
        parts.append(f"student: {_show(t['student'])}")
    return " | ".join([*parts, f"D {_num(t['distance'], '{:.2f}')}"])


def _examples_md(ex: dict | None) -> str:
    if ex is None:
        return "No run in this report ran the analysis stage, so there are no token examples."
    lines = [f"Run `{ex['run']}` ({ex['method']}), iteration {ex['iteration']}. Marks: `[s:tok]` surface, "
             "`[D:tok]` divergent, `[u:tok]` unprobed high-loss token; `{teacher: ... | student: ... | D ...}` at a "
             "probed position: the continuations (probe detector; with swap, the teacher's bridge at divergent "
             "positions only) and the near-future divergence.", ""]
    marks = {"surface": "s", "divergent": "D", "unprobed": "u"}
    for s in ex["sequences"]:
        out = []
        for t in s["tokens"]:
            txt = _show(t["text"])
            out.append(f"[{marks[t['regime']]}:{txt}]" if t["regime"] in marks else txt)
            if t["teacher"] is not None:
                out.append(f"{{{_probe_text(t)}}}")
        lines += ["```", _show(s["prompt"]) + " " + "".join(out), "```", ""]
    return "\n".join(lines)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;
color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}
.verdict{padding:.8em 1em;border-left:4px solid #888;background:#f7f7f7}
.ex{font-family:ui-monospace,Menlo,monospace;font-size:13px;margin:.8em 0;padding:.5em;border:1px solid #eee}
.prompt{color:#777}.completion{overflow-wrap:anywhere}.tok{white-space:pre-wrap}.tok.surface{background:#8ecae6}.tok.divergent{background:#e76f51;
color:#fff}.tok.unprobed{background:#e9c46a}.probe{font-size:11px;color:#264653;background:#eef;margin:0 3px;
white-space:pre-wrap}code{background:#f3f3f3;padding:0 3px}
"""


def render(title: str, runs: list[RunInfo], data: dict, summary: dict, figs: list[dict], ex: dict | None,
           out: Path, command: str | None) -> tuple[str, str]:
    """(html, markdown) of the report; the html embeds each PNG as a data URI."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sh, sr = summary_table(summary)
    ph, pr = comparison_table(summary)
    dh, dr = _detail_rows(data, summary)
    ch, cr = _classifier_rows(data)
    v = summary["verdict"]
    vtext = v["text"] if v else "No TOPD/OPD pair in these runs: no verdict."
    runs_line = ", ".join(f"{r.run} ({r.method}, seed {r.seed})" for r in runs)
    h = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
         f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
         f"<p>{stamp}. Runs: {html.escape(runs_line)}.</p>"]
    if command:
        h.append(f"<p>Made by <code>{html.escape(command)}</code></p>")
    h += [f'<p class="verdict">{html.escape(vtext)}</p>', "<h2>Summary</h2>", _html_table(sh, sr)]
    if summary.get("note"):
        h.append(f"<p><b>Note:</b> {html.escape(summary['note'])}.</p>")
    if pr:
        h += ["<h2>Paired comparisons</h2>", f"<p>{html.escape(PAIRED_NOTE)}</p>", _html_table(ph, pr)]
    h += ["<h2>Cost, early stops, forks</h2>", _html_table(dh, dr)]
    eh, er = _environment_rows(data)
    h += ["<h2>Computed with</h2>", _html_table(eh, er)]
    for f in figs:
        b64 = base64.b64encode((out / f["file"]).read_bytes()).decode()
        h.append(f'<figure><img alt="{html.escape(f["file"])}" src="data:image/png;base64,{b64}">'
                 f"<figcaption>{html.escape(f['caption'])}</figcaption></figure>")
    if cr:
        h += ["<h2>Regime classifier vs ground truth</h2>", _html_table(ch, cr)]
    h += ["<h2>Token examples</h2>", _examples_html(ex),
          "<h2>Queries</h2><p>Every figure comes from the SQL in <code>opd_tasks/report_sql/</code> "
          "(accuracy, problems, regimes, classifier, forks, costs, kept, examples) over the storage views, and the "
          "early-stop rates from the evaluations' manifests; rerun any query with "
          "<code>opd sql</code>. The data behind this page is in <code>report.json</code>.</p></body></html>"]
    md = [f"# {title}", "", f"{stamp}. Runs: {runs_line}.", ""]
    if command:
        md += [f"Made by `{command}`", ""]
    md += [f"**{vtext}**", "", "## Summary", "", _md_table(sh, sr), ""]
    if summary.get("note"):
        md += [f"Note: {summary['note']}.", ""]
    if pr:
        md += ["## Paired comparisons", "", PAIRED_NOTE, "", _md_table(ph, pr), ""]
    md += ["## Cost, early stops, forks", "", _md_table(dh, dr), ""]
    md += ["## Computed with", "", _md_table(eh, er), ""]
    md += [f"![{f['file']}]({f['file']})\n\n{f['caption']}\n" for f in figs]
    if cr:
        md += ["## Regime classifier vs ground truth", "", _md_table(ch, cr), ""]
    md += ["## Token examples", "", _examples_md(ex), "",
           "Figures come from the SQL in `opd_tasks/report_sql/` over the storage views.", ""]
    return "\n".join(h), "\n".join(md)


def check_out_dir(out: str | Path) -> Path:
    """`out` as a Path; ConfigError if it exists and is not a previous report (nothing else is overwritten)."""
    out = Path(out)
    if out.exists() and not (out / REPORT_MARKER).is_file():
        raise ConfigError(f"opd report: {out} exists and is not a report directory (no {REPORT_MARKER}); "
                          "refusing to overwrite it; pick another --out")
    return out


@dataclass
class Report:
    out: Path
    html: Path
    markdown: Path
    summary: dict
    markdown_text: str


def build_report(root: str | Path, patterns: list[str], out: str | Path | None = None, title: str | None = None,
                 n_examples: int = 3, command: str | None = None, log=print, primary: str | None = None) -> Report:
    """Query, plot and render the report for the runs matching `patterns` into `out` (default
    `<root>/reports/<first pattern>`); the verdict compares arm `primary` (default `topd`) with `opd`."""
    from storage.layout import check_name

    root = Path(root)
    runs = select_runs(root, patterns)
    title = title or f"OPD report: {', '.join(patterns)}"
    if out is None:
        slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in patterns[0]).strip("-.") or "report"
        out = root / "reports" / check_name("report", slug)
    out = check_out_dir(out)
    log(f"report: {len(runs)} runs -> {out}")
    data = collect(root, runs)
    if not data["accuracy"]:
        raise DataError(f"opd report: runs {[r.run for r in runs]} have no evaluations yet")
    summary = summarize(runs, data, primary)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        log("report: plots")
        figs = _plots(data, summary, tmp)
        log("report: token examples")
        ex = examples(data, runs, n_examples)
        page, md = render(title, runs, data, summary, figs, ex, tmp, command)
        (tmp / "report.html").write_text(page)
        (tmp / "report.md").write_text(md)
        # per-problem rows are left out: a large eval set over many runs would bloat the file (`opd sql` has them)
        public = {k: v for k, v in data.items() if not k.startswith("_") and k != "problems"}
        (tmp / REPORT_MARKER).write_text(json.dumps(
            {"title": title, "runs": [r.__dict__ | {"config": None} for r in runs], "summary": summary,
             "data": public, "examples": ex, "figures": figs}, indent=1, default=str))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)  # put the previous report back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Report(out, out / "report.html", out / "report.md", summary, md)
