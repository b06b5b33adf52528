"""Commands that run distillations and report on them: `opd run`, `opd experiment`, `opd report`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.app import (
    ConfigOpt,
    RootOpt,
    SetOpt,
    announce,
    app,
    console,
    csv_list,
    err_console,
    fail,
    load,
    refresh_names,
    root_of,
)
from opd_tasks.errors import ConfigError, OpdError
from opd_tasks.method import METHODS
from opd_tasks.stages import STAGES


@app.command("run")
def run_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Run name (overrides the config's).")] = None,
    method: Annotated[str | None, typer.Option("--method", help=" | ".join(METHODS))] = None,
    iterations: Annotated[int | None, typer.Option("--iterations", "-n", min=1, help="Iterations to run.")] = None,
    refresh: Annotated[list[str] | None, typer.Option("--refresh", callback=refresh_names,
                                                      help=f"Recompute this stage (repeatable): {', '.join(STAGES)}.")
                       ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run after its latest checkpoint, on new "
                                                          "prompts, for N more iterations.")] = False,
) -> None:
    """Run a distillation as a Prefect flow: baseline eval, then N iterations of rollout -> score -> update ->
    evaluate. Rerunning computes only what is missing. A refused flag writes nothing; a run of the same name
    already running elsewhere is refused."""
    overrides = list(set_ or [])
    overrides += [f"name={name}"] if name is not None else []
    overrides += [f"method={method}"] if method is not None else []
    overrides += [f"iterations={iterations}"] if iterations is not None else []
    try:
        cfg = load(config, overrides)
        if resume:
            from storage.lineage import check_runs

            try:
                check_runs(cfg.resolved_root(), [cfg.name])
            except ConfigError as e:
                raise ConfigError(f"--resume: {e}; drop --resume to start it, or name a run there") from None
        from flows.run import run_and_report

        run_and_report(cfg, console, refresh, resume)
    except OpdError as e:
        fail(e)


@app.command("experiment")
def experiment_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    name: Annotated[str, typer.Option("--name", help="Experiment name; runs are NAME[-CONDITION]-ARM-sSEED.")] =
        "experiment",
    methods: Annotated[str, typer.Option(help=f"Comma-separated methods among {', '.join(METHODS)}, each an arm "
                                              "of its own name.")] = ",".join(METHODS),
    arm: Annotated[list[str] | None, typer.Option("--arm", help="An arm: LABEL=METHOD[,key=value,...], e.g. "
                                                                "topd-oracle=topd,analysis.detector=oracle "
                                                                "(repeatable; replaces --methods).")] = None,
    conditions: Annotated[str | None, typer.Option(help="Comma-separated testbed conditions (data.testbed.fork: "
                                                        "none, harmless, consequential), each with every arm "
                                                        "and its own report.")] = None,
    primary: Annotated[str | None, typer.Option(help="The arm the verdict compares with opd (default: topd).")] =
        None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    iterations: Annotated[int | None, typer.Option("--iterations", "-n", min=1, help="Iterations per run.")] =
        None,
    eval_size: Annotated[int, typer.Option("--eval-size", min=1, help="Problems in the eval set every run shares "
                                                                      "(data.eval_size; a --set wins).")] = 1000,
    report: Annotated[bool, typer.Option(help="Build the report at the end.")] = True,
    out: Annotated[Path | None, typer.Option(help="Report directory (default: <root>/reports/NAME; with "
                                                  "--conditions, the parent of NAME-CONDITION).")] = None,
) -> None:
    """Compare arms over seeds (and conditions): one `distill` run per (condition, seed, arm) in one Prefect flow,
    sharing cached rollouts and teacher scores where the inputs are the same and one eval set for all, then
    `opd report` (paired comparisons) over each condition's runs."""
    try:
        arms = list(arm) if arm else csv_list(methods, "--methods")
        ss = csv_list(seeds, "--seeds", int)
        conds = csv_list(conditions, "--conditions") if conditions else None
        cfg = load(config, [f"data.eval_size={eval_size}", *(set_ or []),
                                   *([f"iterations={iterations}"] if iterations is not None else [])])
        from storage.layout import check_name

        check_name("experiment", name)
        from flows.experiment import check_plan, experiment, parse_arm, run_plan

        check_plan(arms, ss, cfg, name, str(out) if out else None, conds)
        plan = run_plan(name, [parse_arm(a) for a in arms], ss, conds)
        console.rule(f"[bold]opd experiment[/] {name}: {len(plan)} runs ({', '.join(parse_arm(a).label for a in arms)}"
                     f" x seeds {ss}{f' x conditions {conds}' if conds else ''}), {cfg.iterations} iterations each, "
                     f"root {cfg.resolved_root().resolve()}")
        cmd = "opd experiment " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "opd experiment"
        from flows.server import prefect_api
        from storage.lineage import check_unlocked

        check_unlocked(cfg.resolved_root(), [p.run for p in plan])  # refused before the server starts
        with prefect_api(announce):
            res = experiment(cfg.model_dump(mode="json"), arms, ss, name, report=report,
                             report_out=str(out) if out else None, command=cmd, conditions=conds, primary=primary)
    except OpdError as e:
        fail(e)
    from opd_tasks.stages.evaluate import percent

    t = Table("run", "arm", "seed", "accuracy per iteration", "stages from cache", "seconds",
              title=f"experiment {name}")
    for r in res["runs"]:
        t.add_row(r["run"], r["arm"], str(r["seed"]),
                  " -> ".join(percent(a) for a in [r["baseline"], *r["accuracy"]]),
                  f"{r['stages_cached']} / {r['stages']}", f"{r['seconds']:.0f}")
    console.print(t)
    for condition, rep in (res.get("reports") or {}).items():
        console.rule(f"report {condition}")
        print_summary(rep["summary"])
        console.print(f"report: {rep['html']} (markdown: {rep['markdown']})", highlight=False)

