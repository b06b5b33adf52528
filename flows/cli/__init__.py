"""The `opd` command line (`opd = "flows.cli:app"`): the app in flows/cli/app.py, its commands by job in the
modules below; importing this package registers them all."""

from flows.cli import admin, deploy, inspect, models, run  # noqa: F401 - each registers its commands on the app
from flows.cli.app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point helper
    app()
