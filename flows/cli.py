"""The `opd` command line. Heavy imports (torch, prefect) happen inside the commands that need them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from opd_tasks.errors import ConfigError, OpdError
from opd_tasks.method import METHODS
from opd_tasks.stages import STAGES, gpu_stages

app = typer.Typer(
    help="opd-pipeline: on-policy distillation (OPD / TOPD) of language models as a Prefect pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _environment() -> None:
    """Process settings every command needs, set when a command runs (never at import); each only where unset."""
    # A fresh Prefect home migrates its SQLite database on the first start; on a busy 2-core machine that can take
    # longer than Prefect's 20 s default before the temporary server answers.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # The temporary server's telemetry heartbeat has nowhere to go on an offline machine, and on a fresh SQLite
    # database it races the migrations and logs "database is locked" tracebacks. Opt in with =true.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The same for the client's telemetry (Prefect >= 3.9), which also prints a notice on a terminal's first run.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # Spinning OpenMP threads make torch several times slower on a shared 2-core CPU (docs/testbed.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Prefect does not create a missing parent of PREFECT_HOME, and its temporary server then fails to start.
    if os.environ.get("PREFECT_HOME"):
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
config_app = typer.Typer(help="Inspect the run configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
server_app = typer.Typer(help="The local Prefect server that opd commands share (flows/server.py).",
                         no_args_is_help=True)
app.add_typer(server_app, name="server")

# Wide enough for the run summary and SQL results when stdout is a pipe or a file (e.g. `make run | tee`).
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML run config (default: configs/testbed.yaml).")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config key: --set rollout.temperature=0.7")
]
RootOpt = Annotated[
    Path | None, typer.Option("--root", help="Storage root (default: $OPD_HOME or ./.opd).")
]


def _announce(line: str) -> None:
    """Which Prefect server a command uses (flows/server.py), in the command's output."""
    console.print(line, style="dim", highlight=False, markup=False)


