"""scripts/gpu_check.sh end to end on the CPU (`CPU_SMOKE=1`: tiny sizes, no CUDA): the pipeline with gates on for
both methods and 2 iterations, the teacher repeatability, the tiny real-vocabulary shape, and the hf parity tests
(tests/gpu, without the repo's conftest), every Python process without Prefect, DuckDB, datasets, typer and
matplotlib (a sitecustomize.py hides them), as on the GPU machine: so that the script a GPU machine runs has run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_gpu_check_smoke import HIDDEN, HIDE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_script_runs_every_step_on_the_cpu(tmp_path: Path) -> None:
    (tmp_path / "hide").mkdir()
    (tmp_path / "hide" / "sitecustomize.py").write_text(HIDE)
    path = os.pathsep.join([str(tmp_path / "hide"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "CPU_SMOKE": "1", "PYTHON": sys.executable, "OPD_HOME": str(tmp_path / "opd-home"),
           "PYTHONPATH": path}
    hidden = subprocess.run([sys.executable, "-c", f"import importlib.util as u; print([u.find_spec(m) for m in "
                             f"{HIDDEN!r}])"], env=env, capture_output=True, text=True, check=True).stdout
    assert hidden.strip() == str([None] * len(HIDDEN))  # the sitecustomize is in force
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert res["errors"] == {} and res["parts"] == ["pipeline", "repeat", "shapes"]
    pipe = res["pipeline"]
    assert pipe["iterations"] == 2 and set(pipe["runs"]) == {"opd", "topd"}
    for method, run in pipe["runs"].items():
        assert run["error"] is None, method
        assert [g["iteration"] for g in run["gates"]] == [0, 1] and all(g["passed"] for g in run["gates"])
        for g in run["gates"]:
            assert set(g["gates"]) == {"truncated", "topk_coverage", "logprob_drift", "teacher_repeat_diff"}
            rep = g["gates"]["teacher_repeat_diff"]
            assert 0 <= rep["value"] <= rep["threshold"] == 1e-3 and g["teacher_dtype"] == "float32"  # CPU: fp32
        assert len(run["accuracy"]) == 2 and all(v > 0 for v in run["stage_tokens_per_s"].values())
        assert "gates" in run["stage_tokens_per_s"]
    assert pipe["topd_over_opd"] > 0
    assert set(pipe["parity"]) == {"cpu-fp32_vs_cpu", "cpu-bf16_vs_cpu", "sampling_vs_fp32_recompute"}
    assert pipe["parity"]["cpu-fp32_vs_cpu"]["max_abs"] <= 1e-6  # the same device and dtype
    assert res["teacher_repeat"]["float32"]["max_abs"] <= 1e-3
    assert {"rollout", "score", "update", "repeat"} <= set(res["shapes"]["tiny"])
    parity = (tmp_path / "out" / "parity_tests.txt").read_text()
    assert "3 passed" in parity and "skipped" in parity  # the hf cases ran; the vllm ones are skipped here
