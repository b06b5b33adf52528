"""`opd report`: a self-contained HTML (and markdown) report over one or more runs, with PNG plots.

Every figure comes from a SQL query in `opd_tasks/report_sql/` run by DuckDB over the storage views
(`storage.views.connect`), plus a `run_info(run, method, seed)` table read from each run's lineage. The report
shows:
- test accuracy per iteration per method (where the data has reference answers) and the reverse KL of the test
  answers to the teacher (where the evaluation measured it): the mean over seeds, a band from the lowest to the
  highest seed, and each seed as a thin line;
- the share of high-loss tokens in each regime per iteration (methods that ran the analysis);
- the regime classifier's precision/recall against the testbed's ground-truth token roles;
- token examples: rollouts with high-loss tokens highlighted by regime, the probes' continuations at probed
  positions;
- stage costs (median computed seconds per stage);
- the libraries and devices that computed the artifacts (their manifests' provenance);
- a summary table (final accuracy mean and range over seeds, reverse KL, learning-curve area, surface share,
  seconds per iteration);
- paired comparisons of every pair of methods (opd_tasks/stats.py): per-seed paired differences of the final
  accuracy and of the learning-curve area, a paired t-test, a Wilcoxon signed-rank test and, for the final
  accuracy, a seed-then-problem bootstrap 95% CI; the verdict "does TOPD beat OPD" reads that CI.

Output: `<out>/report.html` (images embedded as data URIs, so the file can be mailed or attached),
`<out>/report.md` (links the PNG files next to it), `<out>/*.png`, `<out>/report.json` (the query results).
The directory is written to a temporary sibling and renamed into place; an existing directory is replaced
only when it holds a previous report (its `report.json`), never a directory of something else.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from opd_tasks.errors import ConfigError, DataError
from opd_tasks.report.compare import summarize, verdict
from opd_tasks.report.figures import plots
from opd_tasks.report.queries import RunInfo, collect, select_runs
from opd_tasks.report.render import comparison_table, examples, render, summary_table

__all__ = ["REPORT_MARKER", "Report", "RunInfo", "build_report", "check_out_dir", "collect", "comparison_table",
           "select_runs", "summarize", "summary_table", "verdict"]

REPORT_MARKER = "report.json"


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
        figs = plots(data, summary, tmp)
        log("report: token examples")
        ex = examples(data, runs, n_examples, root)
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
