"""The `vllm` backend without vLLM: its pure mapping functions, the child-process plumbing and the refusals.

These tests check OUR code, not vLLM. The output objects are hand-built to the shape of vLLM 0.11.0's
(`RequestOutput.outputs[i].token_ids / .logprobs / .finish_reason / .index`, `RequestOutput.prompt_logprobs`,
per-position dicts `{token_id: Logprob(logprob, rank, decoded_token)}` that hold the actual token first with its
vocabulary rank, then the top-k with ranks 1..k, the two merged when the actual token is in the top-k, as
`vllm/v1/engine/logprobs.py` builds them), and every expected value is computed independently with numpy from
the log-prob vectors the objects were built from. The plumbing tests run the real child process against a FAKE
`vllm` package put on the child's path. Agreement with real vLLM is what tests/gpu/test_backend_parity.py checks
on a GPU machine.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from opd_tasks.backends import vllm as vb
from opd_tasks.config import RolloutConfig, ScoringConfig
from opd_tasks.errors import ConfigError, ModelError, TransientError
from opd_tasks.models import ModelSpec
from opd_tasks.stages import ROLLOUT, SCORE, RolloutInputs, ScoreInputs
from storage.refs import ArtifactRef
from storage.store import ArtifactStore


@dataclass
class Lp:
    """Shaped like vllm.logprobs.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x - np.log(np.exp(x - x.max()).sum()) - x.max()


def vllm_position(logp: np.ndarray, actual: int, k: int) -> dict[int, Lp]:
    """A position's dict as vLLM V1 makes it: the actual token first with rank = #(log-probs >= its own), then
    torch.topk's k entries with ranks 1..k (a repeated key keeps its first place and takes the later value)."""
    rank = int((logp >= logp[actual]).sum())
    top = np.argsort(-logp, kind="stable")[:k]
    ids = [actual, *top.tolist()]
    ranks = [rank, *range(1, k + 1)]
    return {int(t): Lp(float(logp[t]), r) for t, r in zip(ids, ranks, strict=True)}


RNG = np.random.default_rng(0)
V = 12
VECS = [log_softmax(RNG.normal(size=V) * 2) for _ in range(6)]


# ------------------------------------------------------------------------------------------ top-k


@pytest.mark.parametrize("inside", [True, False])
def test_topk_at_returns_the_k_most_likely_in_order(inside: bool) -> None:
    logp, k = VECS[0], 4
    order = np.argsort(-logp)
    actual = int(order[1] if inside else order[7])
    d = vllm_position(logp, actual, k)
    assert len(d) == (k if inside else k + 1)
    ids, lps = vb.topk_at(d, k)
    assert ids == order[:k].tolist()
    np.testing.assert_allclose(lps, logp[order[:k]], rtol=0, atol=1e-12)
    # independent of the dict's order
    ids2, _ = vb.topk_at(dict(reversed(list(d.items()))), k)
    assert ids2 == ids


def test_topk_at_with_a_tie_at_the_kth_place_excludes_the_tied_actual_token() -> None:
    logp = log_softmax(np.array([3.0, 2.0, 1.0, 1.0, 0.0]))
    # torch.topk(k=3) keeps one of the two tied tokens (2 or 3); the actual token is the other one
    d = {3: Lp(float(logp[3]), int((logp >= logp[3]).sum())), 0: Lp(float(logp[0]), 1), 1: Lp(float(logp[1]), 2),
         2: Lp(float(logp[2]), 3)}
    assert d[3].rank == 4  # 0, 1, 2 and 3 itself have log-probs >= its own
    ids, lps = vb.topk_at(d, 3)
    assert ids == [0, 1, 2]
    np.testing.assert_allclose(lps, logp[[0, 1, 2]], atol=1e-12)


def test_topk_at_refuses_missing_ranks() -> None:
    order = np.argsort(-VECS[1])
    d = vllm_position(VECS[1], int(order[0]), 3)
    del d[int(order[1])]  # rank 2 missing
    with pytest.raises(ModelError, match="top-3 ranks"):
        vb.topk_at(d, 3)