def print_summary(summary: dict) -> None:
    from opd_tasks.report import comparison_table, summary_table

    for (head, rows), title in ((summary_table(summary), "final accuracy per method over seeds"),
                                (comparison_table(summary), "paired comparisons (points; per-seed differences)")):
        if rows:
            t = Table(*head, title=title)
            for r in rows:
                t.add_row(*r)
            console.print(t)
    if summary.get("verdict"):
        console.print(summary["verdict"]["text"], highlight=False)

@app.command("report")
def report_cmd(
    runs: Annotated[list[str], typer.Argument(help="Run names or shell patterns (quote them), e.g. 'exp-*'.")],
    root: RootOpt = None,
    out: Annotated[Path | None, typer.Option(help="Report directory (default: <root>/reports/<first run>).")] = None,
    title: Annotated[str | None, typer.Option(help="Report title.")] = None,
    examples: Annotated[int, typer.Option(min=0, help="Rollouts shown token by token.")] = 3,
    publish: Annotated[bool | None, typer.Option(
        "--publish/--no-publish", help="Publish the markdown as a Prefect artifact (default: when PREFECT_API_URL "
                                       "names a server).")] = None,
    primary: Annotated[str | None, typer.Option(help="The method or arm the verdict compares with opd "
                                                     "(default: topd).")] = None,
) -> None:
    """A self-contained HTML report (plus markdown and PNG plots) over runs: accuracy per iteration per method
    with a band over seeds, regimes, the classifier vs ground truth, token examples, stage costs."""
    from opd_tasks.report import build_report

    cmd = "opd report " + " ".join(sys.argv[2:])
    try:
        rep = build_report(root_of(root), runs, out=out, title=title, n_examples=examples, command=cmd,
                           log=lambda m: err_console.print(m, highlight=False), primary=primary)
    except OpdError as e:
        fail(e)
    print_summary(rep.summary)
    console.print(f"report: {rep.html} (markdown: {rep.markdown})", highlight=False)
    if publish is None:
        publish = bool(os.environ.get("PREFECT_API_URL"))
    if publish:
        from flows.experiment import publish_report

        key = publish_report(rep, f"opd report {runs}")
        console.print(f"published as Prefect artifact {key}", highlight=False)
