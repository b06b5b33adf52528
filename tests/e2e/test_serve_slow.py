"""End to end (slow): a real `prefect server start` on a free localhost port, `opd serve` serving the distill
deployment, two `prefect deployment run` triggers; the second continues the run from the first's checkpoint.
Tiny random models keep the compute small; the orchestration is all real."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from storage.lineage import RunLineage
from tests.helpers import tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str, procs=()):
    t0 = time.time()
    while time.time() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: a process exited early with {p.returncode}")
        try:
            v = pred()
            if v:
                return v
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


@pytest.mark.slow
def test_served_deployment_runs_and_continues(tmp_path: Path) -> None:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results")}
    s_dir, _ = tiny_model_dir(tmp_path / "student", seed=0, hidden=32)
    t_dir, _ = tiny_model_dir(tmp_path / "teacher", seed=1, hidden=48)
    root = tmp_path / "root"
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=open(logs / "server.log", "w"), stderr=subprocess.STDOUT)
    served = None
    try:
        _wait(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, 180, "prefect server",
              [server])
        sets = [f"models.student.path={s_dir}", f"models.teacher.path={t_dir}", f"root={root}",
                "data.prompts_per_iteration=4", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6",
                "evaluation.max_new_tokens=6", "data.eval_size=4", "analysis.probe_tokens=4"]
        cmd = [sys.executable, "-m", "flows.cli", "serve", "--name", "nightly", "--cron", "0 3 * * *"]
        for s in sets:
            cmd += ["--set", s]
        served = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(logs / "serve.log", "w"),
                                  stderr=subprocess.STDOUT)
        from prefect.client.orchestration import get_client

        def deployment():
            with get_client(sync_client=True) as c:
                return c.read_deployment_by_name("distill/nightly")

        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):  # this process's client talks to the test server
            dep = _wait(deployment, 120, "deployment distill/nightly", [server, served])
            assert dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *"

            def trigger_and_wait() -> str:
                out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "distill/nightly"], env=env,
                                     capture_output=True, text=True, timeout=120)
                assert out.returncode == 0, out.stdout + out.stderr
                # The id of the run we created (the cron schedule also creates future runs of this deployment).
                m = re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout)
                assert m, out.stdout
                with get_client(sync_client=True) as c:
                    fr = c.read_flow_run(m.group(1))
                    assert fr.deployment_id == dep.id

                    def final():
                        st = c.read_flow_run(fr.id).state
                        return st if st is not None and st.is_final() else None

                    st = _wait(final, 300, "flow run to finish", [server, served])
                return st.name

            assert trigger_and_wait() == "Completed", (logs / "serve.log").read_text()[-3000:]
            assert trigger_and_wait() == "Completed", (logs / "serve.log").read_text()[-3000:]
            lin = RunLineage(root, "nightly")
            its = sorted({e.iteration for e in lin.entries() if e.stage == "update"})
            assert its == [0, 1]  # the second run continued from the first's checkpoint
            with get_client(sync_client=True) as c:
                from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

                arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                    any_=["opd-nightly-report"])))
            assert arts and "nightly: iteration" in (arts[0].data if isinstance(arts[0].data, str)
                                                     else json.dumps(arts[0].data))
    finally:
        if served is not None:
            _stop(served)
        _stop(server)
