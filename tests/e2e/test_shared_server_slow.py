"""The local Prefect server that opd commands share (flows/server.py), for real (slow): a second command reuses it
instead of starting one; it does not stop while a command uses it, and stops by itself once unused for its idle
time; `opd server stop` stops it; a killed supervisor takes its server with it and the next command starts anew."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import __version__ as PREFECT_VERSION

from flows.server import SharedServerFiles, server_answers

REPO = Path(__file__).resolve().parents[2]
#: A command that uses the API: prints the line prefect_api announces and the URL, holds it `argv[1]` seconds.
USE = ("import sys, time\nfrom flows.server import prefect_api\nwith prefect_api(print) as url:\n"
       "    print('URL', url, flush=True)\n    time.sleep(float(sys.argv[1]))\n")


def _env(tmp_path: Path, idle_minutes: str) -> dict:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "OPD_SERVER_IDLE_MINUTES": idle_minutes}
    env.pop("PREFECT_API_URL", None)
    return env


def _use(env: dict, hold: float = 0) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", USE, str(hold)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    url = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("URL "))
    return url, out.stdout


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by whoever adopted it, is not)."""
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except FileNotFoundError:
        return False


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.25)


@pytest.mark.slow
def test_reused_while_in_use_then_stops_when_idle(tmp_path: Path) -> None:
    env = _env(tmp_path, "0.05")  # 3 s of idleness stops it
    files = SharedServerFiles(tmp_path / "ph")
    url, said = _use(env)
    assert "started a local server on http://127.0.0.1:" in said
    state = json.loads(files.state.read_text())
    assert state["url"] == url and server_answers(url)
    # A command that holds the server for 10 s, longer than the idle time: the server must outlive it.
    holder = subprocess.Popen([sys.executable, "-c", USE, "10"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = holder.stdout.readline() + holder.stdout.readline()
        assert f"the local server on {url}" in first, first  # reused, not started again
        time.sleep(7)
        assert server_answers(url), "the shared server stopped while a command was using it"
        assert holder.wait(60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    _wait(lambda: not server_answers(url) and not files.state.exists(), 60,
          "the shared server did not stop by itself after its idle time")
    _wait(lambda: not _alive(state["pid"]), 30, "the supervisor outlived its server")


@pytest.mark.slow
def test_opd_server_stop_and_a_killed_supervisor(tmp_path: Path) -> None:
    env = _env(tmp_path, "30")
    opd = [sys.executable, "-m", "flows.cli", "server"]
    url, _ = _use(env)
    status = subprocess.run([*opd, "status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and url in status.stdout, status.stdout + status.stderr
    stop = subprocess.run([*opd, "stop"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and f"stopped the local Prefect server on {url}" in stop.stdout, stop.stdout
    assert not server_answers(url)
    status = subprocess.run([*opd, "status"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 1 and "no local Prefect server runs" in status.stdout
    # SIGKILL the supervisor: the kernel stops its server; the stale state file does not fool the next command.
    url, _ = _use(env)
    state = json.loads(SharedServerFiles(tmp_path / "ph").state.read_text())
    os.kill(state["pid"], signal.SIGKILL)
    _wait(lambda: not server_answers(url), 30, "the server outlived its killed supervisor")
    url2, said = _use(env)
    assert "started a local server" in said and server_answers(url2)
    subprocess.run([*opd, "stop"], cwd=REPO, env=env, capture_output=True, timeout=120)


#: Something else on a loopback port: answers every request 200 with an empty JSON object, and logs each path.
FAKE = ("import http.server, sys\nclass H(http.server.BaseHTTPRequestHandler):\n"
        "    def answer(self):\n        open(sys.argv[2], 'a').write(self.path + '\\n')\n"
        "        self.send_response(200); self.send_header('Content-Type', 'application/json'); self.end_headers()\n"
        "        self.wfile.write(b'{}')\n    do_GET = do_POST = do_PATCH = do_PUT = answer\n"
        "    def log_message(self, *a): pass\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")


@pytest.mark.slow
def test_a_stale_record_and_an_impostor_are_never_used(tmp_path: Path) -> None:
    """A record whose pid is dead, alive but not opd's supervisor, or our supervisor's with another process's port,
    where something answers every request: the command starts its own server and sends the impostor nothing (not
    the token either); `opd server stop` refuses while a command uses the server, and stops it with --force."""
    import socket

    env = _env(tmp_path, "30")
    files = SharedServerFiles(tmp_path / "ph")
    files.state.parent.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen = tmp_path / "impostor.log"
    fake = subprocess.Popen([sys.executable, "-c", FAKE, str(port), str(seen)])
    try:
        fake_url = f"http://127.0.0.1:{port}/api"
        _wait(lambda: server_answers(fake_url), 30, "the impostor did not start")
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        real, started = None, []
        for case in ("dead pid", "a live pid that is no supervisor", "our supervisor's pid, another's port"):
            if case == "our supervisor's pid, another's port":
                _, said = _use(env)
                real = json.loads(files.state.read_text())
                record = {**real, "url": fake_url}  # the token is right; the server on that port does not know it
            else:
                record = {"url": fake_url, "pid": dead.pid if case == "dead pid" else fake.pid,
                          "prefect": PREFECT_VERSION, "token": "guessed", "idle_minutes": 30, "started": 0}
            files.state.write_text(json.dumps(record))
            url, said = _use(env)
            assert "started a local server" in said and url != fake_url, (case, said)
            assert server_answers(url) and json.loads(files.state.read_text())["url"] == url
            started.append(json.loads(files.state.read_text())["pid"])
        # only our own readiness probe reached it: the port is not our supervisor's server's (/proc), so not even
        # the token check was sent there, nor any flow run, log or event
        assert seen.read_text().split() == ["/api/health"]
        assert fake.poll() is None  # the stale pid that is no supervisor was not signalled
        assert _alive(real["pid"])  # ours, replaced in the record, is left to stop when idle (it may be in use)
    finally:
        fake.kill()
        for pid in started[:-1]:  # the servers the record no longer names (the last one is stopped below)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    opd = [sys.executable, "-m", "flows.cli", "server", "stop"]
    holder = subprocess.Popen([sys.executable, "-c", USE, "60"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = next(line.split()[1] for line in iter(holder.stdout.readline, "") if line.startswith("URL "))
        stop = subprocess.run(opd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 2 and "a command is using the local Prefect server" in stop.stderr, stop.stderr
        assert server_answers(url)
        stop = subprocess.run([*opd, "--force"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0 and f"stopped the local Prefect server on {url}" in stop.stdout, stop.stdout
    finally:
        holder.kill()
