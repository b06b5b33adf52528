"""Housekeeping commands: `opd config show`, `opd server status|stop`, `opd bootstrap`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.app import (
    ConfigOpt,
    SetOpt,
    app,
    config_app,
    console,
    fail,
    load,
    server_app,
)
from opd_tasks.errors import ConfigError, OpdError


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    from opd_tasks.config_files import dump_config

    try:
        cfg = load(config, set_ or [])
    except OpdError as e:
        fail(e)
    sys.stdout.write(dump_config(cfg))

@server_app.command("status")
def server_status() -> None:
    """Whether the shared local Prefect server runs, where, and when it stops by itself."""
    from flows.server import IDLE_ENV, idle_minutes, read_state, server_is_ours

    state = read_state()
    if state is None or not server_is_ours(state):
        console.print(f"no local Prefect server runs for this PREFECT_HOME; the next opd run starts one "
                      f"({IDLE_ENV}={idle_minutes():g})", highlight=False)
        raise typer.Exit(1)
    console.print(f"local Prefect server on {state['url']} (pid {state['pid']}, Prefect {state['prefect']}); it "
                  f"stops after {state['idle_minutes']:g} min unused", highlight=False)


@server_app.command("stop")
def server_stop(
    force: Annotated[bool, typer.Option("--force", help="Stop it even while a command uses it (that command loses "
                                        "its connection).")] = False,
) -> None:
    """Stop the shared local Prefect server now; while a command uses it, only with --force."""
    from flows.server import stop_shared_server

    try:
        state = stop_shared_server(force=force)
    except OpdError as e:
        fail(e)
    console.print(f"stopped the local Prefect server on {state['url']} (pid {state['pid']})" if state else
                  "no local Prefect server was running", highlight=False)

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
        fail(ConfigError(f"--out {out} exists and is not an empty directory: nothing was written. Give a new "
                          "directory, or --replace-shipped to overwrite the committed testbed models"))
    argv = ["--out", str(out), "--seed", str(seed), "--teacher-style", teacher_style]
    argv += ["--quick"] if quick else []
    argv += ["--fork"] if fork else []
    try:
        rc = bs.main(argv)
    except OpdError as e:
        fail(e)
    if not rc and not replace_shipped:
        models = ("teacher", "student-consequential") if fork else ("teacher", "student")
        console.print(f"models in {out}; use them with --set models.teacher.path={out / models[0]} "
                      f"--set models.student.path={out / models[1]}", highlight=False)
    raise typer.Exit(rc or 0)
