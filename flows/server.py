"""The Prefect API a command talks to: the server `PREFECT_API_URL` names, else a local server that this user's
commands share, else (`OPD_SERVER_IDLE_MINUTES=0`) a temporary server tied to the one command.

Three ways, in this order:
1. `PREFECT_API_URL` is set: that server (e.g. `prefect server start`, with its UI; docs/operations.md).
2. The shared local server (the default). The first command without a running one starts it, detached, as
   `python -m flows.server --idle-minutes N`: a small supervisor that runs Prefect's own server (the one Prefect's
   temporary mode runs: same command, 127.0.0.1, SQLite under `$PREFECT_HOME`) and writes where it listens to
   `$PREFECT_HOME/opd-server.json` (readable by this user only), with a random token the server requires of
   every API request (Prefect's `PREFECT_SERVER_API_AUTH_STRING`). Later commands find it there and skip the
   start (about 5 s of a cached rerun's 8), but only after checking that it is the server opd started
   (`server_is_ours`): its supervisor's pid runs `flows.server`, the socket on the recorded port is its server's,
   and the server refuses a wrong token and serves the right one. A stale record (a dead pid, a port another
   process took since) is never used: a new server starts.
   It stops itself after `OPD_SERVER_IDLE_MINUTES` (default 15) without a command using it;
   `opd server stop` stops it now. Commands hold a shared lock on `$PREFECT_HOME/opd-server.users` while they use
   it, and the supervisor stops only when it can take that lock exclusively, so it never stops under a command;
   `opd server stop` refuses then, unless `--force`.
   If the supervisor is killed, the kernel stops its server (parent-death signal).
3. `OPD_SERVER_IDLE_MINUTES=0`: a temporary server for this command alone, tied to it (parent-death signal, so a
   killed command does not leave it running), stopped at the end after this process's logs and events were sent
   and recorded (no "Error flushing ... CancelledError").

Servers write their own output to `$PREFECT_HOME/opd-server.log` (shared) or `opd-temporary-server.log`.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from opd_tasks.errors import ConfigError, TransientError

IDLE_ENV = "OPD_SERVER_IDLE_MINUTES"
DEFAULT_IDLE_MINUTES = 15.0
_PR_SET_PDEATHSIG = 1
#: After this process's events are sent, the server's task-run recorder writes each in its own transaction; stopping
#: it in the middle cancels that write (the event is lost and the server logs "Error flushing ... CancelledError").
SETTLE_SECONDS = 0.5


# ------------------------------------------------------------------------------------------------ shared facts


def idle_minutes() -> float:
    """`OPD_SERVER_IDLE_MINUTES`: how long the shared server waits unused before it stops; 0 = temporary servers."""
    raw = os.environ.get(IDLE_ENV, "").strip()
    if not raw:
        return DEFAULT_IDLE_MINUTES
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 <= value < float("inf")):
        raise ConfigError(f"{IDLE_ENV}={raw!r}: expected a number of minutes >= 0 (0: a temporary Prefect server per "
                          f"command; default {DEFAULT_IDLE_MINUTES:g})")
    return value


def _home() -> Path:
    from prefect.settings import PREFECT_HOME

    return Path(PREFECT_HOME.value())


class SharedServerFiles:
    """The shared server's files under `$PREFECT_HOME`, named once."""

    def __init__(self, home: Path | None = None):
        home = home or _home()
        # {url, pid, prefect, token, idle_minutes, started}: written by the supervisor, mode 0600
        self.state = home / "opd-server.json"
        self.users = home / "opd-server.users"  # shared lock: a command uses the server; mtime: its last use
        self.starting = home / "opd-server.start.lock"  # exclusive lock: one command at a time finds or starts it
        self.log = home / "opd-server.log"


def server_log() -> Path:
    """Where the temporary server writes its own output (its services' errors at shutdown included)."""
    return _home() / "opd-temporary-server.log"


