"""Commands that read what runs produced: `opd runs`, `opd show`, `opd sql`, `opd verify`, `opd gc`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli.app import (
    RootOpt,
    app,
    console,
    err_console,
    fail,
    root_of,
)
from opd_tasks.errors import ConfigError, OpdError


@app.command("runs")
def runs_cmd(root: RootOpt = None) -> None:
    """List runs with their iterations and the stages recorded in each."""
    from storage.lineage import list_runs

    runs = list_runs(root_of(root))
    if not runs:
        console.print(f"no runs under {root_of(root).resolve()}")
        return
    t = Table("run", "iterations", "stages recorded", "latest stage", "artifacts", title=f"runs in {root_of(root)}")
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

    store = ArtifactStore(root_of(root))
    try:
        check_runs(store.layout, [run])
    except OpdError as e:
        fail(e)
    lin = RunLineage(store.layout, run)
    recorded = lin.entries()
    its = sorted({e.iteration for e in recorded})
    if iteration is not None and iteration not in its:
        fail(ConfigError(f"run {run!r} has no iteration {iteration}; its iterations: "
                          f"{f'{its[0]}..{its[-1]} ({len(its)})' if its else 'none recorded'}"))
    recorded = [e for e in recorded if iteration is None or e.iteration == iteration]
    if stage is not None and stage not in (stages := sorted({e.stage for e in recorded})):
        where = "" if iteration is None else f" at iteration {iteration}"
        fail(ConfigError(f"run {run!r} has no stage {stage!r}{where}; stages recorded: {', '.join(stages) or 'none'}"))
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
            fail(e)
        if m["meta"]:
            console.print_json(json.dumps(m["meta"], default=str))
        for name in m["tables"]:
            tbl = store.read_table(ref, name).slice(0, rows)
            tt = Table(*tbl.column_names, title=f"{name}: first {tbl.num_rows} of {m['tables'][name]['rows']} rows")
            for r in tbl.to_pylist():
                tt.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v)[:40] for v in r.values()))
            console.print(tt)

@app.command("sql")
def sql_cmd(
    query: Annotated[str, typer.Argument(help="SQL over the views: prompts, rollouts, teacher_scores, tokens, "
                                              "probes, updates, evals, lineage, artifacts.")],
    root: RootOpt = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | csv | json | parquet")] = "table",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the result to this file (outside the "
                                                "storage root; written atomically).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Let --output replace an existing file.")] = False,
    run: Annotated[list[str] | None, typer.Option("--run", help="Only these runs (repeatable).")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check every file the views read against its "
                                         "manifest's sha256 (files hashed before and unchanged since are taken from "
                                         "the root's ledger); --no-verify checks sizes only.")] = True,
    limit: Annotated[int, typer.Option(min=0, help="Rows shown in table format.")] = 50,
) -> None:
    """Run one read-only DuckDB query over every run's artifacts. Example:
    opd sql "SELECT run, count(*) FROM tokens GROUP BY 1". It cannot write or reach outside the root's artifacts
    (COPY, ATTACH, INSTALL, reading other files are refused); save a result with --output, a file outside the root
    that an existing file is not replaced by without --force."""
    import duckdb

    from storage.views import connect, query_tables, read_only_query

    if fmt not in ("table", "csv", "json", "parquet"):
        fail(ValueError(f"--format must be table, csv, json or parquet, got {fmt!r}"))
    if fmt == "parquet" and output is None:
        fail(ValueError("--format parquet needs --output FILE"))
    if output is not None:
        output = _output_path(output, root_of(root), force)
    try:
        con = connect(root_of(root), runs=run, verify=verify, tables=query_tables(query))
        rel = read_only_query(con, query)
    except OpdError as e:
        fail(e)
    except duckdb.Error as e:
        fail(ValueError(f"SQL error: {e}"))
    if rel is None:
        return
    try:
        tbl = rel.to_arrow_table()  # a query runs here, when its rows are fetched
    except duckdb.Error as e:
        fail(ValueError(f"SQL error: {e}"))
    if fmt in ("parquet", "csv"):
        import io

        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq

        buf = io.BytesIO()
        (pq.write_table if fmt == "parquet" else pcsv.write_csv)(tbl, buf)
        if output is None:
            sys.stdout.write(buf.getvalue().decode())
        else:
            _write_output(output, buf.getvalue(), tbl.num_rows, force)
        return
    if fmt == "json":
        text = json.dumps(tbl.to_pylist(), default=str, indent=1) + "\n"
        (_write_output(output, text.encode(), tbl.num_rows, force) if output else sys.stdout.write(text))
        return
    t = Table(*tbl.column_names)
    for row in tbl.slice(0, limit).to_pylist():
        t.add_row(*("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row.values()))
    console.print(t)
    if tbl.num_rows > limit:
        console.print(f"... {tbl.num_rows - limit} more rows (use --limit, or --format csv/json/parquet)")
    if output:
        _write_output(output, json.dumps(tbl.to_pylist(), default=str).encode(), tbl.num_rows, force)


def _output_path(output: Path, root: Path, force: bool) -> Path:
    """`output` resolved (links followed), or the error that refuses it: a path under the storage root (only opd
    writes there: an artifact or a run's record overwritten by a query result would be lost), a directory, or an
    existing file without --force."""
    target = output.expanduser().resolve()
    if target.is_relative_to(root.expanduser().resolve()):
        fail(ConfigError(f"--output {output}: inside the storage root {root}; write query results outside it"))
    if target.is_dir():
        fail(ConfigError(f"--output {output}: is a directory; name a file"))
    if target.exists() and not force:
        fail(ConfigError(f"--output {output}: the file exists; pass --force to replace it"))
    return target


def _write_output(target: Path, data: bytes, rows: int, force: bool) -> None:
    """Write `data` to `target` through a temp file beside it: renamed over it with --force, else linked, which
    fails if a file appeared there since the check (never replaced unasked)."""
    import os

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        if force:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)
    except FileExistsError:
        fail(ConfigError(f"--output {target}: the file exists; pass --force to replace it"))
    except OSError as e:
        fail(ConfigError(f"--output {target}: cannot write: {e}"))
    finally:
        tmp.unlink(missing_ok=True)
    err_console.print(f"wrote {rows} rows to {target}", highlight=False)

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

    store = ArtifactStore(root_of(root))
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
        fail(e)
    n = len(refs) + len(problems)  # the problems so far are artifacts outside `refs`
    for ref in refs:
        try:
            store.verify(ref)
            if stray := store.stray_files(ref):
                problems.append(f"artifact {ref.stage}/{ref.key}: file(s) its manifest does not list: "
                                f"{', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''} (remove them, or "
                                f"`opd run --refresh {ref.stage}`)")
                continue  # one problem per artifact: the count below is of artifacts
        except OpdError as e:
            problems.append(str(e))
            continue
        if store.recorded_sha256(ref.stage, ref.key) != ref.sha256:
            from storage.seal import key_file

            record = store.layout.published_record(ref.stage, ref.key)
            problems.append(f"artifact {ref.stage}/{ref.key}: its record {record} is missing, not sealed by this "
                            f"machine's key ({key_file()}) or names another manifest: "
                            "nothing vouches for it, so a rerun recomputes it instead of using it")
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

    store = ArtifactStore(root_of(root))
    marks = set()
    for item in keep or []:
        run_name, _, it = item.rpartition(":")
        if not run_name or not it.isdigit() or not RunLineage(store.layout, run_name).exists():
            fail(ConfigError(f"--keep {item!r}: expected RUN:ITERATION naming a run under {store.root}"))
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
        fail(e)
    t = Table("what", "artifact or directory", "MB", "why", title=f"opd gc {'(dry run) ' if dry_run else ''}"
                                                                  f"under {store.root}")
    for r in todo:
        t.add_row(r.what, r.target, f"{r.bytes / 1e6:.1f}", r.why)
    console.print(t)
    total = sum(r.bytes for r in todo)
    console.print(f"would free {total / 1e6:.1f} MB in {len(todo)} removals" if dry_run else
                  f"freed {freed / 1e6:.1f} MB in {len(todo)} removals", highlight=False)
