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
from tests.helpers import assert_no_pickle_persisted, tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _not_up_yet() -> tuple[type[BaseException], ...]:
    """What `pred` may raise while a server or deployment is still coming up: connection errors (urllib's are
    OSErrors), HTTP errors, and Prefect's 'not found'. Anything else is a bug and fails at once."""
    import httpx
    from prefect.exceptions import ObjectNotFound

    return OSError, httpx.HTTPError, ObjectNotFound


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
        except _not_up_yet():
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real `prefect server start` on a free localhost port, with its own PREFECT_HOME."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "ph"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "results")}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: urllib.request.urlopen(f"{api}/health", timeout=2).status == 200, 180, "prefect server",
              [proc])
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):  # this process's client talks to the test server
            yield {"env": env, "api": api, "proc": proc}
            # Send this process's queued logs and events while the server is up; left for interpreter exit, they
            # would retry against the stopped server for about a minute ("Error logging to API").
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    tmp = tmp_path_factory.mktemp("tiny")
    s_dir, _ = tiny_model_dir(tmp / "student", seed=0, hidden=32)
    t_dir, _ = tiny_model_dir(tmp / "teacher", seed=1, hidden=48)
    return [f"models.student.path={s_dir}", f"models.teacher.path={t_dir}", "data.prompts_per_iteration=4",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=6", "evaluation.max_new_tokens=6",
            "data.eval_size=4", "analysis.probe_tokens=4", "gates.max_truncated=null",
            "gates.min_topk_coverage=null", "gates.min_headroom=null"]


def _trigger_and_wait(server, dep, name: str, watch) -> str:
    from prefect.client.orchestration import get_client

    out = subprocess.run([str(BIN / "prefect"), "deployment", "run", f"distill/{name}"], env=server["env"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    # The id of the run we created (a cron schedule also creates future runs of the deployment).
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout)
    assert m, out.stdout
    with get_client(sync_client=True) as c:
        fr = c.read_flow_run(m.group(1))
        assert fr.deployment_id == dep.id

        def final():
            st = c.read_flow_run(fr.id).state
            return st if st is not None and st.is_final() else None

        return _wait(final, 300, "flow run to finish", [server["proc"], *watch]).name


def _deployment(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:
        return c.read_deployment_by_name(f"distill/{name}")


def _check_two_runs_continue(server, dep, name: str, root: Path, watch, log: Path) -> None:
    assert _trigger_and_wait(server, dep, name, watch) == "Completed", log.read_text()[-3000:]
    assert _trigger_and_wait(server, dep, name, watch) == "Completed", log.read_text()[-3000:]
    its = sorted({e.iteration for e in RunLineage(root, name).entries() if e.stage == "update"})
    assert its == [0, 1]  # the second run continued from the first's checkpoint
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"opd-{name}-report"])))
    data = arts[0].data if arts and isinstance(arts[0].data, str) else json.dumps(arts[0].data if arts else None)
    assert f"{name}: iteration" in data


@pytest.mark.slow
def test_served_deployment_runs_and_continues(server, tiny, tmp_path: Path) -> None:
    root = tmp_path / "root"
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--name", "nightly", "--cron", "0 3 * * *"]
    for s in [*tiny, f"root={root}"]:
        cmd += ["--set", s]
    log = tmp_path / "serve.log"
    served = subprocess.Popen(cmd, cwd=REPO, env=server["env"], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        dep = _wait(lambda: _deployment("nightly"), 120, "deployment distill/nightly", [server["proc"], served])
        assert dep.schedules and dep.schedules[0].schedule.cron == "0 3 * * *"
        _check_two_runs_continue(server, dep, "nightly", root, [served], log)
    finally:
        _stop(served)


@pytest.mark.slow
def test_deployment_on_process_work_pool(server, tiny, tmp_path: Path) -> None:
    env = server["env"]
    root = tmp_path / "root"
    out = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "local-test", "--type", "process"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    cmd = [sys.executable, "-m", "flows.cli", "deploy", "--pool", "local-test", "--name", "pooled"]
    for s in [*tiny, f"root={root}"]:
        cmd += ["--set", s]
    dep_out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert dep_out.returncode == 0, dep_out.stdout + dep_out.stderr
    dep = _deployment("pooled")
    assert dep.work_pool_name == "local-test"
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "local-test"], cwd=tmp_path,
                              env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _check_two_runs_continue(server, dep, "pooled", root, [worker], log)
    finally:
        _stop(worker)


def _summary_shas(out: dict) -> dict[tuple[int, str], str]:
    return {(it["iteration"], r["stage"]): r["sha256"] for it in out["iterations"] for r in it["stages"]}


def _summary_states(out: dict) -> dict[tuple[int, str], str]:
    return {(it["iteration"], r["stage"]): r["state"] for it in out["iterations"] for r in it["stages"]}