def _fail(e: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


def _root(root: Path | None) -> Path:
    from storage.layout import default_root

    return root if root is not None else default_root()


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    from opd_tasks.config import dump_config, load_config

    try:
        cfg = load_config(config, set_ or [])
    except OpdError as e:
        _fail(e)
    sys.stdout.write(dump_config(cfg))


@server_app.command("status")
def server_status() -> None:
    """Whether the shared local Prefect server runs, where, and when it stops by itself."""
    from flows.server import IDLE_ENV, idle_minutes, read_state, server_answers

    state = read_state()
    if state is None or not server_answers(state["url"]):
        console.print(f"no local Prefect server runs for this PREFECT_HOME; the next opd run starts one "
                      f"({IDLE_ENV}={idle_minutes():g})", highlight=False)
        raise typer.Exit(1)
    console.print(f"local Prefect server on {state['url']} (pid {state['pid']}, Prefect {state['prefect']}); it "
                  f"stops after {state['idle_minutes']:g} min unused", highlight=False)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the shared local Prefect server now (a command still using it loses its connection)."""
    from flows.server import stop_shared_server

    state = stop_shared_server()
    console.print(f"stopped the local Prefect server on {state['url']} (pid {state['pid']})" if state else
                  "no local Prefect server was running", highlight=False)


@app.command("runs")
def runs_cmd(root: RootOpt = None) -> None:
    """List runs with their iterations and the stages recorded in each."""
    from storage.lineage import list_runs

    runs = list_runs(_root(root))
    if not runs:
        console.print(f"no runs under {_root(root).resolve()}")
        return
    t = Table("run", "iterations", "stages recorded", "latest stage", "artifacts", title=f"runs in {_root(root)}")
    for r in runs:
        entries = r.entries()
        its = sorted({e.iteration for e in entries})
        stages = sorted({e.stage for e in entries})
        latest = max(entries, key=lambda e: e.recorded_at) if entries else None
        t.add_row(
            r.run,
            f"{its[0]}..{its[-1]} ({len(its)})" if its else "-",
            ", ".join(stages) or "-",
            f"it{latest.iteration} {latest.stage}" if latest else "-",
            str(len({e.ref.sha256 for e in entries})),
        )
    console.print(t)


@app.command("sql")
def sql_cmd(
    query: Annotated[str, typer.Argument(help="SQL over the views: prompts, rollouts, teacher_scores, tokens, "
                                              "probes, updates, evals, lineage, artifacts.")],
    root: RootOpt = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | csv | json | parquet")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only these runs (repeatable).")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every file the views read against its "
                                         "manifest's sha256 (files hashed before and unchanged since are taken from "
                                         "the root's ledger); --no-verify checks sizes only.")] = True,
    limit: Annotated[int, typer.Option(min=0, help="Rows shown in table format.")] = 50,
) -> None:
    """Run one read-only DuckDB query over every run's artifacts. Example:
    opd sql "SELECT run, count(*) FROM tokens GROUP BY 1". It cannot write or reach outside the root's artifacts
    (COPY, ATTACH, INSTALL, reading other files are refused); save a result with --output."""
    import duckdb

    from storage.views import connect, read_only_query

    if fmt not in ("table", "csv", "json", "parquet"):
        _fail(ValueError(f"--format must be table, csv, json or parquet, got {fmt!r}"))
    if fmt == "parquet" and output is None:
        _fail(ValueError("--format parquet needs --output FILE"))
    try:
        con = connect(_root(root), runs=run, verify=verify)
        rel = read_only_query(con, query)
    except OpdError as e:
        _fail(e)
    except duckdb.Error as e:
        _fail(ValueError(f"SQL error: {e}"))
    if rel is None:
        return
    tbl = rel.to_arrow_table()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(tbl, output)
        console.print(f"wrote {tbl.num_rows} rows to {output}")
        return
    if fmt == "csv":
        import pyarrow.csv as pcsv

        if output:
            pcsv.write_csv(tbl, output)
        else:
            import io

            buf = io.BytesIO()
            pcsv.write_csv(tbl, buf)
            sys.stdout.write(buf.getvalue().decode())
        return
    if fmt == "json":
        text = json.dumps(tbl.to_pylist(), default=str, indent=1)
        (output.write_text(text + "\n") if output else sys.stdout.write(text + "\n"))
        return
    t = Table(*tbl.column_names)
    for row in tbl.slice(0, limit).to_pylist():
        t.add_row(*("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row.values()))
    console.print(t)
    if tbl.num_rows > limit:
        console.print(f"... {tbl.num_rows - limit} more rows (use --limit, or --format csv/json/parquet)")
    if output:
        output.write_text(json.dumps(tbl.to_pylist(), default=str))


@app.command("verify")
def verify_cmd(
    run: Annotated[str | None, typer.Argument(help="Only the artifacts this run points at.")] = None,
    root: RootOpt = None,
) -> None:
    """Re-hash every artifact (or a run's); name each bad file; exit 1 if any is bad. Without a run it also
    names the artifacts that the store recorded publishing, or a run points at, whose directory is gone."""
    from storage.layout import MANIFEST
    from storage.lineage import RunLineage, check_runs, list_runs
    from storage.store import ArtifactStore

    store = ArtifactStore(_root(root))
    problems: list[str] = []
    try:
        if run:
            check_runs(store.layout, [run])
            refs = list({e.ref.sha256: e.ref for e in RunLineage(store.layout, run).entries()}.values())
        else:
            refs = list(store.iter_artifacts(on_bad=problems.append))
            gone = set(store.missing_artifacts())
            gone |= {(e.ref.stage, e.ref.key) for r in list_runs(store.layout) for e in r.entries()
                     if not (store.layout.artifact_dir(e.ref.stage, e.ref.key) / MANIFEST).is_file()}
            problems += [f"artifact {stage}/{key} is missing: its directory "
                         f"{store.layout.artifact_dir(stage, key)} is gone" for stage, key in sorted(gone)]
    except OpdError as e:
        _fail(e)
    n = len(refs) + len(problems)  # the problems so far are artifacts outside `refs`
    for ref in refs:
        try:
            store.verify(ref)
        except OpdError as e:
            problems.append(str(e))
    for msg in problems:
        err_console.print(f"[red]BAD[/] {msg}", highlight=False)
    console.print(f"{n - len(problems)} of {n} artifacts OK")
    if problems:
        raise typer.Exit(1)


@app.command("gc")
def gc_cmd(
    keep_last: Annotated[int, typer.Option(min=1, help="Checkpoints kept per run (its latest ones).")] = 2,
    keep: Annotated[list[str] | None, typer.Option(help="Also keep this checkpoint, RUN:ITERATION (repeatable; "
                                                        "recorded in the run's run.json).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go and the bytes freed; change "
                                                            "nothing.")] = False,
    root: RootOpt = None,
) -> None:
    """Reclaim disk: weights of old checkpoints (their training logs stay), optimizer state of kept checkpoints
    that are no run's latest, artifacts no run points at, retired artifacts. Never under a live run; a rerun
    recomputes what it needs. Details: docs/operations.md, "Disk"."""
    from opd_tasks.models import CHECKPOINT_STATE_DIR
    from opd_tasks.stages import UPDATE
    from opd_tasks.training.checkpoint import OPTIMIZER_FILE
    from storage import gc
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    store = ArtifactStore(_root(root))
    marks = set()
    for item in keep or []:
        run_name, _, it = item.rpartition(":")
        if not run_name or not it.isdigit() or not RunLineage(store.layout, run_name).exists():
            _fail(ConfigError(f"--keep {item!r}: expected RUN:ITERATION naming a run under {store.root}"))
        marks.add((run_name, int(it)))
    try:
        def removals() -> list:
            return gc.plan(store, keep_last, UPDATE.name, (f"{CHECKPOINT_STATE_DIR}/{OPTIMIZER_FILE}",),
                           frozenset(marks))

        if dry_run:
            todo, freed = removals(), None
        else:
            with gc.exclusive(store.root):
                for run_name, it in sorted(marks):
                    lin = RunLineage(store.layout, run_name)
                    lin.init(keep_checkpoints=sorted({*(lin.info().get("keep_checkpoints") or []), it}))
                todo = removals()
                freed = gc.execute(store, todo)
    except OpdError as e:
        _fail(e)
    t = Table("what", "artifact or directory", "MB", "why", title=f"opd gc {'(dry run) ' if dry_run else ''}"
                                                                  f"under {store.root}")
    for r in todo:
        t.add_row(r.what, r.target, f"{r.bytes / 1e6:.1f}", r.why)
    console.print(t)
    total = sum(r.bytes for r in todo)
    console.print(f"would free {total / 1e6:.1f} MB in {len(todo)} removals" if dry_run else
                  f"freed {freed / 1e6:.1f} MB in {len(todo)} removals", highlight=False)


@app.command("show")
def show_cmd(
    run: Annotated[str, typer.Argument(help="Run name.")],
    iteration: Annotated[int | None, typer.Option("--iteration", "-i", help="Only this iteration.")] = None,
    stage: Annotated[str | None, typer.Option("--stage", "-s", help="Only this stage (with -i: its rows).")] = None,
    rows: Annotated[int, typer.Option(min=0, help="Rows of each table shown for one stage.")] = 5,
    root: RootOpt = None,
) -> None:
    """What each stage of a run produced: artifact, rows, cache hit, seconds; for one stage, its summary and
    first rows."""
    from storage.lineage import RunLineage, check_runs
    from storage.store import ArtifactStore

    store = ArtifactStore(_root(root))
    try:
        check_runs(store.layout, [run])
    except OpdError as e:
        _fail(e)
    lin = RunLineage(store.layout, run)
    recorded = lin.entries()
    its = sorted({e.iteration for e in recorded})
    if iteration is not None and iteration not in its:
        _fail(ConfigError(f"run {run!r} has no iteration {iteration}; its iterations: "
                          f"{f'{its[0]}..{its[-1]} ({len(its)})' if its else 'none recorded'}"))
    recorded = [e for e in recorded if iteration is None or e.iteration == iteration]
    if stage is not None and stage not in (stages := sorted({e.stage for e in recorded})):
        where = "" if iteration is None else f" at iteration {iteration}"
        _fail(ConfigError(f"run {run!r} has no stage {stage!r}{where}; stages recorded: {', '.join(stages) or 'none'}"))
    entries = [e for e in recorded if stage is None or e.stage == stage]
    t = Table("iteration", "stage", "state", "seconds", "tables", "rows", "artifact", title=f"run {run}")
    for e in entries:
        t.add_row(str(e.iteration), e.stage, "cached" if e.cached else "computed",
                  f"{e.seconds:.1f}" if e.seconds is not None else "-", e.ref.schema_name, str(e.ref.rows), e.ref.uri)
    console.print(t)
    from opd_tasks.provenance import environments

    manifests = []
    for ref in {e.ref.sha256: e.ref for e in entries}.values():  # each artifact once
        try:
            manifests.append(store.manifest(ref))
        except OpdError:
            continue  # a missing or damaged artifact: its row says where it was; `opd verify` names the problem
    for line, n in environments(manifests):
        console.print(f"computed with {line}: {n} artifact{'s' if n != 1 else ''}", highlight=False)
    if iteration is not None and stage is not None and entries:
        ref = entries[0].ref
        try:
            m = store.verify(ref)
        except OpdError as e:
            _fail(e)
        if m["meta"]:
            console.print_json(json.dumps(m["meta"], default=str))
        for name in m["tables"]:
            tbl = store.read_table(ref, name).slice(0, rows)
            tt = Table(*tbl.column_names, title=f"{name}: first {tbl.num_rows} of {m['tables'][name]['rows']} rows")
            for r in tbl.to_pylist():
                tt.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v)[:40] for v in r.values()))
            console.print(tt)


@app.command("bootstrap")
def bootstrap_cmd(
    out: Annotated[Path, typer.Option(help="A new (or empty) directory for the models; an existing one with files "
                                           "is refused.")] = Path("testbed-models"),
    replace_shipped: Annotated[bool, typer.Option("--replace-shipped", help="Write over the committed testbed models "
                                                  "(opd_tasks/testbed/assets) instead of --out.")] = False,
    quick: Annotated[bool, typer.Option(help="A few steps only: checks the script, not the accuracies.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of data and initialisation.")] = 0,
    teacher_style: Annotated[str, typer.Option(help="Style the teacher trains on (e.g. teacher_broad: reads every "
                                                    "phrasing, prefers its own; docs/testbed.md).")] = "teacher",
    fork: Annotated[bool, typer.Option("--fork", help="Build the mechanism switch's models instead: the committed "
                                                      "teacher fine-tuned, one student per fork (data.testbed.fork; "
                                                      "with --replace-shipped: the assets' fork/ dir).")] = False,
) -> None:
    """Train the testbed tokenizer, teacher and student from scratch (about 10 minutes on 2 cores) into a new
    directory; the committed models change only with --replace-shipped."""
    from opd_tasks.testbed import bootstrap as bs

    if replace_shipped:
        out = bs.ASSETS_DIR / "fork" if fork else bs.ASSETS_DIR
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        _fail(ConfigError(f"--out {out} exists and is not an empty directory: nothing was written. Give a new "
                          "directory, or --replace-shipped to overwrite the committed testbed models"))
    argv = ["--out", str(out), "--seed", str(seed), "--teacher-style", teacher_style]
    argv += ["--quick"] if quick else []
    argv += ["--fork"] if fork else []
    try:
        rc = bs.main(argv)
    except OpdError as e:
        _fail(e)
    if not rc and not replace_shipped:
        models = ("teacher", "student-consequential") if fork else ("teacher", "student")
        console.print(f"models in {out}; use them with --set models.teacher.path={out / models[0]} "
                      f"--set models.student.path={out / models[1]}", highlight=False)
    raise typer.Exit(rc or 0)


@app.command("run")
def run_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Run name (overrides the config's).")] = None,
    method: Annotated[str | None, typer.Option("--method", help=" | ".join(METHODS))] = None,
    iterations: Annotated[int | None, typer.Option("--iterations", "-n", min=1, help="Iterations to run.")] = None,
    refresh: Annotated[list[str] | None, typer.Option("--refresh", help="Recompute this stage (repeatable): "
                                                      f"{', '.join(STAGES)}.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run after its latest checkpoint, on new "
                                                          "prompts, for N more iterations.")] = False,
) -> None:
    """Run a distillation as a Prefect flow: baseline eval, then N iterations of rollout -> score -> update ->
    evaluate. Rerunning computes only what is missing. A refused flag writes nothing; a run of the same name
    already running elsewhere is refused."""
    from opd_tasks.config import load_config

    overrides = list(set_ or [])
    overrides += [f"name={name}"] if name is not None else []
    overrides += [f"method={method}"] if method is not None else []
    overrides += [f"iterations={iterations}"] if iterations is not None else []
    try:
        cfg = load_config(config, overrides)
        from flows.run import run_and_report
        from opd_tasks.pipeline import check_refresh
        from storage.lineage import check_runs

        check_refresh(refresh or [])
        if resume:
            try:
                check_runs(cfg.resolved_root(), [cfg.name])
            except ConfigError as e:
                raise ConfigError(f"--resume: {e}; drop --resume to start it, or name a run there") from None
        run_and_report(cfg, console, refresh or [], resume)
    except OpdError as e:
        _fail(e)


def _csv(value: str, what: str, conv=str) -> list:
    try:
        items = [conv(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise OpdError(f"{what}: cannot parse {value!r} as a comma-separated list ({e})") from e
    if not items:
        raise OpdError(f"{what}: empty list {value!r}")
    return items


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
    from opd_tasks.config import load_config

    try:
        arms = list(arm) if arm else _csv(methods, "--methods")
        ss = _csv(seeds, "--seeds", int)
        conds = _csv(conditions, "--conditions") if conditions else None
        cfg = load_config(config, [f"data.eval_size={eval_size}", *(set_ or []),
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
        from storage.lineage import run_lock

        with run_lock(cfg.resolved_root(), [p.run for p in plan]), prefect_api(_announce):
            res = experiment(cfg.model_dump(mode="json"), arms, ss, name, report=report,
                             report_out=str(out) if out else None, command=cmd, conditions=conds, primary=primary)
    except OpdError as e:
        _fail(e)
    t = Table("run", "arm", "seed", "accuracy per iteration", "stages from cache", "seconds",
              title=f"experiment {name}")
    for r in res["runs"]:
        t.add_row(r["run"], r["arm"], str(r["seed"]),
                  " -> ".join(f"{100 * a:.1f}%" for a in [r["baseline"], *r["accuracy"]]),
                  f"{r['stages_cached']} / {r['stages']}", f"{r['seconds']:.0f}")
    console.print(t)
    for condition, rep in (res.get("reports") or {}).items():
        console.rule(f"report {condition}")
        _print_summary(rep["summary"])
        console.print(f"report: {rep['html']} (markdown: {rep['markdown']})", highlight=False)


def _print_summary(summary: dict) -> None:
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
        rep = build_report(_root(root), runs, out=out, title=title, n_examples=examples, command=cmd,
                           log=lambda m: err_console.print(m, highlight=False), primary=primary)
    except OpdError as e:
        _fail(e)
    _print_summary(rep.summary)
    console.print(f"report: {rep.html} (markdown: {rep.markdown})", highlight=False)
    if publish is None:
        publish = bool(os.environ.get("PREFECT_API_URL"))
    if publish:
        from flows.experiment import publish_report

        key = publish_report(rep, f"opd report {runs}")
        console.print(f"published as Prefect artifact {key}", highlight=False)


@app.command("serve")
def serve_cmd(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 2 * * *" (nightly at 02:00).')] = None,
    name: Annotated[str, typer.Option("--name", help="Deployment name; also the run it continues.")] = "nightly",
    iterations: Annotated[int, typer.Option("--iterations", "-n", min=1, help="Iterations per scheduled run.")] =
        1,
) -> None:
    """Serve the distill flow as a deployment (needs a Prefect server: `prefect server start`). Each run,
    scheduled or triggered with `prefect deployment run distill/NAME`, continues run NAME from its latest
    checkpoint on the next prompts. Blocks until interrupted."""
    from opd_tasks.config import load_config

    try:
        cfg = load_config(config, [*(set_ or []), f"name={name}", f"iterations={iterations}"])
    except OpdError as e:
        _fail(e)
    from flows.distill import distill

    console.print(f"serving deployment distill/{name} (cron {cron or 'none'}); storage root {cfg.resolved_root()}")
    distill.serve(name=name, cron=cron, parameters={"config": cfg.model_dump(mode="json"), "resume": True},
                  description=f"OPD run {name}: {iterations} iteration(s) per run, continuing from its latest "
                              "checkpoint")


@app.command("deploy")
def deploy_cmd(
    pool: Annotated[str, typer.Option("--pool", help="Work pool (create one: prefect work-pool create NAME "
                                                     "--type process).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    cron: Annotated[str | None, typer.Option(help='Cron schedule, e.g. "0 2 * * *".')] = None,
    name: Annotated[str, typer.Option("--name", help="Deployment name; also the run it continues.")] = "nightly",
    iterations: Annotated[int, typer.Option("--iterations", "-n", min=1, help="Iterations per run.")] = 1,
) -> None:
    """Register the distill flow as a deployment on a work pool (its workers run it from this checkout's
    source; a `process` pool runs it locally). Like `opd serve`, each run continues run NAME."""
    from opd_tasks.config import load_config

    try:
        cfg = load_config(config, [*(set_ or []), f"name={name}", f"iterations={iterations}"])
    except OpdError as e:
        _fail(e)
    if cfg.root is None:  # a worker's working directory is not ours: pin the storage root
        cfg = cfg.model_copy(update={"root": str(cfg.resolved_root().resolve())})
    from flows.distill import distill

    repo = Path(__file__).resolve().parent.parent
    dep_id = distill.from_source(source=str(repo), entrypoint="flows/distill.py:distill").deploy(
        name=name, work_pool_name=pool, cron=cron, build=False, push=False, print_next_steps=False,
        parameters={"config": cfg.model_dump(mode="json"), "resume": True},
        description=f"OPD run {name}: {iterations} iteration(s) per run, continuing from its latest checkpoint")
    console.print(f"deployment distill/{name} ({dep_id}) on work pool {pool!r}; storage root {cfg.root}. "
                  f"Start a worker: prefect worker start --pool {pool}", highlight=False)


@app.command("deploy-stages")
def deploy_stages_cmd(
    pool: Annotated[str, typer.Option("--pool", help="Work pool of the GPU workers (e.g. prefect work-pool create "
                                                     "gpu --type process; Kubernetes: --type kubernetes).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    stages: Annotated[str, typer.Option(help="Comma-separated GPU stages to deploy.")] = ",".join(gpu_stages()),
    work_queue: Annotated[str | None, typer.Option("--work-queue", help="Work queue in the pool (default: the "
                                                                        "pool's default queue).")] = None,
    concurrency_limit: Annotated[int | None, typer.Option(
        "--concurrency-limit", min=1, help="Most flow runs of each stage deployment at once (default: none; a "
                                           "pool limit caps all: prefect work-pool set-concurrency-limit POOL N).")]
        = None,
) -> None:
    """Register one deployment of the `opd-stage` flow per GPU stage on a work pool (from this checkout's source,
    no image build). Runs with `orchestration.stage_runner=deployment` start them with run_deployment; names
    come from `orchestration.stage_deployment` (default opd-stage/{stage})."""
    from opd_tasks.config import load_config

    try:
        cfg = load_config(config, list(set_ or []))
        chosen = _csv(stages, "--stages")
        bad = [s for s in chosen if s not in gpu_stages()]
        if bad:
            raise OpdError(f"--stages: not GPU stage(s) {bad}; GPU stages are {', '.join(gpu_stages())}")
        names = {s: cfg.orchestration.stage_deployment_name(s) for s in chosen}
    except OpdError as e:
        _fail(e)
    from flows.stage import opd_stage

    repo = Path(__file__).resolve().parent.parent
    src = opd_stage.from_source(source=str(repo), entrypoint="flows/stage.py:opd_stage")
    tag = cfg.orchestration.concurrency_tag
    for stage, full in names.items():
        dep_id = src.deploy(
            name=full.split("/", 1)[1], work_pool_name=pool, work_queue_name=work_queue, build=False, push=False,
            print_next_steps=False, parameters={"stage": stage}, tags=[tag], concurrency_limit=concurrency_limit,
            description=f"OPD stage {stage}: one run per call from a distill flow with "
                        "orchestration.stage_runner=deployment (flows/stage.py)")
        console.print(f"deployment {full} ({dep_id}) on work pool {pool!r}", highlight=False)
    console.print(f"Start a worker: prefect worker start --pool {pool}. Run with --set "
                  "orchestration.stage_runner=deployment (and PREFECT_API_URL pointing at this server).",
                  highlight=False)


def main() -> None:  # pragma: no cover - console entry point helper
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
