"""The GPU check's measurements (bench/gpu_check.py, run by scripts/gpu_check.sh on a GPU machine), smoke-run on the
CPU: the teacher re-score repeatability and the tiny real-vocabulary shape's rollout, scoring and update, in a
subprocess where Prefect, DuckDB, datasets, typer and matplotlib cannot be imported (the GPU machine has none of
them); every field of the JSON is checked for a sane value."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.real_shape import QWEN3_8B, SMALL, VOCAB

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = ("prefect", "duckdb", "datasets", "typer", "matplotlib")  # flows/ imports prefect
# Makes the HIDDEN packages absent, as on the GPU machine: the finder that searches sys.path is wrapped so that it
# finds none of them (find_spec returns None, `import` raises ModuleNotFoundError). Also the body of the
# sitecustomize.py that tests/e2e/test_gpu_check_script_slow.py puts on PYTHONPATH.
HIDE = f"""
import sys
from importlib.machinery import PathFinder
class Without:
    hidden = {set(HIDDEN)!r}
    @staticmethod
    def find_spec(name, path=None, target=None):
        return None if name.partition(".")[0] in Without.hidden else PathFinder.find_spec(name, path, target)
    @staticmethod
    def find_distributions(*args, **kwargs):  # importlib.metadata: the installed packages' metadata
        return PathFinder.find_distributions(*args, **kwargs)
    @staticmethod
    def invalidate_caches():
        PathFinder.invalidate_caches()
sys.meta_path[:] = [Without if f is PathFinder else f for f in sys.meta_path]
"""
# `python -m MODULE ARGS...` without the HIDDEN packages
RUN_WITHOUT = HIDE + """
import runpy
module, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _finite_diff(r: dict) -> None:
    for fig in (r, r["gate"]):
        assert math.isfinite(fig["max_abs"]) and math.isfinite(fig["mean_abs"])
        assert 0 <= fig["mean_abs"] <= fig["max_abs"]
    assert r["tokens"] > 0 and r["sequences"] > 0 and r["batch_sizes"] == [1, r["sequences"]]


def _repeat_pair(rep: dict) -> None:
    assert rep["bfloat16"]["dtype"] == "bfloat16" and rep["float32"]["dtype"] == "float32"
    assert rep["bfloat16"]["limit"] == 0.5 and rep["float32"]["limit"] == 1e-3
    for dtype in ("bfloat16", "float32"):
        _finite_diff(rep[dtype])
    # float32 on the CPU: another batch shape moves the last bits only, well inside the gate's limit
    assert rep["float32"]["max_abs"] <= 1e-3 and rep["float32"]["within_limit"] is True
    assert rep["float32"]["gate"]["max_abs"] <= 1e-3 and rep["float32"]["gate"]["within_limit"] is True


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check") / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, "bench.gpu_check", "--out", str(out), "--device", "cpu",
         "--parts", "repeat,shapes", "--shapes", "tiny", "--prompts", "4", "--sequences", "3", "--prompt-tokens", "6",
         "--new-tokens", "5", "--micro-batch", "2", "--update-steps", "1", "--score-passes", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "repeat tiny float32" in proc.stdout and "tiny   update" in proc.stdout  # the printed summary
    return json.loads(out.read_text())


def test_the_cpu_smoke_run_records_every_figure(smoke: dict) -> None:
    assert smoke["errors"] == {} and smoke["device"] == "cpu" and smoke["gpu"] is None
    assert smoke["bf16_peak_flops"] is None and "MFU is null" in smoke["bf16_peak_source"]
    assert smoke["gate_limits"] == {"max_teacher_repeat_diff": 1e-3, "max_teacher_repeat_diff_16bit": 0.5}
    assert smoke["parts"] == ["repeat", "shapes"] and "pipeline" not in smoke
    assert set(smoke["seconds"]) == {"teacher_repeat", "shape tiny"}

    rep = smoke["teacher_repeat"]
    assert rep["model"] == "testbed:teacher"
    _repeat_pair(rep)

    tiny = smoke["shapes"]["tiny"]
    assert tiny["shape"]["vocab"] == VOCAB == 151_936 and tiny["params"] == SMALL.params()
    assert tiny["flop_params"] == SMALL.params()  # tied: the one embedding matrix is the output head
    assert tiny["build_bf16_s"] > 0 and tiny["build_fp32_s"] > 0
    roll, score, update = tiny["rollout"], tiny["score"], tiny["update"]
    assert 3 <= roll["generated_tokens"] <= 3 * 5 and roll["dtype"] == "bfloat16"
    processed = 3 * 6 + roll["generated_tokens"]
    assert score["tokens"] == processed and score["completion_tokens"] == roll["generated_tokens"]
    assert update["tokens"] == processed and update["completion_tokens"] == roll["generated_tokens"]
    assert update["weights"] == "float32" and update["autocast"] is None  # bf16 autocast is CUDA-only, as the stage
    for stage in (roll, score, update):
        assert stage["seconds"] > 0 and stage["tokens_per_s"] > 0
        assert stage["mfu"] is None and stage["peak_gib"] is None  # no peak FLOP/s and no CUDA allocator on the CPU
    for stage in (score, update):
        assert 0 < stage["completion_tokens_per_s"] < stage["tokens_per_s"]
    _repeat_pair(tiny["repeat"])


def test_the_peak_table_is_looked_up_by_device_name(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    for name, want in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 PCIe", 756e12),
                       ("NVIDIA A100-SXM4-80GB", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d=None, n=name: n)
        peak, source = gpu_check.bf16_peak(cuda)
        assert peak == want, name
        assert name in source and (want is not None or "MFU is null" in source)
    assert gpu_check.bf16_peak(torch.device("cpu"))[0] is None


def test_flop_params_leave_out_an_untied_input_embedding() -> None:
    assert gpu_check.flop_params(QWEN3_8B) == QWEN3_8B.params() - VOCAB * QWEN3_8B.hidden
    assert 7.5e9 < gpu_check.flop_params(QWEN3_8B) < 8e9  # Qwen3-8B: 8.2 B parameters, 0.6 B of them the embedding


def test_the_update_is_skipped_where_its_training_state_cannot_fit() -> None:
    h200, h100 = 143_771_000_832, 85_029_158_912  # total_memory as torch reports it
    why = gpu_check.update_skipped(QWEN3_8B, h200)  # 16 B x 8.19 B parameters = 122 GiB > 80% of 134 GiB
    assert why is not None and "122 GiB" in why and "not measured" in why
    assert gpu_check.update_skipped(gpu_check.SHAPES["1.7B"], h200) is None
    assert gpu_check.update_skipped(gpu_check.SHAPES["1.7B"], h100) is None
    assert gpu_check.update_skipped(QWEN3_8B, None) is None  # the CPU: no GPU memory to compare with
