"""The temporary Prefect server of `opd run` dies with it (slow): SIGKILL the command while it runs, and the server
it started stops answering within seconds instead of holding its port and database forever (flows/server.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_killed_run_takes_its_temporary_server_with_it(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "OPD_HOME": str(tmp_path / "opd")}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", "configs/testbed.yaml", "-n", "3", "--name", "k"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, seen = None, []
    try:
        for line in proc.stdout:  # the server announces itself before the flow starts
            seen.append(line)
            if m := re.search(r"Starting temporary server on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1) + "/api"
                break
        assert url is not None, "".join(seen)[-3000:]
        deadline = time.time() + 120
        while not _answers(url):
            assert time.time() < deadline and proc.poll() is None, "".join(seen)[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        deadline = time.time() + 30
        while _answers(url):
            assert time.time() < deadline, f"the temporary server at {url} outlived the killed opd run"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