@pytest.mark.slow
def test_one_deployment_per_gpu_stage_on_process_work_pool(server, tiny, tmp_path: Path) -> None:
    """`opd deploy-stages` on a process pool + a real worker; `distill` with stage_runner=deployment runs each GPU
    stage as a child flow run of its deployment. The artifacts equal an inline run's (the inline rerun in the
    same root is all cache hits; in a fresh root it recomputes the same bytes), and a failing stage is an error
    that names the stage, the iteration and the child flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.distill import distill
    from opd_tasks.config_files import load_config
    from opd_tasks.errors import TransientError
    from opd_tasks.stages import gpu_stages

    env = {**server["env"], "PREFECT_WORKER_QUERY_SECONDS": "1"}
    out = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "gpu-test", "--type", "process"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    dep_out = subprocess.run([sys.executable, "-m", "flows.cli", "deploy-stages", "--pool", "gpu-test"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=180)
    assert dep_out.returncode == 0, dep_out.stdout + dep_out.stderr
    with get_client(sync_client=True) as c:
        deps = {s: c.read_deployment_by_name(f"opd-stage/{s}") for s in gpu_stages()}
    assert {d.work_pool_name for d in deps.values()} == {"gpu-test"} and deps["score"].tags == ["gpu"]
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "gpu-test"], cwd=tmp_path,
                              env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    common = [*tiny, "iterations=1", "method=topd", "orchestration.retry_delay_seconds=0"]
    deployed = ["orchestration.stage_runner=deployment", "orchestration.stage_poll_seconds=0.5"]
    try:
        root = tmp_path / "a"
        state = distill(load_config(None, [*common, *deployed, f"root={root}"]).model_dump(mode="json"),
                        return_state=True)
        assert state.is_completed(), log.read_text()[-3000:]
        via_deployments = state.result()
        assert set(_summary_states(via_deployments).values()) == {"Completed"}
        # One child flow run per GPU stage call, of the deployment of its stage, all completed.
        labels = {"baseline": "evaluate", "rollout": "rollout", "score": "score", "gates": "gates",
                  "analyze": "analyze", "update": "update", "evaluate": "evaluate"}
        with get_client(sync_client=True) as c:
            children = c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        by_id = {d.id: s for s, d in deps.items()}
        assert sorted((fr.name, by_id.get(fr.deployment_id), fr.state.name) for fr in children) == sorted(
            (f"testbed-it0-{label}", stage, "Completed") for label, stage in labels.items())
        # Each ArtifactRef came back as the child flow run's JSON result under <root>/prefect/results.
        results = [json.loads(f.read_text()) for f in (root / "prefect" / "results").iterdir()
                   if re.fullmatch(r"[0-9a-f]{32}", f.name)]
        assert len(results) == len(labels)
        assert {r["__class__"] for r in results} == {"storage.refs.ArtifactRef"}
        assert {r["data"]["sha256"] for r in results} == {r["sha256"] for r in via_deployments[
            "iterations"][0]["stages"] if r["stage"] != "prompts"} | {RunLineage(root, "testbed").get(
                0, "baseline").ref.sha256}

        # The same config inline, same root: every stage is a cache hit on the children's records and artifacts.
        inline = distill(load_config(None, [*common, f"root={root}"]).model_dump(mode="json"))
        assert set(_summary_states(inline).values()) == {"Cached"}
        assert _summary_shas(inline) == _summary_shas(via_deployments)
        # ... and in a fresh root it recomputes the same bytes.
        fresh = distill(load_config(None, [*common, f"root={tmp_path / 'b'}"]).model_dump(mode="json"))
        assert set(_summary_states(fresh).values()) == {"Completed"}
        assert _summary_shas(fresh) == _summary_shas(via_deployments)

        # Sharded stages through the deployments: each shard of rollout, score, analyze and evaluate is a child flow
        # run of its stage's deployment (with a `shard` parameter); the merged artifacts equal an unsharded inline
        # run's.
        small = ["rollout.batch_size=4", "scoring.batch_size=4", "analysis.batch_size=2", "evaluation.batch_size=2",
                 "name=sharded"]
        sharded = distill(load_config(None, [*common, *deployed, *small, "orchestration.shards=2",
                                             f"root={tmp_path / 'c'}"]).model_dump(mode="json"), return_state=True)
        assert sharded.is_completed(), log.read_text()[-3000:]
        unsharded = distill(load_config(None, [*common, *small, f"root={tmp_path / 'd'}"]).model_dump(mode="json"))
        assert _summary_shas(sharded.result()) == _summary_shas(unsharded)
        with get_client(sync_client=True) as c:
            names = {fr.name for fr in c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[sharded.state_details.flow_run_id])))}
        assert {f"sharded-it0-{label}-shard{i}" for label in ("baseline", "rollout", "score", "analyze", "evaluate")
                for i in (0, 1)} <= names

        # A failing stage (the injected fault, no retries; --refresh so that it runs) fails the run with an error
        # naming the stage, the iteration and the child flow run. Its baseline child was a cache hit: cached.
        faulty = load_config(None, [*common, *deployed, f"root={root}", "name=faulty", "fault.stage=rollout",
                                    "fault.iteration=0", "orchestration.retries=0"])
        with pytest.raises(TransientError, match=r"stage 'rollout' \(deployment opd-stage/rollout\) at iteration 0: "
                                                 r"its flow run 'faulty-it0-rollout' \([0-9a-f-]{36}\) ended Failed: "
                                                 r".*injected fault"):
            distill(faulty.model_dump(mode="json"), refresh=["rollout"])
        assert_no_pickle_persisted(root)  # the failed flow's exception is persisted as JSON, not pickled
        baseline = RunLineage(root, "faulty").get(0, "baseline")
        assert baseline.cached is True
        assert baseline.ref.sha256 == RunLineage(root, "testbed").get(0, "baseline").ref.sha256
    finally:
        _stop(worker)