# ------------------------------------------------------------------------------------------ rollouts


def completion(index: int, tokens: list[int], vecs: list[np.ndarray], reason: str | None) -> SimpleNamespace:
    """A CompletionOutput as vLLM returns it with logprobs=0 (only the sampled token per step)."""
    steps = [vllm_position(v, t, 0) for v, t in zip(vecs, tokens, strict=True)]
    return SimpleNamespace(index=index, token_ids=tokens, logprobs=steps, finish_reason=reason, text="")


EOS = 2


def test_sampled_logprobs_and_finish_reasons() -> None:
    c = completion(0, [5, 7, EOS], VECS[:3], "stop")
    assert vb.sampled_logprobs(c.token_ids, c.logprobs) == [VECS[0][5], VECS[1][7], VECS[2][EOS]]
    assert vb.finish_reason([5, 7, EOS], "stop", [EOS]) == "stop"
    assert vb.finish_reason([5, 7, 9], "length", [EOS]) == "length"
    with pytest.raises(ModelError, match="finish_reason 'abort'"):
        vb.finish_reason([5, 7], "abort", [EOS])
    with pytest.raises(ModelError, match=r"stop token\(s\) \[2\] inside"):
        vb.finish_reason([5, EOS, 7], "length", [EOS])
    with pytest.raises(ModelError, match="do not hold the sampled token 8"):
        vb.sampled_logprobs([5, 8], c.logprobs[:2])
    with pytest.raises(ModelError, match="2 log-prob steps for 3"):
        vb.sampled_logprobs([5, 7, 9], c.logprobs[:2])
    with pytest.raises(ModelError, match="no log-probs"):
        vb.sampled_logprobs([5], None)


def test_rollout_records_order_and_fields() -> None:
    outs = [
        SimpleNamespace(prompt_token_ids=[1, 4], outputs=[completion(1, [6, 6, 6], VECS[3:6], "length"),
                                                          completion(0, [9, EOS], VECS[:2], "stop")]),
        SimpleNamespace(prompt_token_ids=[1, 5], outputs=[completion(0, [EOS], VECS[2:3], "stop"),
                                                          completion(1, [3, 4, EOS], VECS[:3], "stop")]),
    ]
    recs = vb.rollout_records(outs, n=2, greedy=False, stop_ids=[EOS])
    assert [(r["prompt_index"], r["sample_id"]) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["token_ids"] for r in recs] == [[9, EOS], [6, 6, 6], [EOS], [3, 4, EOS]]
    assert [r["finish_reason"] for r in recs] == ["stop", "length", "stop", "stop"]
    assert recs[1]["logprobs"] == [VECS[3][6], VECS[4][6], VECS[5][6]]
    assert recs[3]["logprobs"] == [VECS[0][3], VECS[1][4], VECS[2][EOS]]
    with pytest.raises(ModelError, match="2 completions, expected 3"):
        vb.rollout_records(outs, n=3, greedy=False, stop_ids=[EOS])


def test_greedy_repeats_the_single_completion_like_hf() -> None:
    outs = [SimpleNamespace(prompt_token_ids=[1], outputs=[completion(0, [4, EOS], VECS[:2], "stop")])]
    recs = vb.rollout_records(outs, n=3, greedy=True, stop_ids=[EOS])
    assert [r["sample_id"] for r in recs] == [0, 1, 2]
    assert all(r["token_ids"] == [4, EOS] and r["logprobs"] == [VECS[0][4], VECS[1][EOS]] for r in recs)


def test_rollout_params_and_seeds() -> None:
    p = vb.rollout_params(n=4, temperature=0.7, top_p=0.9, max_new_tokens=16, stop_ids=[EOS])
    assert p == {"n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_tokens": 16, "logprobs": 0,
                 "stop_token_ids": [EOS], "detokenize": False, "skip_special_tokens": False}
    g = vb.rollout_params(n=4, temperature=0.0, top_p=0.9, max_new_tokens=16, stop_ids=[EOS])
    assert g["n"] == 1 and g["top_p"] == 1.0 and g["temperature"] == 0.0
    # vLLM seeds sample i of a request with seed + i: no two samples of a rollout may share a seed
    n, prompts = 4, 50
    seeds = {vb.request_seed(7, i, n) + j for i in range(prompts) for j in range(n)}
    assert len(seeds) == n * prompts
    assert vb.request_seed(7, 0, n) != vb.request_seed(8, 0, n)


