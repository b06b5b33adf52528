"""The `opd` application: the typer app, its sub-apps, the options and helpers every command shares.

Commands live in the modules beside it (flows/cli/__init__.py lists them); each is a thin layer over a function
in opd_tasks, storage or flows. Heavy imports (torch, prefect) happen inside the commands that need them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from opd_tasks.errors import ConfigError, OpdError


class _Commands(TyperGroup):
    """The command group: an OpdError that a command did not turn into its own message (a damaged run record, a
    bad file found deep in a stage) still ends as one `error:` line and exit status 2, not a traceback.
    OPD_DEBUG=1 lets it through with its traceback."""

    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        try:
            return super().invoke(ctx)
        except OpdError as e:
            if os.environ.get("OPD_DEBUG"):
                raise
            fail(e)


app = typer.Typer(
    cls=_Commands,
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
models_app = typer.Typer(help="Real models without a hub: import a GGUF file, list what is imported.",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")

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


def announce(line: str) -> None:
    """Which Prefect server a command uses (flows/server.py), in the command's output."""
    console.print(line, style="dim", highlight=False, markup=False)


def fail(e: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(2)


def root_of(root: Path | None) -> Path:
    from storage.layout import default_root

    return root if root is not None else default_root()


def csv_list(value: str, what: str, conv=str) -> list:
    try:
        items = [conv(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError as e:
        raise OpdError(f"{what}: cannot parse {value!r} as a comma-separated list ({e})") from e
    if not items:
        raise OpdError(f"{what}: empty list {value!r}")
    return items


def load(config: Path | None, overrides: list[str]):
    """The run config of `--config` and `--set` (and the command's own overrides), checked against the stage table
    (`check_config`) as a run checks it when it opens."""
    from opd_tasks.config_files import load_config
    from opd_tasks.stages import check_config

    cfg = load_config(config, overrides)
    check_config(cfg)
    return cfg


def refresh_names(values: list[str] | None) -> list[str]:
    """`--refresh` values, each a stage of the table (a typer callback: checked while the arguments are parsed)."""
    from opd_tasks.pipeline import check_refresh

    try:
        check_refresh(values or [])
    except ConfigError as e:
        fail(e)
    return values or []
