"""The hostile-input suite (slow; issue 32): one case per class of the third red-team pass, each through the real
`opd` command a user or an attacker would run, on one small testbed run. The earlier drill
(tests/e2e/test_hostile_drill_slow.py) keeps its own cases; class 5 (the shared server's record) runs against real
servers in tests/e2e/test_shared_server_slow.py::test_a_stale_record_and_an_impostor_are_never_used.

    pytest -m slow tests/e2e/test_hostile_classes_slow.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from storage.hashing import canonical_json, sha256_file
from storage.layout import HOST, TMP_PREFIX

REPO = Path(__file__).resolve().parents[2]
OPD = [sys.executable, "-m", "flows.cli"]
SMALL = ["--set", "data.prompts_per_iteration=8", "--set", "data.eval_size=20", "--set", "rollout.max_new_tokens=48",
         "--set", "evaluation.max_new_tokens=48"]
#: The accuracy of the run's last evaluation (stage `evaluate`: not the baseline nor the teacher's).
ACCURACY = ("SELECT avg(correct::INT) AS accuracy FROM evals WHERE run = '{run}' AND stage = 'evaluate' AND "
            "iteration = (SELECT max(iteration) FROM evals WHERE run = '{run}' AND stage = 'evaluate')")


def _opd(args: list[str], root: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OPD_HOME": str(root), "OPD_SERVER_IDLE_MINUTES": "0", **env}
    return subprocess.run(OPD + args, cwd=REPO, env=full, capture_output=True, text=True, timeout=900)


def _ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout + out.stderr


def _refused(out: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """Exit `code` with one error line naming `words`, and no traceback."""
    text = out.stdout + out.stderr
    assert out.returncode == code, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for w in words:
        assert w in text, text[-3000:]
    return text


def _accuracy(root: Path, run: str) -> float:
    out = _opd(["sql", ACCURACY.format(run=run), "--format", "json"], root)
    _ok(out)
    return json.loads(out.stdout)[0]["accuracy"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "opd"
    _ok(_opd(["run", "--name", "base", "-n", "1", "--method", "opd", *SMALL], root))
    return root


def _artifact(root: Path, run: str, stage: str) -> Path:
    pointer = json.loads((root / "runs" / run / "lineage" / f"it0000.{stage}.json").read_text())
    return root / pointer["ref"]["uri"]


@pytest.mark.slow
def test_class_1_and_2_a_rewritten_or_damaged_cache_hit_is_recomputed(root: Path) -> None:
    """1: the evaluation rewritten with its manifest, its record (old format) and the lineage: the rerun recomputes
    the true figure. 2: a rollout part file damaged, the manifest untouched: the rerun recomputes it."""
    truth = _accuracy(root, "base")
    evaluation = _artifact(root, "base", "evaluate")
    part = next((evaluation / "evals").glob("*.parquet"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(part)
    field = table.schema.field("correct")
    forged = table.set_column(table.schema.get_field_index("correct"), field,
                              pa.array([True] * table.num_rows, type=field.type))
    pq.write_table(forged, part)
    mpath = evaluation / "_manifest.json"
    m = json.loads(mpath.read_bytes())
    for f in m["files"]:
        if f["path"] == part.relative_to(evaluation).as_posix():
            f.update(sha256=sha256_file(part), bytes=part.stat().st_size)
    mpath.write_bytes(canonical_json(m))
    from storage.writer import manifest_sha256

    record = root / "published" / "evaluate" / evaluation.name
    record.write_text(manifest_sha256(mpath.read_bytes()) + "\n")
    pointer = root / "runs" / "base" / "lineage" / "it0000.evaluate.json"
    p = json.loads(pointer.read_text())
    p["ref"]["sha256"] = manifest_sha256(mpath.read_bytes())
    pointer.write_text(json.dumps(p))
    rollout = _artifact(root, "base", "rollout")
    rpart = next((rollout / "rollouts").glob("*.parquet"))
    before = rpart.read_bytes()
    data = bytearray(before)
    data[len(data) // 2] ^= 0x40
    rpart.write_bytes(bytes(data))
    _refused(_opd(["verify"], root), "nothing vouches for it", code=1)

    text = _ok(_opd(["run", "--name", "base", "-n", "1", "--method", "opd", *SMALL], root))
    assert "cannot be trusted and was moved out of the cache" in text and "rollouts/part-00000.parquet is " \
           "corrupted" in text, text[-3000:]
    assert _accuracy(root, "base") == truth != 1.0
    assert rpart.read_bytes() == before  # recomputed byte-identical on the CPU
    _ok(_opd(["verify"], root))


@pytest.mark.slow
def test_class_3_sql_output_never_writes_into_the_root(root: Path, tmp_path: Path) -> None:
    record = root / "runs" / "base" / "run.json"
    before = record.read_bytes()
    _refused(_opd(["sql", "SELECT 1 AS x", "--format", "json", "--output", str(record), "--force"], root),
             "inside the storage root")
    assert record.read_bytes() == before
    out = tmp_path / "x.json"
    out.write_text("mine")
    _refused(_opd(["sql", "SELECT 1 AS x", "--format", "json", "--output", str(out)], root), "pass --force")
    assert out.read_text() == "mine"
    record.write_text("[]")
    _refused(_opd(["gc", "--dry-run"], root), "run.json: damaged run record")
    record.write_bytes(before)


@pytest.mark.slow
def test_class_4_a_rewritten_remote_copy_is_not_adopted(root: Path, tmp_path: Path) -> None:
    """A run pushes to a file:// remote; the remote's evaluation is rewritten consistently; a fresh root retires
    that copy and computes the true figure."""
    remote = tmp_path / "remote"
    first, fresh = tmp_path / "first", tmp_path / "fresh"
    args = ["run", "--name", "r", "-n", "1", "--method", "opd", *SMALL, "--set", f"remote=file://{remote}"]
    _ok(_opd(args, first))
    truth = _accuracy(first, "r")
    manifests = sorted((remote / "artifacts" / "evaluate").glob("*/_manifest.json"))
    assert manifests
    for mpath in manifests:  # an edit that keeps the files: the manifest's hash changes, its seal does not
        m = json.loads(mpath.read_bytes())
        m["meta"]["accuracy"] = 1.0
        os.chmod(mpath, 0o644)
        mpath.write_bytes(canonical_json(m))
    text = _ok(_opd(args, fresh))
    assert "the remote copy of artifact evaluate/" in text and "no seal that verifies" in text, text[-3000:]
    assert _accuracy(fresh, "r") == truth


@pytest.mark.slow
def test_class_6_an_arm_cannot_move_the_root(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _refused(_opd(["experiment", "--name", "e", "--seeds", "0", "-n", "1", "--arm", f"x=opd,root={elsewhere}"],
                  root), "an arm cannot set 'root'")
    assert not elsewhere.exists()


@pytest.mark.slow
def test_class_7_gc_reclaims_a_killed_writers_temp(root: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    temp = root / "artifacts" / "update" / f"{TMP_PREFIX}{'ab' * 32}-{HOST}-{dead.pid}-0000aaaa"
    temp.mkdir(parents=True)
    (temp / "model.safetensors").write_bytes(b"\0" * 4096)
    assert "temp of a dead writer" in _ok(_opd(["gc"], root))
    assert not temp.exists()


@pytest.mark.slow
def test_class_8_a_model_with_its_own_code_needs_the_flag(root: Path, tmp_path: Path) -> None:
    from opd_tasks.models import TESTBED_ASSETS

    student = Path(shutil.copytree(TESTBED_ASSETS / "student", tmp_path / "student"))
    cfg = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.M"}}))
    _refused(_opd(["run", "--name", "custom", "-n", "1", *SMALL, "--set", f"models.student.path={student}"], root),
             "set trust_remote_code: true")


@pytest.mark.slow
def test_class_9_the_report_pools_only_seeds(root: Path, tmp_path: Path) -> None:
    _ok(_opd(["run", "--name", "longer", "-n", "2", "--method", "opd", *SMALL, "--set", "seed=1"], root))
    _refused(_opd(["report", "base", "longer", "--out", str(tmp_path / "rep"), "--no-publish"], root),
             "ran different numbers of iterations (base: 1, longer: 2)")


@pytest.mark.slow
def test_class_10_a_config_with_a_key_twice_is_refused(root: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "twice.yaml"
    cfg.write_text(yaml.safe_dump({"name": "t"}) + "seed: 1\nseed: 2\n")
    _refused(_opd(["run", "--config", str(cfg), "-n", "1"], root), "the key 'seed' is given twice")


@pytest.mark.slow
def test_class_11_a_failed_gate_is_one_line(root: Path) -> None:
    text = _refused(_opd(["run", "--name", "base", "-n", "1", "--method", "opd", *SMALL, "--set",
                          "gates.min_topk_coverage=1.0"], root), "error: quality gates failed")
    assert text.count("quality gates failed") <= 3  # the log line, the flow's state, the error line
