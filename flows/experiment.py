"""`opd experiment`: arms x seeds (x conditions) as one Prefect flow, then the report.

An arm is a method with a label and config overrides (`topd-oracle=topd,analysis.detector=oracle`; a bare method
name is an arm of that name). The parent flow `experiment` runs one `distill` subflow per (condition, seed, arm),
named `<name>[-<condition>]-<arm>-s<seed>`, conditions then seeds outermost, so the arms of a seed run back to back
against one storage root and share every cached stage whose inputs are the same: the eval prompts (one eval set
for every run, `data.eval_seed`), the baseline evaluation, and the first iteration's prompts, rollouts, teacher
scores and gates (same student checkpoint, same seed). The analysis is not shared between arms that differ in
their weighting, bridge or detector. After the runs, an uncached task builds `opd report` over each condition's
runs (the paired comparisons, the verdict on the primary arm) and publishes its markdown as a Prefect artifact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.distill import distill
from opd_tasks.config import RunConfig
from opd_tasks.errors import ConfigError
from opd_tasks.method import METHODS
from opd_tasks.stages.evaluate import percent


@dataclass(frozen=True)
class Arm:
    """One arm of an experiment: a label, the method, and the config overrides that make it (`key=value`)."""

    label: str
    method: str
    overrides: tuple[str, ...] = ()


#: The config sections an arm's overrides may set: the training stages' settings. Everything else is the
#: experiment's (the root, names, seeds, iterations, models, data and so the shared eval set, how evaluation
#: answers, orchestration): an arm that set it would write elsewhere, be ignored, or break the pairing of the arms.
ARM_SECTIONS = ("teacher_context", "rollout", "scoring", "analysis", "update", "topd", "baselines", "gates")


def parse_arm(spec: str) -> Arm:
    """`METHOD` or `LABEL=METHOD[,key=value,...]` (e.g. `topd-oracle=topd,analysis.detector=oracle`); the keys in
    `ARM_SECTIONS` only."""
    label, _, rest = spec.partition("=") if "=" in spec.split(",", 1)[0] else (spec.split(",", 1)[0], "", spec)
    method, *overrides = [p.strip() for p in (rest or label).split(",") if p.strip()]
    if method not in METHODS:
        raise ConfigError(f"opd experiment: arm {spec!r}: the method must be one of {', '.join(METHODS)}; got "
                          f"{method!r}")
    from storage.layout import check_name

    check_name("arm", label)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"opd experiment: arm {spec!r}: override {o!r} must look like key.path=value")
        if (section := o.split("=", 1)[0].split(".", 1)[0].strip()) not in ARM_SECTIONS:
            raise ConfigError(f"opd experiment: arm {spec!r}: an arm cannot set {o.split('=', 1)[0].strip()!r}: "
                              f"arms set the method and stage settings ({', '.join(ARM_SECTIONS)}); {section!r} "
                              "is the experiment's (use --set, --seeds, -n or --name)")
    return Arm(label, method, tuple(overrides))


def check_plan(arms: list[str], seeds: list[int], cfg: RunConfig | None = None, name: str | None = None,
               report_out: str | None = None, conditions: list[str] | None = None) -> None:
    """ConfigError, before any server starts, unless every arm parses (known method, valid overrides), the labels
    and seeds are distinct, the report directory usable, and no planned run already holds iterations beyond this
    plan's (a shorter rerun of a longer run would leave the old iterations in its lineage and the report would read
    them)."""
    parsed = [parse_arm(a) for a in arms]
    if not parsed or len({a.label for a in parsed}) != len(parsed):
        raise ConfigError(f"opd experiment: arms must be at least one, with distinct labels; got {arms}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"opd experiment: seeds must be distinct and at least one; got {seeds}")
    if cfg is None or name is None:
        return
    from opd_tasks.report import check_out_dir
    from storage.lineage import RunLineage

    for condition in conditions or [None]:
        check_out_dir(report_dir(cfg, name, condition, report_out))
    for plan in run_plan(name, parsed, seeds, conditions):
        run_config(cfg, plan)  # a bad override fails now, not after earlier arms ran
        its = [e.iteration for e in RunLineage(cfg.resolved_root(), plan.run).entries() if e.stage == "update"]
        if its and max(its) >= cfg.iterations:
            raise ConfigError(f"opd experiment: run {plan.run!r} already has {max(its) + 1} iterations, more than "
                              f"the {cfg.iterations} planned; use the same -n to rerun it from cache, or another "
                              "--name")


@dataclass(frozen=True)
class PlannedRun:
    condition: str | None
    seed: int
    arm: Arm
    run: str


def run_plan(name: str, arms: list[Arm], seeds: list[int], conditions: list[str] | None = None) -> list[PlannedRun]:
    """The runs in the order the experiment makes them: per condition, per seed, every arm (so the arms of a seed
    run back to back and share what they can); named NAME[-CONDITION]-ARM-sSEED."""
    out = []
    for c in conditions or [None]:
        for s in seeds:
            for a in arms:
                out.append(PlannedRun(c, s, a, "-".join(p for p in (name, c, a.label, f"s{s}") if p)))
    return out


def run_config(base: RunConfig, plan: PlannedRun) -> RunConfig:
    """The config of one planned run: the base, the condition's fork, the arm's overrides, its method and label."""
    from pydantic import ValidationError

    from opd_tasks.config_files import apply_overrides, format_validation_error

    data = base.model_dump(mode="json")
    sets = ([f"data.testbed.fork={plan.condition}"] if plan.condition else []) + list(plan.arm.overrides)
    data = apply_overrides(data, [*sets, f"method={plan.arm.method}", f"seed={plan.seed}", f"name={plan.run}",
                                  f"arm={plan.arm.label}"])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, f"opd experiment, run {plan.run} of arm {plan.arm.label}")
                          ) from None


def report_dir(base: RunConfig, name: str, condition: str | None, report_out: str | None) -> Path:
    """Where a condition's report goes: `report_out` itself without conditions, else a NAME-CONDITION directory in
    it; by default under `<root>/reports/`."""
    if report_out and condition is None:
        return Path(report_out)
    parent = Path(report_out) if report_out else base.resolved_root() / "reports"
    return parent / (f"{name}-{condition}" if condition else name)


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
def report_task(root: str, runs: list[str], out: str | None, title: str, command: str | None,
                primary: str | None = None) -> dict:
    from opd_tasks.report import build_report

    log = get_run_logger()
    rep = build_report(root, runs, out=out, title=title, command=command, log=log.info, primary=primary)
    publish_report(rep, f"opd report: {len(runs)} runs")
    return {"out": str(rep.out), "html": str(rep.html), "markdown": str(rep.markdown), "summary": rep.summary}


@flow(name="experiment", log_prints=True, validate_parameters=False, result_serializer="json")
def experiment(config: dict, methods: list[str], seeds: list[int], name: str, report: bool = True,
               report_out: str | None = None, command: str | None = None, conditions: list[str] | None = None,
               primary: str | None = None) -> dict[str, Any]:
    """Run the arms (`methods`: method names or `LABEL=METHOD[,key=value,...]` specs) x `seeds` x `conditions` (the
    testbed's `data.testbed.fork`, optional) of `config`, each a `distill` subflow, then one report per condition
    over its runs; `primary`: the arm the report's verdict compares with `opd` (default: `topd`)."""
    base = RunConfig.model_validate(config)
    check_plan(methods, seeds, base, name, report_out, conditions)
    log = get_run_logger()
    plan = run_plan(name, [parse_arm(a) for a in methods], seeds, conditions)
    out: dict[str, Any] = {"name": name, "root": str(base.resolved_root()), "runs": []}
    for k, p in enumerate(plan, 1):
        log.info("experiment %s: run %d/%d %s (arm %s, method %s, seed %d%s)", name, k, len(plan), p.run,
                 p.arm.label, p.arm.method, p.seed, f", condition {p.condition}" if p.condition else "")
        cfg = run_config(base, p)
        t0 = time.perf_counter()
        res = distill.with_options(flow_run_name=p.run)(cfg.model_dump(mode="json"))
        cached = sum(1 for it in res["iterations"] for r in it["stages"] if r["state"] == "Cached")
        total = sum(len(it["stages"]) for it in res["iterations"])
        out["runs"].append({"run": p.run, "arm": p.arm.label, "method": p.arm.method, "condition": p.condition,
                            "seed": p.seed, "baseline": res["baseline_accuracy"],
                            "accuracy": [it["accuracy"] for it in res["iterations"]],
                            "seconds": time.perf_counter() - t0, "stages_cached": cached, "stages": total})
        log.info("experiment %s: %s accuracy %s -> %s (%d of %d stages from cache)", name, p.run,
                 percent(res["baseline_accuracy"]), " ".join(percent(a) for a in out["runs"][-1]["accuracy"]),
                 cached, total)
    if report:
        out["reports"] = {}
        for condition in conditions or [None]:
            runs = [p.run for p in plan if p.condition == condition]
            where = str(report_dir(base, name, condition, report_out))
            title = (f"OPD experiment {name}{f' ({condition})' if condition else ''}: "
                     f"{', '.join(parse_arm(a).label for a in methods)} x seeds {seeds}")
            out["reports"][condition or "all"] = report_task(str(base.resolved_root()), runs, where, title, command,
                                                             primary)
        out["report"] = next(iter(out["reports"].values()))
    return out
