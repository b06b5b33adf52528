"""`python -m bench scaling` end to end at a small size: every shard count gives the one-shard artifacts, the shards
did run in parts, and 2 update ranks agree with 1 within float tolerance (the benchmark's own figures)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_scaling_small(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, "-m", "bench", "scaling", "--prompts", "16", "--samples", "4", "--shards", "1", "2",
           "--ranks", "1", "2", "--micro-batch", "2", "--grad-accumulation", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OPD_SERVER_IDLE_MINUTES": "0"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = json.loads(out.read_text())
    one, two = got["shards"]
    # 2 batches of 8 prompts, of 32 scored and of 32 analysed sequences
    assert (one["rollout_parts"], two["rollout_parts"], two["score_parts"], two["analyze_parts"]) == (0, 2, 2, 2)
    assert two["rollout_identical"] and two["score_identical"] and two["analyze_identical"]
    base, ranks2 = got["update"]
    assert base["steps"] == ranks2["steps"] == 16  # 64 sequences in steps of 2 micro-batches of 2
    assert ranks2["max_weight_diff"] < 1e-5 and ranks2["max_loss_diff"] < 1e-4