def test_engine_kwargs() -> None:
    kw = vb.engine_kwargs("/m", dtype="auto", tensor_parallel_size=2, gpu_memory_utilization=0.5, seed=3,
                          max_logprobs=64)
    assert kw == {"model": "/m", "skip_tokenizer_init": True, "trust_remote_code": False, "dtype": "bfloat16",
                  "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "enforce_eager": False, "seed": 3,
                  "max_logprobs": 64, "logprobs_mode": "raw_logprobs", "generation_config": "vllm"}
    assert json.loads(json.dumps(kw)) == kw
    small = vb.engine_kwargs("/m", dtype="float32", max_model_len=256, max_logprobs=8)
    assert small["dtype"] == "float32" and small["max_model_len"] == 256 and small["max_logprobs"] == 20
    with pytest.raises(ConfigError, match="dtype 'int8'"):
        vb.engine_kwargs("/m", dtype="int8")


# ------------------------------------------------------------------------------------------ scoring


def test_score_record_maps_prompt_logprobs_of_the_completion() -> None:
    prompt, comp, k = [1, 4, 5], [7, 3], 3
    seq = prompt + comp
    # entry t predicts seq[t] from seq[:t]; entry 0 is None
    plp = [None] + [vllm_position(VECS[t], seq[t], k) for t in range(1, len(seq))]
    rec = vb.score_record(plp, len(prompt), comp, k)
    exp_lp = [VECS[3][7], VECS[4][3]]
    np.testing.assert_allclose(rec["logprob"], exp_lp, atol=1e-12)
    for j, t in enumerate((3, 4)):
        order = np.argsort(-VECS[t])[:k]
        assert rec["topk_ids"][j] == order.tolist()
        np.testing.assert_allclose(rec["topk_logprobs"][j], VECS[t][order], atol=1e-12)
    with pytest.raises(ModelError, match="4 prompt log-prob entries for a sequence of 5"):
        vb.score_record(plp[:4], len(prompt), comp, k)
    with pytest.raises(ModelError, match="no log-prob of completion token 1"):
        vb.score_record(plp, len(prompt), [7, 99], k)


def test_arrow_tables_round_trip() -> None:
    recs = [{"prompt_index": 0, "sample_id": 1, "token_ids": [3, EOS], "logprobs": [-0.5, -1.25],
             "finish_reason": "stop"}]
    t = vb.rollout_table(recs)
    assert t.schema.field("token_ids").type == pa.list_(pa.int32())
    assert t.to_pylist() == recs
    srec = [{"logprob": [-0.5], "topk_ids": [[3, 4]], "topk_logprobs": [[-0.25, -2.0]]},
            {"logprob": [], "topk_ids": [], "topk_logprobs": []}]
    assert vb.score_table(srec).to_pylist() == srec


# ------------------------------------------------------------------------------------------ refusals


def _no_vllm(monkeypatch: pytest.MonkeyPatch, cuda: bool = False, devices: int = 0) -> None:
    import torch

    monkeypatch.setattr(vb, "vllm_version", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)


def test_require_vllm_names_the_field_and_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_vllm(monkeypatch)
    with pytest.raises(ConfigError) as e:
        vb.require_vllm("rollout.backend", "auto")
    msg = str(e.value)
    assert msg.startswith("rollout.backend: 'vllm' cannot run here")
    assert "vLLM package is not importable" in msg and "torch sees no CUDA device" in msg
    with pytest.raises(ConfigError, match="scoring.backend: .*device is 'cpu'"):
        vb.require_vllm("scoring.backend", "cpu")
    monkeypatch.setattr(vb, "vllm_version", lambda: "0.10.2")
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"vLLM 0.10.2 is installed, but this backend needs vLLM >= 0.11"):
        vb.require_vllm("rollout.backend", "auto")
    monkeypatch.setattr(vb, "vllm_version", lambda: "0.11.0")
    vb.require_vllm("rollout.backend", "cuda")  # all there
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size is 2 but torch sees only 1"):
        vb.require_vllm("rollout.backend", "auto", tensor_parallel_size=2)