def server_answers(url: str, timeout: float = 2.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def read_state(files: SharedServerFiles | None = None) -> dict | None:
    """The shared server's state file, or None when there is none (or it is unreadable: a stale half-write, or a
    record of another shape, e.g. an older opd's without a token)."""
    files = files or SharedServerFiles()
    try:
        state = json.loads(files.state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(state, dict) and {"url", "pid", "prefect", "token"} <= set(state)):
        return None
    return state if isinstance(state["pid"], int) and all(isinstance(state[k], str) for k in
                                                         ("url", "prefect", "token")) else None


def _auth(token: str) -> dict[str, str]:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(token.encode()).decode()}


def _is_supervisor(pid: int) -> bool | None:
    """Whether `pid` runs opd's server supervisor (`python -m flows.server`): alive and with that command line (a pid
    reused by another process is not). None where only liveness can be told (no /proc: not Linux)."""
    from storage.layout import pid_alive

    try:
        if not pid_alive(pid):
            return False
    except (OverflowError, ValueError):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return None if sys.platform != "linux" else False
    except OSError:
        return False
    return b"flows.server" in argv


def _listens(pid: int, port: int) -> bool | None:
    """Whether the socket listening on `port` belongs to `pid` or a child of it (its Prefect server), from /proc;
    None where that cannot be told (not Linux)."""
    try:
        tables = [Path(t).read_text().splitlines()[1:] for t in ("/proc/net/tcp", "/proc/net/tcp6")
                  if Path(t).exists()]
    except OSError:
        return None
    if not tables:
        return None
    sockets = {f"socket:[{f[9]}]" for rows in tables for f in (r.split() for r in rows)
               if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port}  # 0A: LISTEN
    if not sockets:
        return False
    family = {pid}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state: ppid
                family.add(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    for member in family:
        try:
            if any(os.readlink(fd) in sockets for fd in Path(f"/proc/{member}/fd").iterdir()):
                return True
        except OSError:
            continue
    return False


def server_is_ours(state: dict, timeout: float = 5.0) -> bool:
    """Whether the server `state` records is the one opd started: its supervisor runs, the socket on the recorded
    port is its server's (Linux: /proc, so the token is never sent to another process), and the server serves a
    request with the token and refuses one with another (something else answering on the port cannot know the
    token: the state file is this user's alone). No answer, or one that is not HTTP, is not ours either."""
    from urllib.parse import urlsplit

    import httpx

    if _is_supervisor(state["pid"]) is False:
        return False
    try:
        port = urlsplit(state["url"]).port
    except ValueError:
        return False
    if port is None or _listens(state["pid"], port) is False:
        return False
    try:
        bad = httpx.get(f"{state['url']}/admin/version", headers=_auth(secrets.token_urlsafe(16)), timeout=timeout)
        if bad.status_code != 401:
            return False
        good = httpx.get(f"{state['url']}/admin/version", headers=_auth(state["token"]), timeout=timeout)
    except (httpx.HTTPError, ValueError):
        return False
    return good.status_code == 200


# ------------------------------------------------------------------------------ Prefect's server, tied to us


def _die_with_parent(parent: int) -> None:
    """In the server's child process, before exec: SIGTERM when the parent dies (Linux; a no-op elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _tied_server(log: Path | None = None):
    """Prefect's temporary-server class, whose uvicorn child dies with this process and writes to `log`."""
    from prefect.server.api.server import SubprocessASGIServer

    log = log or server_log()

    class TiedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            parent, real = os.getpid(), subprocess.Popen
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


#: Free bytes PREFECT_HOME needs before a server starts there (its SQLite database, logs and migrations); with
#: less, the server would hang migrating until the start timeout (180 s) instead of failing.
MIN_FREE_BYTES = 64 << 20


def _check_home() -> None:
    """TransientError at once, naming PREFECT_HOME, when it is not writable or has under MIN_FREE_BYTES free."""
    import shutil

    home = _home()
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".opd-probe-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
        free = shutil.disk_usage(home).free
    except OSError as e:
        raise TransientError(f"PREFECT_HOME ({home}) is not writable ({e.strerror or e}), so no Prefect server can "
                             "start there: free space or fix its permissions, or set PREFECT_HOME elsewhere, or "
                             "PREFECT_API_URL to a running server") from e
    if free < MIN_FREE_BYTES:
        raise TransientError(f"PREFECT_HOME ({home}) has {free / 2**20:.0f} MiB free, under the "
                             f"{MIN_FREE_BYTES >> 20} MiB a Prefect server needs: free space, or set PREFECT_HOME "
                             "elsewhere, or PREFECT_API_URL to a running server")


def _did_not_start(e: BaseException, log: Path) -> TransientError:
    return TransientError(f"the local Prefect server did not start ({type(e).__name__}: {e}; its output: {log}); "
                          f"check that PREFECT_HOME ({_home()}) is writable and has free space, or set "
                          "PREFECT_API_URL to a running server (docs/operations.md)")


# ------------------------------------------------------------------------------------------------- the API


@contextmanager
def prefect_api(announce: Callable[[str], None] | None = None) -> Iterator[str]:
    """Run the body against a Prefect API (see the module docstring for which); yields its URL. At the end, this
    process's queued logs and events are sent. `announce` gets one line saying which server is used."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    from flows.logs import terse_expected_failures

    terse_expected_failures()  # an expected failure is one line on the terminal, its traceback in the API log
    say = announce or (lambda line: None)
    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    idle = idle_minutes()
    _check_home()  # a full or read-only PREFECT_HOME fails now, not after the start timeout
    server = _shared_server(idle, say) if idle > 0 else _temporary_server(say)
    with server as (url, token), temporary_settings({PREFECT_API_URL: url, **({PREFECT_API_AUTH_STRING: token}
                                                                            if token else {})}):
        try:
            yield url
        finally:
            _drain()
            if idle == 0:
                time.sleep(SETTLE_SECONDS)  # the server records the last events it received (one write each)


def _drain() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


@contextmanager
def _temporary_server(say: Callable[[str], None]) -> Iterator[str]:
    server = _tied_server()
    try:
        server.start()
    except Exception as e:  # noqa: BLE001 - a timeout, a full disk under PREFECT_HOME, a port race: say what to do
        server.stop()
        raise _did_not_start(e, server_log()) from e
    say(f"Prefect: a temporary server on {server.api_url} for this command ({IDLE_ENV}=0)")
    try:
        yield server.api_url, None
    finally:
        server.stop()


@contextmanager
def _flock(path: Path, how: int) -> Iterator[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, how)
        yield f


@contextmanager
def _shared_server(idle: float, say: Callable[[str], None]) -> Iterator[str]:
    """Use the shared local server, starting it first when none that is ours answers; hold the users lock while in
    use. Yields its URL and token."""
    from prefect import __version__

    files = SharedServerFiles()
    with ExitStack() as in_use:
        try:
            with _flock(files.starting, fcntl.LOCK_EX):  # one command at a time finds or starts it
                users = in_use.enter_context(_flock(files.users, fcntl.LOCK_SH))  # waits while one is stopping
                state = read_state(files)
                if state and state["prefect"] == __version__ and server_is_ours(state):
                    say(f"Prefect: the local server on {state['url']} (pid {state['pid']}; `opd server stop` "
                        "stops it)")
                else:
                    state = _start_supervisor(files, idle, stale=state)
                    say(f"Prefect: started a local server on {state['url']}; it stops after {idle:g} min unused "
                        f"({IDLE_ENV}; `opd server stop` stops it now)")
        except OSError as e:  # PREFECT_HOME not writable, or full
            raise _did_not_start(e, files.log) from e
        os.utime(users.fileno())  # the last use, which the supervisor's idle clock counts from
        try:
            yield state["url"], state["token"]
        finally:
            os.utime(users.fileno())


def _start_supervisor(files: SharedServerFiles, idle: float, stale: dict | None) -> dict:
    """Start `python -m flows.server` detached (its own session: a Ctrl-C of this command does not reach it) and
    wait until its state file names a server that is ours; returns that state. A `stale` record's supervisor of
    another Prefect version (an upgraded venv) is stopped first; any other is left to stop when idle (it may only
    have been slow to answer, with commands still using it), and a stale pid that another process took since is
    never signalled."""
    from prefect import __version__
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if stale and stale.get("prefect") != __version__:
        _stop_pid(stale)
    files.state.unlink(missing_ok=True)
    with open(files.log, "ab") as out:
        child = subprocess.Popen([sys.executable, "-m", "flows.server", "--idle-minutes", f"{idle:g}"],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True)
    deadline = time.monotonic() + float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()) + 30
    while time.monotonic() < deadline:
        state = read_state(files)
        if state and state["pid"] == child.pid and server_is_ours(state):
            child.returncode = 0  # detached on purpose: no "subprocess still running" warning when this process ends
            return state
        if child.poll() is not None:
            raise _did_not_start(RuntimeError(f"its supervisor exited with code {child.returncode}"), files.log)
        time.sleep(0.1)
    child.terminate()
    raise _did_not_start(TimeoutError("no answer in time"), files.log)


def _stop_pid(state: dict) -> bool:
    """SIGTERM the supervisor `state` names, if that pid is known to run opd's supervisor (`_is_supervisor`)."""
    if _is_supervisor(state["pid"]) is not True:
        return False
    try:
        os.kill(state["pid"], signal.SIGTERM)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_shared_server(timeout: float = 30.0, force: bool = False) -> dict | None:
    """`opd server stop`: SIGTERM the shared server's supervisor and wait until it is gone; its state, or None.
    ConfigError while a command uses the server (it holds the users lock), unless `force`; while stopping, this
    holds the lock, so that no command adopts the server that is going."""
    files = SharedServerFiles()
    with _flock(files.users, fcntl.LOCK_SH) as users:
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not force:
                raise ConfigError("opd server stop: a command is using the local Prefect server (it would lose "
                                  "its connection); wait for it, or pass --force") from None
        state = read_state(files)
        if state is None or not _stop_pid(state):
            files.state.unlink(missing_ok=True)
            return None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (files.state.exists() or server_answers(state["url"], timeout=0.5)):
            time.sleep(0.1)
        return state


# ----------------------------------------------------------------------------------------- the supervisor


def supervise(idle: float, poll_seconds: float = 2.0) -> int:
    """The shared server's process: start Prefect's server, publish where it listens, stop it after `idle` minutes
    in which no command used it (or on SIGTERM / SIGINT, or when the server itself exits)."""
    from prefect import __version__

    files = SharedServerFiles()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    token = secrets.token_urlsafe(24)
    # the server requires it of every request but its health check; this process's own client sends it
    os.environ["PREFECT_SERVER_API_AUTH_STRING"] = os.environ["PREFECT_API_AUTH_STRING"] = token
    server = _tied_server(files.log)
    try:
        server.start()
        tmp = files.state.with_suffix(".json.tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the token: this user's alone
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"url": server.api_url, "pid": os.getpid(), "prefect": __version__, "token": token,
                       "idle_minutes": idle, "started": time.time()}, f)
        os.replace(tmp, files.state)
        files.users.touch()
        with open(files.users, "a+") as users:
            while not stop.wait(poll_seconds):
                if server.server_process is None or server.server_process.poll() is not None:
                    break  # the server died: nothing to supervise (the next command starts a new one)
                if time.time() - files.users.stat().st_mtime < idle * 60:
                    continue
                try:  # unused for `idle` minutes, and no command holds the lock: stop, holding it, so that no
                    fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)  # command adopts a server that is stopping
                except BlockingIOError:
                    continue
                break
            if (read_state(files) or {}).get("pid") == os.getpid():
                files.state.unlink(missing_ok=True)
            server.stop()
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.server", description="The shared local Prefect server "
                                 "(started by opd commands; see flows/server.py). Stops after IDLE minutes unused.")
    ap.add_argument("--idle-minutes", type=float, default=DEFAULT_IDLE_MINUTES)
    return supervise(ap.parse_args(argv).idle_minutes)


if __name__ == "__main__":
    sys.exit(main())
