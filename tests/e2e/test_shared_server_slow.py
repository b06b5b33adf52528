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