def test_vllm_is_missing_here_or_the_check_passes() -> None:
    """On this machine (no vLLM, or no GPU) the real check refuses; where both exist it passes."""
    import torch

    if vb.vllm_version() is None or not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="rollout.backend: 'vllm' cannot run here"):
            vb.require_vllm("rollout.backend", "auto")
    else:
        vb.require_vllm("rollout.backend", "auto")


REF = ArtifactRef(uri="/nonexistent/prompts", stage="prompts", key="b" * 64, sha256="c" * 64, rows=1, bytes=1,
                  schema_name="prompts", schema_version=1)
MISSING = ModelSpec(path="/nonexistent/model", sha256="a" * 64)


def test_stages_refuse_vllm_before_any_work(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The inputs do not exist: reading them would raise ArtifactError / ModelError, so a ConfigError proves
    the refusal comes first."""
    _no_vllm(monkeypatch)
    store = ArtifactStore(tmp_path)
    with pytest.raises(ConfigError, match="^rollout.backend: 'vllm' cannot run here"):
        ROLLOUT(store, _rollout_inputs(RolloutConfig(backend="vllm")), progress=False)
    with pytest.raises(ConfigError, match="^scoring.backend: 'vllm' cannot run here"):
        SCORE(store, _score_inputs(ScoringConfig(backend="vllm")), progress=False)


def _rollout_inputs(cfg: RolloutConfig) -> RolloutInputs:
    return RolloutInputs(student=MISSING, prompts=REF, rollout=cfg, checker="testbed", seed=0)


def _score_inputs(cfg: ScoringConfig) -> ScoreInputs:
    return ScoreInputs(teacher=MISSING, student=MISSING, rollouts=REF, scoring=cfg)


def test_cache_keys_carry_the_backend_and_only_the_fields_it_reads() -> None:
    def rollout_key(**cfg) -> str:
        return ROLLOUT.key(_rollout_inputs(RolloutConfig(**cfg)))

    def score_key(**cfg) -> str:
        return SCORE.key(_score_inputs(ScoringConfig(**cfg)))

    assert rollout_key() != rollout_key(backend="vllm") and score_key() != score_key(backend="vllm")
    # The vLLM-only fields do not enter hf keys (changing them invalidates no hf artifact)...
    assert rollout_key() == rollout_key(max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.5,
                                        tensor_parallel_size=2)
    assert score_key() == score_key(max_model_len=512, enforce_eager=False, gpu_memory_utilization=0.5)
    assert rollout_key() != rollout_key(temperature=0.7) and score_key() != score_key(top_k=4)
    # ...but they do enter vllm keys
    assert rollout_key(backend="vllm") != rollout_key(backend="vllm", max_model_len=512)
    assert score_key(backend="vllm") != score_key(backend="vllm", enforce_eager=False)


# ------------------------------------------------------------------------------------------ child process

FAKE_VLLM = '''
"""A FAKE vllm for tests of opd_tasks.backends.vllm's plumbing: shaped like vLLM 0.11.0's API, nothing more.
Its 'model': the log-probs after token t are log_softmax(((v * 7 + t * 3) % 11) / 3) over a vocabulary of 13."""
import json, math, os, subprocess, sys, time
from dataclasses import dataclass
__version__ = "0.0+fake"
V = 13

def logp_after(t):
    x = [((v * 7 + t * 3) % 11) / 3 for v in range(V)]
    m = max(x)
    z = math.log(sum(math.exp(a - m) for a in x)) + m
    return [a - z for a in x]

@dataclass
class Logprob:
    logprob: float
    rank: int = None
    decoded_token: str = None

def position(lp, actual, k):
    ids = [actual] + sorted(range(V), key=lambda v: (-lp[v], v))[:k]
    ranks = [sum(a >= lp[actual] for a in lp)] + list(range(1, k + 1))
    return {t: Logprob(lp[t], r) for t, r in zip(ids, ranks)}

class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw

class _Out:
    def __init__(self, **kw):
        self.__dict__.update(kw)

def _log(obj):
    with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
        f.write(json.dumps(obj) + "\\n")

class _EngineCore:
    def shutdown(self):
        if os.environ.get("FAKE_VLLM_HANG") == "shutdown":
            time.sleep(3600)
        _log({"shutdown": True})

class LLM:
    """FAKE_VLLM_GRANDCHILD=<file>: start a process that outlives this one, like vLLM's engine core, and write its
    pid there. FAKE_VLLM_HANG=generate|shutdown: hang there. FAKE_VLLM_RAISE=value|runtime: fail in generate."""

    def __init__(self, **kw):
        _log({"engine": kw, "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")})
        self.llm_engine = _Out(engine_core=_EngineCore())
        if os.environ.get("FAKE_VLLM_GRANDCHILD"):
            p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            with open(os.environ["FAKE_VLLM_GRANDCHILD"], "w") as f:
                f.write(str(p.pid))

    def generate(self, prompts, params, use_tqdm=True):
        if os.environ.get("FAKE_VLLM_HANG") == "generate":
            time.sleep(3600)
        if os.environ.get("FAKE_VLLM_RAISE"):
            raise {"value": ValueError, "runtime": RuntimeError}[os.environ["FAKE_VLLM_RAISE"]]("fake failure")
        params = params if isinstance(params, list) else [params] * len(prompts)
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
            for p, s in zip(prompts, params):
                f.write(json.dumps({"prompt": p, "params": s.kw}) + "\\n")
        res = []
        for p, s in zip(prompts, params):
            kw, ids = s.kw, p["prompt_token_ids"]
            outs = []
            for i in range(kw.get("n", 1)):
                toks, steps, last = [], [], ids[-1]
                while len(toks) < kw["max_tokens"]:
                    lp = logp_after(last)
                    # "sampling": the (i+1)-th most likely token, deterministic
                    t = sorted(range(V), key=lambda v: (-lp[v], v))[i % 3] if kw["temperature"] > 0 else \\
                        max(range(V), key=lambda v: lp[v])
                    toks.append(t)
                    steps.append(position(lp, t, kw["logprobs"]) if kw.get("logprobs") is not None else None)
                    last = t
                    if t in kw.get("stop_token_ids", []):
                        break
                reason = "stop" if toks[-1] in kw.get("stop_token_ids", []) else "length"
                outs.append(_Out(index=i, token_ids=toks, logprobs=steps if kw.get("logprobs") is not None else None,
                                 finish_reason=reason, text=""))
            plp = None
            if kw.get("prompt_logprobs") is not None:
                plp = [None] + [position(logp_after(ids[t - 1]), ids[t], kw["prompt_logprobs"])
                                for t in range(1, len(ids))]
            res.append(_Out(prompt_token_ids=list(ids), outputs=outs, prompt_logprobs=plp))
        return res
'''


def install_fake_vllm(tmp_path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Put the FAKE vllm package on the (spawned child's) path; returns its call log and a model directory."""
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(FAKE_VLLM))
    (pkg / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': "
                                   "prompt_token_ids}\n")
    log = tmp_path / "calls.jsonl"
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))  # the spawned child gets the parent's sys.path
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"vocab_size": 13}))
    return SimpleNamespace(log=log, model=str(model))


