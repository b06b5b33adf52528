"""A refused command changes nothing (issue 18): `opd run` / `opd experiment` validate every flag before the Prefect
server starts and before anything is written; a run being written by another process is refused; commands that
name a run, iteration or stage that does not exist say so and name what does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.lineage import RunLineage, run_lock
from storage.store import ArtifactStore
from tests.helpers import updates_table

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with the bytes of each file (None for a directory)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root with run `demo` (method topd, iterations 0 and 1) recorded as `opd run` records it."""
    root = tmp_path / "opd"
    u = ArtifactStore(root).put_table("update", "b2" * 32, "updates", updates_table(3))
    lin = RunLineage(root, "demo")
    lin.init(method="topd", arm="topd", config={"name": "demo", "method": "topd"})
    lin.record(0, "update", u)
    lin.record(1, "update", u)
    return root


def refused(root: Path, args: list[str], *expected: str) -> None:
    """`opd ARGS` against `root` exits 2 with a message holding each of `expected`, and `root` is unchanged."""
    before = snapshot(root)
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    output = " ".join(r.output.replace("│", " ").split())  # rich wraps long messages, in a box for usage errors
    for text in expected:
        assert text in output, output
    assert snapshot(root) == before


def test_a_refused_refresh_rewrites_no_run(root: Path) -> None:
    base = ["run", "--set", f"root={root}", "--refresh", "nosuchstage"]
    refused(root, [*base, "--name", "demo", "--method", "opd"], "--refresh: unknown stage(s) ['nosuchstage']")
    refused(root, [*base, "--name", "fresh"], "--refresh: unknown stage(s)")
    assert RunLineage(root, "demo").info()["method"] == "topd"


@pytest.mark.parametrize("command", ["run", "experiment"])
@pytest.mark.parametrize("n", ["0", "-2"])
def test_iterations_below_one_are_refused(root: Path, command: str, n: str) -> None:
    refused(root, [command, "--set", f"root={root}", "--name", "demo", "-n", n], "'--iterations'",
            "greater than or equal to 1")


def test_experiment_numbers_are_checked(root: Path) -> None:
    base = ["experiment", "--set", f"root={root}", "--methods", "opd", "-n", "1"]
    refused(root, [*base, "--eval-size", "0"], "'--eval-size'", "greater than or equal to 1")
    refused(root, [*base, "--seeds", "-1"], "seed", "greater than or equal to 0")


def test_resume_of_an_unknown_run(root: Path) -> None:
    refused(root, ["run", "--set", f"root={root}", "--name", "ghost", "--resume"],
            f"--resume: no run named 'ghost' under {root.resolve()} (runs there: demo); drop --resume")


def test_a_second_run_of_the_same_name_is_refused_until_the_first_ends(root: Path) -> None:
    code = ("import sys, time\nfrom storage.lineage import run_lock\n"
            "with run_lock(sys.argv[1], ['busy', 'exp-opd-s0']):\n    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = f"is being written by another opd process (pid {holder.pid};"
        refused(root, ["run", "--set", f"root={root}", "--name", "busy", "-n", "1"], "run 'busy'", busy)
        refused(root, ["experiment", "--set", f"root={root}", "--name", "exp", "--methods", "opd", "--seeds", "0",
                       "-n", "1"], "run 'exp-opd-s0'", busy)
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays behind
        holder.wait()
    lock = root / "runs" / "busy" / ".lock"
    assert lock.is_file()
    with run_lock(root, ["busy"]):  # the kernel released the dead holder's flock: the stale file does not block
        assert lock.read_text().strip() == str(os.getpid())
        with run_lock(root, ["busy"]):  # re-entrant in one process (the CLI, then the flow)
            pass
        assert lock.is_file()
    assert not (root / "runs" / "busy").exists()  # released and removed: the run wrote nothing


def test_show_names_what_exists(root: Path) -> None:
    show = ["show", "demo", "--root", str(root)]
    refused(root, [*show, "-i", "99"], "run 'demo' has no iteration 99; its iterations: 0..1 (2)")
    refused(root, [*show, "-s", "nosuchstage"], "run 'demo' has no stage 'nosuchstage'; stages recorded: update")
    refused(root, [*show, "-i", "1", "-s", "rollout"], "no stage 'rollout' at iteration 1; stages recorded: update")
    refused(root, [*show, "--rows", "-1"], "'--rows'")
    assert runner.invoke(app, [*show, "-i", "1", "-s", "update"]).exit_code == 0


def test_sql_of_an_unknown_run(root: Path) -> None:
    refused(root, ["sql", "SELECT 1", "--root", str(root), "--run", "nosuchrun"], "no run named 'nosuchrun'",
            "runs there: demo")


def test_bootstrap_refuses_a_non_empty_out_and_never_defaults_to_the_shipped_models(tmp_path: Path) -> None:
    from opd_tasks.testbed.bootstrap import ASSETS_DIR

    shipped = {p: p.stat().st_mtime_ns for p in ASSETS_DIR.rglob("*") if p.is_file()}
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    r = runner.invoke(app, ["bootstrap", "--out", str(tmp_path / "taken"), "--quick"])
    assert r.exit_code == 2 and "exists and is not an empty directory" in r.output and "--replace-shipped" in r.output
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["x"]
    from opd_tasks.testbed import bootstrap as bs

    with pytest.raises(SystemExit):  # the module entry point has no default --out (argparse: required)
        bs.main(["--quick"])
    assert {p: p.stat().st_mtime_ns for p in ASSETS_DIR.rglob("*") if p.is_file()} == shipped


def test_a_failed_gate_is_one_error_line_on_the_terminal(tmp_path: Path) -> None:
    """Issue 32, class 11: a gate that stops the iteration prints its message and the `error:` line, not Prefect's
    traceback of the engine's frames; OPD_DEBUG=1 brings the traceback back. A real `opd run` (subprocess)."""
    cmd = [sys.executable, "-m", "flows.cli", "run", "-n", "1", "--name", "gate", "--set", f"root={tmp_path}",
           "--set", "gates.min_topk_coverage=1.0"]
    for debug in ("", "1"):
        env = {**os.environ, "OPD_DEBUG": debug} if debug else {k: v for k, v in os.environ.items()
                                                                 if k != "OPD_DEBUG"}
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 2, out.stderr[-3000:]
        assert "error: quality gates failed, the iteration stops before the update: topk_coverage" in out.stderr
        assert ("Traceback" in out.stderr) == bool(debug), out.stderr[-3000:]
