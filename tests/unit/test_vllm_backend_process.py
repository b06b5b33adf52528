"""The `vllm` backend's engine arguments for memory (the KV-cache cap, `max_model_len`, scoring's
`max_num_batched_tokens`) and its process handling (no engine process outlives a call), without vLLM.

The process tests run the real spawned child against the FAKE `vllm` package of tests/unit/test_vllm_backend.py,
which can start a grandchild that outlives the child (as vLLM's engine core process did), fail, or hang in
`generate` or in the engine's shutdown.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from opd_tasks.backends import vllm as vb
from opd_tasks.errors import TransientError
from opd_tasks.models import TESTBED_ASSETS
from tests.unit.test_vllm_backend import EOS, install_fake_vllm

# ------------------------------------------------------------------------------------ KV cache and lengths

QWEN3_06B = {"num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
             "hidden_size": 1024, "vocab_size": 151936}


def test_kv_bytes_per_token_from_the_config() -> None:
    # K and V, per layer, per KV head, per head dimension, 2 bytes in bf16
    assert vb.kv_bytes_per_token(QWEN3_06B, "auto") == 2 * 28 * 8 * 128 * 2 == 114_688
    assert vb.kv_bytes_per_token(QWEN3_06B, "float32") == 2 * 28 * 8 * 128 * 4
    # no head_dim: hidden / heads; no num_key_value_heads: one per attention head; a multimodal text_config
    plain = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64}
    assert vb.kv_bytes_per_token(plain, "bfloat16") == 2 * 2 * 4 * 16 * 2
    assert vb.kv_bytes_per_token({"text_config": plain}, "bfloat16") == 2 * 2 * 4 * 16 * 2
    assert vb.kv_bytes_per_token({"vocab_size": 13}, "auto") is None  # not a config it can read: no cap


def test_kv_cache_need_counts_whole_blocks_for_the_sequences_that_run_at_once() -> None:
    need = vb.kv_cache_need(512, sequences=40, max_len=100)
    assert need == {"blocks": 40 * math.ceil(100 / 16), "bytes": 40 * 7 * 16 * 512}
    many = vb.kv_cache_need(512, sequences=5000, max_len=32)  # vLLM runs at most 1024 at once
    assert many == {"blocks": 1024 * 2, "bytes": 1024 * 2 * 16 * 512}
    assert vb.kv_cache_need(None, sequences=4, max_len=32) is None


def test_kv_cache_cap_only_where_the_need_is_small_against_the_budget() -> None:
    need = {"blocks": 1000, "bytes": 4_000_000}
    assert vb.kv_cache_cap(need, budget_bytes=8_000_000) == {"num_gpu_blocks_override": 1000}  # exactly half
    assert vb.kv_cache_cap(need, budget_bytes=7_999_999) == {}  # vLLM sizes it: a cap could exceed the budget
    assert vb.kv_cache_cap(None, budget_bytes=1e12) == {}


def test_the_testbed_student_gets_a_capped_kv_cache_on_an_80gb_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The argument building end to end, as the child does it on a GPU (torch's CUDA queries faked): the
    testbed model (head_dim 16, FlexAttention in vLLM) would otherwise get 0.85 x 80 GB of KV blocks."""
    import torch

    student = str(TESTBED_ASSETS / "student")
    cfg = json.loads(Path(student, "config.json").read_text())
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2  # bf16
    engine, need = vb._job_engine(student, "auto", sequences=64 * 4, max_len=40 + 64, max_model_len=None, seed=0,
                                  gpu_memory_utilization=0.85)
    assert engine["max_model_len"] == 104  # the longest sequence, not the model's context
    assert need == {"blocks": 256 * 7, "bytes": 256 * 7 * 16 * per_token}
    job = {"engine": engine, "kv_need": need}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * 2**30))
    assert vb._engine_for(job) == engine | {"num_gpu_blocks_override": 256 * 7}
    # a configured max_model_len is kept and sizes the need
    engine2, need2 = vb._job_engine(student, "auto", sequences=1, max_len=40, max_model_len=256)
    assert engine2["max_model_len"] == 256 and need2["blocks"] == 256 // 16
    # a need beyond half of what the GPU could give the cache: vLLM's own sizing
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=need["bytes"]))
    assert vb._engine_for(job) == engine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vb._engine_for(job) == engine


# ------------------------------------------------------------------------------------ process handling


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _gone_soon(pid: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.1)
    return not _alive(pid)


@pytest.fixture()
def engine(tmp_path, monkeypatch: pytest.MonkeyPatch):
    fake = install_fake_vllm(tmp_path, monkeypatch)
    fake.grandchild = tmp_path / "grandchild.pid"
    monkeypatch.setenv("FAKE_VLLM_GRANDCHILD", str(fake.grandchild))
    yield fake
    if fake.grandchild.exists():  # never leave the test's own grandchild behind, whatever the code under test did
        pid = int(fake.grandchild.read_text())
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _rollout(fake) -> tuple[list, dict]:
    return vb.generate(fake.model, [[1, 5]], eos_token_id=EOS, n=1, temperature=1.0, top_p=1.0, max_new_tokens=2,
                       seed=0, progress=False)


def test_a_failing_child_leaves_no_engine_process_behind(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The defect: the child wrote its error and left with os._exit(1), and vLLM's engine core (a process of
    its own) kept the GPU. Now the child's whole process group is killed."""
    monkeypatch.setenv("FAKE_VLLM_RAISE", "runtime")
    with pytest.raises(TransientError, match="fake failure"):
        _rollout(engine)
    pid = int(engine.grandchild.read_text())
    assert _gone_soon(pid), f"the engine's process {pid} outlived the call"


def test_a_successful_call_leaves_no_engine_process_behind(engine) -> None:
    recs, _ = _rollout(engine)
    assert len(recs) == 1
    assert _gone_soon(int(engine.grandchild.read_text()))


def test_the_exit_grace_starts_when_the_result_is_written(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's shutdown hangs after the result is written: the call returns the result after the grace,
    and the child and its engine process are killed."""
    monkeypatch.setenv("FAKE_VLLM_HANG", "shutdown")
    monkeypatch.setattr(vb, "EXIT_GRACE_S", 1.0)
    monkeypatch.setattr(vb, "JOB_TIMEOUT_S", 120.0)
    t0 = time.monotonic()
    recs, meta = _rollout(engine)
    assert len(recs) == 1 and meta["vllm"] == "0.0+fake"
    assert time.monotonic() - t0 < 60
    assert _gone_soon(int(engine.grandchild.read_text()))


def test_the_parent_gives_up_after_its_overall_timeout(engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung engine (no result, no error) fails the call after JOB_TIMEOUT_S, retryably; the grace (long here)
    does not apply before a result exists."""
    monkeypatch.setenv("FAKE_VLLM_HANG", "generate")
    monkeypatch.setattr(vb, "EXIT_GRACE_S", 3600.0)
    monkeypatch.setattr(vb, "JOB_TIMEOUT_S", 4.0)
    with pytest.raises(TransientError, match="was killed because it timed out after 4 s, without a result"):
        _rollout(engine)
    assert _gone_soon(int(engine.grandchild.read_text()))
