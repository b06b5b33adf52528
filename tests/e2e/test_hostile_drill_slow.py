"""The hostile-user drill (slow; issue 18): a real `opd run` on the committed testbed models against a real
`prefect server start`, then the store is tampered with, corrupted, moved, copied and filled, and after each
step the drill asserts that no wrong figure is ever printed as a result: a command either prints the true
figure (recomputed or verified) or fails with a specific error that names the file.

    pytest -m slow tests/e2e/test_hostile_drill_slow.py
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from storage.hashing import canonical_json
from tests.e2e.test_serve_slow import server  # noqa: F401 - the real Prefect server fixture

REPO = Path(__file__).resolve().parents[2]
OPD = [sys.executable, "-m", "flows.cli"]
RUN = ["run", "--config", "configs/testbed.yaml", "--name", "drill", "-n", "1", "--set", "data.prompts_per_iteration=8",
       "--set", "data.eval_size=20", "--set", "rollout.max_new_tokens=48", "--set", "evaluation.max_new_tokens=48"]
LOGPROB_SUM = "SELECT round(sum(list_sum(logprobs)), 3) AS s FROM rollouts WHERE run = 'drill'"
LOSS = "SELECT round(avg(loss), 6) AS loss FROM updates WHERE run = 'drill'"


def _opd(args: list[str], env: dict, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # in the child: a file-size limit makes a write past it fail with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(OPD + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                          preexec_fn=limit if file_size_limit is not None else None)


def _figure(env: dict, sql: str):
    out = _opd(["sql", sql, "--format", "json"], env)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)[0]


def _fails_naming(out: subprocess.CompletedProcess, *words: str, code: int = 2, marker: str = "error:") -> None:
    """The command failed with its own message (exit 2 and `error: ...`: caught and explained, never an uncaught
    exception; `opd verify`: exit 1 and `BAD ...`), and that message names `words`. (Prefect's own log of a failed
    task run may show the stage's traceback above it; that is a log, not the command's answer.)"""
    text = out.stdout + out.stderr
    assert out.returncode == code, text[-3000:]
    error = text[text.rindex(marker):]
    for w in words:
        assert w in error, text[-3000:]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_tamper_corrupt_move_copy_fill(server, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "opd"
    env = {**server["env"], "OPD_HOME": str(root), "COLUMNS": "200"}
    first = _opd(RUN, env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    truth = {"logprobs": _figure(env, LOGPROB_SUM)["s"], "loss": _figure(env, LOSS)["loss"]}

    # 1. Tamper: the checkpoint's manifest says another loss. The rerun never adopts it.
    mpath = root / _uri(root, "update") / "_manifest.json"
    m = json.loads(mpath.read_bytes())
    m["meta"]["mean_loss"] = 12345.0
    mpath.write_bytes(canonical_json(m))
    again = _opd(RUN, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "12345" not in again.stdout and "is corrupted and was moved out of the cache" in again.stdout + again.stderr
    assert _figure(env, LOSS)["loss"] == truth["loss"]
    assert _opd(["verify", "drill"], env).returncode == 0

    # 2. Corrupt: a same-size byte flip in the rollouts. Queries and the report refuse; verify names the file.
    part = next((root / _uri(root, "rollout") / "rollouts").glob("part-*.parquet"))
    _flip(part)
    _fails_naming(_opd(["sql", LOGPROB_SUM, "--format", "json"], env), part.name, "corrupted")
    _fails_naming(_opd(["report", "drill", "--out", str(tmp_path / "rep")], env), part.name, "corrupted")
    _fails_naming(_opd(["verify", "drill"], env), part.name, "corrupted", code=1, marker="BAD")
    fixed = _opd(RUN + ["--refresh", "rollout"], env)
    assert fixed.returncode == 0, fixed.stdout[-3000:] + fixed.stderr[-3000:]
    assert _figure(env, LOGPROB_SUM)["s"] == truth["logprobs"]  # recomputed, byte-identical on the CPU

    # 3. Move the root: everything still reads, and a rerun is all cache hits.
    moved = tmp_path / "moved"
    root.rename(moved)
    env_moved = {**env, "OPD_HOME": str(moved)}
    assert _figure(env_moved, LOGPROB_SUM)["s"] == truth["logprobs"]
    assert _opd(["verify"], env_moved).returncode == 0
    rerun = _opd(RUN, env_moved)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    cached = _figure(env_moved, "SELECT bool_and(cached) AS c FROM lineage WHERE run = 'drill' AND iteration = 0 "
                                "AND stage NOT IN ('eval_prompts', 'baseline')")
    assert cached["c"] is True

    # 4. Copy it, then damage the original: the copy reads only itself.
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)
    env_copy = {**env, "OPD_HOME": str(copy)}
    _flip(next((moved / _uri(moved, "rollout") / "rollouts").glob("part-*.parquet")))
    assert _figure(env_copy, LOGPROB_SUM)["s"] == truth["logprobs"]
    _fails_naming(_opd(["sql", LOGPROB_SUM], env_moved), "corrupted")

    # 5. Fill the disk: no file may grow past 64 KiB, so the update's checkpoint cannot be written. The run fails
    # with a disk-full error naming the file, publishes nothing, and a rerun with room completes.
    env_full = {**env, "OPD_HOME": str(copy)}
    updates_before = sorted((copy / "artifacts" / "update").iterdir())
    full = _opd(RUN + ["--set", "seed=1"], env_full, file_size_limit=64 * 1024)
    _fails_naming(full, "disk full")
    assert sorted((copy / "artifacts" / "update").iterdir()) == updates_before  # no checkpoint published, none lost
    assert _opd(["verify"], env_full).returncode == 0
    roomy = _opd(RUN + ["--set", "seed=1"], env_full)
    assert roomy.returncode == 0, roomy.stdout[-3000:] + roomy.stderr[-3000:]
    assert _opd(["verify"], env_full).returncode == 0


def _uri(root: Path, stage: str) -> str:
    """Where the drill run's iteration-0 `stage` artifact is, relative to `root` (from its lineage)."""
    return json.loads((root / "runs" / "drill" / "lineage" / f"it0000.{stage}.json").read_text())["ref"]["uri"]