@pytest.fixture()
def fake_vllm(tmp_path, monkeypatch: pytest.MonkeyPatch):
    return install_fake_vllm(tmp_path, monkeypatch)


def _calls(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _logp_after(t: int) -> np.ndarray:  # the fake model, again, in numpy
    return log_softmax(np.array([((v * 7 + t * 3) % 11) / 3 for v in range(13)]))


def test_generate_through_the_child_process(fake_vllm) -> None:
    prompts = [[1, 5], [1, 6, 7]]
    recs, meta = vb.generate(fake_vllm.model, prompts, eos_token_id=EOS, n=2, temperature=0.8, top_p=0.95,
                             max_new_tokens=4, seed=3, dtype="float32", progress=False)
    assert meta["vllm"] == "0.0+fake" and meta["engine_seconds"] >= 0
    calls = _calls(fake_vllm.log)
    # max_model_len: the longest prompt (3) + max_new_tokens (4); no KV cap without CUDA (the child's GPU size)
    assert calls[0]["engine"] == vb.engine_kwargs(fake_vllm.model, dtype="float32", seed=3, max_model_len=7)
    assert calls[0]["multiprocessing"] == "0" and calls[-1] == {"shutdown": True}  # in-process engine, shut down
    calls = calls[:-1]
    assert [c["prompt"] for c in calls[1:]] == [{"prompt_token_ids": p} for p in prompts]  # token ids, as given
    assert [c["params"]["seed"] for c in calls[1:]] == [vb.request_seed(3, i, 2) for i in range(2)]
    assert calls[1]["params"] == vb.rollout_params(n=2, temperature=0.8, top_p=0.95, max_new_tokens=4,
                                                   stop_ids=[EOS]) | {"seed": vb.request_seed(3, 0, 2)}
    assert [(r["prompt_index"], r["sample_id"]) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in recs:  # recompute each completion and its log-probs from the fake model
        last, lps = prompts[r["prompt_index"]][-1], []
        for t in r["token_ids"]:
            lp = _logp_after(last)
            assert t == int(sorted(range(13), key=lambda v: (-lp[v], v))[r["sample_id"] % 3])
            lps.append(lp[t])
            last = t
        np.testing.assert_allclose(r["logprobs"], lps, rtol=0, atol=1e-6)  # float32 on the way back
        assert r["finish_reason"] == ("stop" if r["token_ids"][-1] == EOS else "length")
        assert r["finish_reason"] == "stop" or len(r["token_ids"]) == 4


def test_score_through_the_child_process(fake_vllm) -> None:
    prompts, comps = [[1, 5, 6], [3], [4, 4]], [[7, 8, 9], [], [2]]
    recs, _ = vb.score(fake_vllm.model, prompts, comps, top_k=50, progress=False)  # k is capped at vocab 13
    calls = _calls(fake_vllm.log)
    # the longest sequence is 6 tokens + the one generated; at most SCORE_MAX_BATCHED_TOKENS tokens per step
    assert calls[0]["engine"] == vb.engine_kwargs(fake_vllm.model, enforce_eager=True, max_logprobs=13,
                                                  max_model_len=7, max_num_batched_tokens=2048)
    assert calls[0]["engine"]["max_logprobs"] == 20 and vb.SCORE_MAX_BATCHED_TOKENS == 2048
    calls = calls[:-1]  # the engine's shutdown
    assert [c["prompt"]["prompt_token_ids"] for c in calls[1:]] == [[1, 5, 6, 7, 8, 9], [4, 4, 2]]  # no empty one
    assert calls[1]["params"] == vb.score_params(13)
    assert recs[1] == {"logprob": [], "topk_ids": [], "topk_logprobs": []}
    for r, p, c in zip(recs, prompts, comps, strict=True):
        seq = p + c
        for j, tok in enumerate(c):
            lp = _logp_after(seq[len(p) + j - 1])
            assert r["logprob"][j] == pytest.approx(lp[tok], abs=1e-6)
            order = sorted(range(13), key=lambda v: (-lp[v], v))
            assert r["topk_ids"][j] == order
            np.testing.assert_allclose(r["topk_logprobs"][j], lp[order], atol=1e-6)


@pytest.mark.parametrize(("kind", "error"), [("value", ModelError), ("runtime", TransientError)])
def test_child_failures_become_our_errors(fake_vllm, monkeypatch: pytest.MonkeyPatch, kind, error) -> None:
    monkeypatch.setenv("FAKE_VLLM_RAISE", kind)
    with pytest.raises(error, match="vLLM rollout failed in its child process: .*fake failure"):
        vb.generate(fake_vllm.model, [[1]], eos_token_id=EOS, n=1, temperature=1.0, top_p=1.0, max_new_tokens=2,
                    seed=0, progress=False)
