"""The Prefect API a command talks to: the server `PREFECT_API_URL` names, or a temporary one tied to this process.

Without `PREFECT_API_URL`, Prefect itself would start a temporary server on the first flow call and stop it at
interpreter exit. Two things go wrong with that: a killed `opd run` (SIGKILL, OOM killer) leaves the server
running, holding its port and SQLite database, and at a normal exit the server is stopped while this process's
event and log workers still hold unsent items (about 150 lines of "Error flushing ... CancelledError").

`prefect_api()` starts that temporary server itself (Prefect's own `SubprocessASGIServer`: same command, same
127.0.0.1 binding, SQLite under PREFECT_HOME) with the Linux parent-death signal set in the child, so the kernel
sends it SIGTERM when this process dies, however it dies; at the end it sends this process's queued logs and
events, gives the server a moment to record them, then stops it. The server's own output goes to
`$PREFECT_HOME/opd-temporary-server.log`, not into the command's output.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from opd_tasks.errors import TransientError

_PR_SET_PDEATHSIG = 1
#: After this process's events are sent, the server's task-run recorder writes each in its own transaction; stopping
#: it in the middle cancels that write (the event is lost and the server logs "Error flushing ... CancelledError").
SETTLE_SECONDS = 0.5


def _die_with_parent(parent: int) -> None:
    """In the server's child process, before exec: SIGTERM when the parent dies (Linux; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def server_log() -> Path:
    """Where the temporary server writes its own output (its services' errors at shutdown included)."""
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value()) / "opd-temporary-server.log"


def _tied_server():
    """Prefect's temporary-server class, whose uvicorn child dies with this process and writes to `server_log()`."""
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            parent, real = os.getpid(), subprocess.Popen
            log = server_log()
            log.parent.mkdir(parents=True, exist_ok=True)

            def popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
                with open(log, "ab") as out:
                    return real(*args, preexec_fn=lambda: _die_with_parent(parent), stdout=out,
                                stderr=subprocess.STDOUT, **kwargs)

            subprocess.Popen = popen  # only for the one Popen call inside Prefect's method
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = real

    return TiedServer(port=None)


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Run the body against PREFECT_API_URL's server if set (yields it), else against a temporary server tied to
    this process (yields its URL; stopped at the end, after this process's logs and events were sent)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    server = _tied_server()
    try:
        server.start()
    except Exception as e:  # noqa: BLE001 - a timeout, a full disk under PREFECT_HOME, a port race: say what to do
        server.stop()
        from prefect.settings import PREFECT_HOME

        raise TransientError(f"the temporary Prefect server did not start ({type(e).__name__}: {e}; its output: "
                             f"{server_log()}); check that PREFECT_HOME ({PREFECT_HOME.value()}) is writable and has "
                             "free space, or set PREFECT_API_URL to a running server (docs/operations.md)") from e
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)
                EventsWorker.drain_all(timeout=10)
                time.sleep(SETTLE_SECONDS)  # the server records the last events it received (one write each)
    finally:
        server.stop()
