"""`opd experiment`: methods x seeds as one Prefect flow, then the report.

The parent flow `experiment` runs one `distill` subflow per (seed, method), named `<name>-<method>-s<seed>`,
seeds outermost, so the methods of a seed run back to back against one storage root and share every cached
stage whose inputs are the same: the eval prompts, the baseline evaluation, and the first iteration's prompts,
rollouts, teacher scores and gates (same student checkpoint, same seed). The analysis is not shared between
methods: its key includes the method's token weighting and bridge. After the runs, an uncached task builds
`opd report` over exactly these runs and publishes its markdown as a Prefect artifact.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.distill import distill
from opd_tasks.config import RunConfig
from opd_tasks.errors import ConfigError
from opd_tasks.method import METHODS


def check_plan(methods: list[str], seeds: list[int], cfg: RunConfig | None = None, name: str | None = None,
               report_out: str | None = None) -> None:
    """ConfigError, before any server starts, unless the methods are known, the seeds distinct, the report
    directory usable, and no planned run already holds iterations beyond this plan's (a shorter rerun of a longer
    run would leave the old iterations in its lineage and the report would read them)."""
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"opd experiment: methods must be among {', '.join(METHODS)}; got {methods}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"opd experiment: seeds must be distinct and at least one; got {seeds}")
    if cfg is None or name is None:
        return
    from opd_tasks.report import check_out_dir
    from storage.lineage import RunLineage

    check_out_dir(report_out or cfg.resolved_root() / "reports" / name)
    for _, _, run in run_names(name, methods, seeds):
        its = [e.iteration for e in RunLineage(cfg.resolved_root(), run).entries() if e.stage == "update"]
        if its and max(its) >= cfg.iterations:
            raise ConfigError(f"opd experiment: run {run!r} already has {max(its) + 1} iterations, more than the "
                              f"{cfg.iterations} planned; use the same -n to rerun it from cache, or another --name")


def run_names(name: str, methods: list[str], seeds: list[int]) -> list[tuple[int, str, str]]:
    """(seed, method, run name) in the order the experiment runs them."""
    return [(s, m, f"{name}-{m}-s{s}") for s in seeds for m in methods]


def publish_report(rep, description: str) -> str:
    """Publish a built report (`opd_tasks.report.Report`) as a Prefect markdown artifact named after its
    directory; returns the artifact key. The Prefect UI cannot load the PNG files next to the report, so the
    artifact carries the tables and text, and the path of the HTML page that has the plots."""
    md = "\n".join(line for line in rep.markdown_text.splitlines() if not line.startswith("!["))
    slug = "".join(ch if ch.isalnum() else "-" for ch in rep.out.name.lower()).strip("-") or "report"
    create_markdown_artifact(markdown=md + f"\n\nFull report with plots: `{rep.html}`\n", key=f"opd-report-{slug}",
                             description=description)
    return f"opd-report-{slug}"


@task(name="report", cache_policy=NO_CACHE, persist_result=False)
def report_task(root: str, runs: list[str], out: str | None, title: str, command: str | None) -> dict:
    from opd_tasks.report import build_report

    log = get_run_logger()
    rep = build_report(root, runs, out=out, title=title, command=command, log=log.info)
    publish_report(rep, f"opd report: {len(runs)} runs")
    return {"out": str(rep.out), "html": str(rep.html), "markdown": str(rep.markdown), "summary": rep.summary}


@flow(name="experiment", log_prints=True, validate_parameters=False)
def experiment(config: dict, methods: list[str], seeds: list[int], name: str, report: bool = True,
               report_out: str | None = None, command: str | None = None) -> dict[str, Any]:
    """Run `methods` x `seeds` of `config` (each a `distill` subflow), then the report over those runs."""
    base = RunConfig.model_validate(config)
    check_plan(methods, seeds, base, name, report_out)
    log = get_run_logger()
    plan = run_names(name, methods, seeds)
    out: dict[str, Any] = {"name": name, "root": str(base.resolved_root()), "runs": []}
    for k, (seed, method, run) in enumerate(plan, 1):
        log.info("experiment %s: run %d/%d %s (method %s, seed %d)", name, k, len(plan), run, method, seed)
        cfg = base.model_copy(update={"method": method, "seed": seed, "name": run})
        t0 = time.perf_counter()
        res = distill.with_options(flow_run_name=run)(cfg.model_dump(mode="json"))
        cached = sum(1 for it in res["iterations"] for r in it["stages"] if r["state"] == "Cached")
        total = sum(len(it["stages"]) for it in res["iterations"])
        out["runs"].append({"run": run, "method": method, "seed": seed, "baseline": res["baseline_accuracy"],
                            "accuracy": [it["accuracy"] for it in res["iterations"]],
                            "seconds": time.perf_counter() - t0, "stages_cached": cached, "stages": total})
        log.info("experiment %s: %s accuracy %.1f%% -> %s (%d of %d stages from cache)", name, run,
                 100 * res["baseline_accuracy"], " ".join(f"{100 * a:.1f}%" for a in out["runs"][-1]["accuracy"]),
                 cached, total)
    if report:
        report_out = report_out or str(base.resolved_root() / "reports" / name)
        out["report"] = report_task(str(base.resolved_root()), [r for _, _, r in plan], report_out,
                                    f"OPD experiment {name}: {', '.join(methods)} x seeds {seeds}", command)
    return out
