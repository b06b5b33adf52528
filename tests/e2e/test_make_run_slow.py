"""End to end (slow): the `opd run` path that `make run` takes, on the committed testbed models, in a child
process with its own Prefect home and storage root; then a rerun that is all cache hits, SQL over the result,
and `opd verify`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPD = [sys.executable, "-m", "flows.cli"]


def _run(args: list[str], env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(OPD + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_opd_run_on_testbed_then_cached_rerun(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "OPD_HOME": str(tmp_path / "opd"),
           "COLUMNS": "200", "OPD_SERVER_IDLE_MINUTES": "5"}  # as `make run` runs: the shared local server
    env.pop("PREFECT_API_URL", None)
    small = ["--set", "data.prompts_per_iteration=8", "--set", "data.eval_size=20", "-n", "1", "--name", "e2e"]
    try:
        first = _run(["run", "--config", "configs/testbed.yaml", *small], env)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        assert "accuracy on 20 held-out prompts per iteration (baseline" in first.stdout and "opd sql" in first.stdout
        # Security default: the local Prefect server binds to the loopback address only.
        url = re.search(r"Prefect: started a local server on (http://127\.0\.0\.1:\d+/api)", first.stdout)
        assert url, first.stdout[:3000]
        second = _run(["run", "--config", "configs/testbed.yaml", *small], env)
        assert second.returncode == 0, second.stderr[-3000:]
        assert f"Prefect: the local server on {url.group(1)}" in second.stdout  # reused, not started again
    finally:
        _run(["server", "stop"], env)
    for out in (first, second):  # clean output: no server shutdown noise (flows/server.py), and in a file (not a
        text = out.stdout + out.stderr  # terminal) no progress bars: each stage is the runner's one log line
        assert "Traceback" not in text and "Error flushing" not in text
        assert not re.search(r"\d+%\|", text), text[-2000:]
    q = "SELECT stage, bool_and(cached) AS all_cached, count(*) AS n FROM lineage WHERE run='e2e' GROUP BY 1"
    out = _run(["sql", q, "--format", "json"], env)
    assert out.returncode == 0, out.stderr
    rows = {r["stage"]: r for r in json.loads(out.stdout)}
    assert {"prompts", "rollout", "score", "analyze", "update", "evaluate", "baseline"} <= set(rows)
    assert all(r["all_cached"] for r in rows.values()), rows  # the latest pointers come from the cached rerun
    acc = _run(["sql", "SELECT count(*) AS n FROM evals WHERE run='e2e' AND stage='evaluate'", "--format", "json"],
               env)
    assert json.loads(acc.stdout) == [{"n": 20}]
    ver = _run(["verify", "e2e"], env)
    assert ver.returncode == 0 and "artifacts OK" in ver.stdout


@pytest.mark.slow
def test_the_consequential_fork_with_the_oracle_detector(tmp_path: Path) -> None:
    """The mechanism switch end to end: the fork condition's models, the oracle detector, and `fork` tokens in the
    tokens table, every one classified `divergent`; the evaluations report the early-stop rate."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "OPD_HOME": str(tmp_path / "opd"), "COLUMNS": "200"}
    env.pop("PREFECT_API_URL", None)
    out = _run(["run", "--set", "data.testbed.fork=consequential", "--set", "analysis.detector=oracle", "-n", "1",
                "--set", "data.prompts_per_iteration=8", "--set", "data.eval_size=20", "--name", "fork"], env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "student testbed:student-consequential" in out.stdout and "teacher testbed:teacher-fork" in out.stdout
    q = "SELECT role, regime, count(*) AS n FROM tokens WHERE run='fork' GROUP BY ALL"
    rows = json.loads(_run(["sql", q, "--format", "json"], env).stdout)
    forks = {r["regime"]: r["n"] for r in rows if r["role"] == "fork"}
    assert forks and set(forks) <= {"divergent", "normal"} and forks.get("divergent", 0) > 0, rows
    shown = _run(["show", "fork", "-i", "0", "-s", "evaluate"], env)
    assert shown.returncode == 0 and '"early_stop_rate"' in shown.stdout, shown.stdout[-2000:]
