"""Every EOS id a model declares ends its completions, in both backends and in the probes (issue 19, item 4).

Qwen3's generation_config.json lists two EOS ids; the tokenizer names one. The model here is the committed
testbed student copied to a temp dir, its generation_config.json edited to list a second EOS id: a token the
model generates in the middle of its completions, so that stopping there is visible. The expected completions
are computed independently: the same model's completions with the tokenizer's EOS alone, cut after the first
of the two ids (greedy decoding and seeded sampling do not depend on where a row stops).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from opd_tasks.backends import vllm as vb
from opd_tasks.backends.hf import chosen_logprobs, generate, load_causal_lm, load_tokenizer, stop_token_ids
from opd_tasks.config import DataConfig, EvaluationConfig, RolloutConfig
from opd_tasks.errors import ModelError
from opd_tasks.models import TESTBED_ASSETS, ModelSpec
from opd_tasks.stages import EVALUATE, PROMPTS, ROLLOUT, EvaluateInputs, PromptsInputs, RolloutInputs
from opd_tasks.topd.probes import probe_greedy
from storage.hashing import sha256_tree
from storage.store import ArtifactStore
from tests.unit.test_vllm_backend import EOS as FAKE_EOS
from tests.unit.test_vllm_backend import install_fake_vllm

MAX_NEW = 24


def _with_eos(src: Path, dest: Path, eos) -> Path:
    shutil.copytree(src, dest)
    gen = json.loads((dest / "generation_config.json").read_text())
    (dest / "generation_config.json").write_text(json.dumps(gen | {"eos_token_id": eos}))
    return dest


def _cut(tokens: list[int], stops: set[int]) -> list[int]:
    end = next((j + 1 for j, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:end]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("multi_eos")
    src = TESTBED_ASSETS / "student"
    tok = load_tokenizer(src)
    model = load_causal_lm(src, torch.device("cpu"))
    store = ArtifactStore(base / "root")
    plain = ModelSpec(path=str(src), sha256=sha256_tree(src))
    prompts_ref = PROMPTS(store, PromptsInputs(data=DataConfig(), tokenizer=plain, split="train", n=6, offset=0,
                                               max_context=None, seed=0))
    prompts = store.read_table(prompts_ref).column("prompt_token_ids").to_pylist()
    eos = tok.eos_token_id
    # the second EOS: the token the model most often generates after the first position, never at position 0
    greedy = generate(model, prompts, eos_token_id=eos, pad_token_id=tok.pad_token_id, temperature=0.0,
                      max_new_tokens=MAX_NEW, progress=False)
    firsts = {g.token_ids[0] for g in greedy}
    counts = Counter(t for g in greedy for t in g.token_ids[1:] if t != eos and t not in firsts)
    second = counts.most_common(1)[0][0]
    two = _with_eos(src, base / "student-two-eos", [eos, second])
    spec = ModelSpec(path=str(two), sha256=sha256_tree(two))
    return dict(tok=tok, model=model, store=store, prompts=prompts, prompts_ref=prompts_ref, eos=eos,
                second=second, dir=two, spec=spec)


def test_stop_token_ids_are_the_tokenizers_eos_and_every_declared_one(env, tmp_path: Path) -> None:
    tok, eos, second = env["tok"], env["eos"], env["second"]
    assert stop_token_ids(tok, env["dir"]) == [eos, second]
    assert stop_token_ids(tok, TESTBED_ASSETS / "student") == [eos]  # declares the same single id
    assert stop_token_ids(tok, tmp_path) == [eos]  # no generation_config.json at all
    one = _with_eos(TESTBED_ASSETS / "student", tmp_path / "one", second)  # a single id, not a list
    assert stop_token_ids(tok, one) == [eos, second]
    dup = _with_eos(TESTBED_ASSETS / "student", tmp_path / "dup", [second, eos, second])
    assert stop_token_ids(tok, dup) == [eos, second]
    bad = _with_eos(TESTBED_ASSETS / "student", tmp_path / "bad", [eos, "</s>"])
    with pytest.raises(ModelError, match=r"bad/generation_config.json: eos_token_id holds '</s>'"):
        stop_token_ids(tok, bad)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_generate_ends_at_either_eos(env, temperature: float) -> None:
    model, tok, prompts = env["model"], env["tok"], env["prompts"]
    stops = stop_token_ids(tok, env["dir"])
    kw = dict(pad_token_id=tok.pad_token_id, n=2, temperature=temperature, max_new_tokens=MAX_NEW, seed=3,
              progress=False)
    ref = generate(model, prompts, eos_token_id=env["eos"], **kw)
    got = generate(model, prompts, eos_token_id=stops, **kw)
    ended_on_second = 0
    for r, g in zip(ref, got, strict=True):
        want = _cut(r.token_ids, set(stops))
        assert g.token_ids == want
        assert g.logprobs == r.logprobs[: len(want)]
        assert g.finish_reason == ("stop" if want[-1] in stops else "length")
        ended_on_second += want[-1] == env["second"]
    assert ended_on_second > 0  # the second id did stop some completions


def test_chosen_logprobs_equal_a_float64_log_softmax_and_the_stacked_form() -> None:
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(5, 300, generator=g) * 4 for _ in range(7)]
    tokens = torch.randint(0, 300, (5, 9), generator=g)  # longer than the steps, as after an EOS
    got = chosen_logprobs(steps, tokens)
    x = np.stack([s.numpy() for s in steps], axis=1).astype(np.float64)
    ref = x - (np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) + x.max(-1, keepdims=True))
    want = np.take_along_axis(ref, tokens[:, :7, None].numpy(), -1)[..., 0]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)  # float32 against float64
    # bit for bit what the [rows, steps, V] form computed (the golden figures depend on it)
    stacked = torch.log_softmax(torch.stack(steps, 1), -1).gather(-1, tokens[:, :7, None]).squeeze(-1)
    assert torch.equal(got, stacked)


def test_the_rollout_and_evaluate_stages_stop_at_the_declared_second_eos(env) -> None:
    store, spec, stops = env["store"], env["spec"], {env["eos"], env["second"]}
    ref = ROLLOUT(store, RolloutInputs(student=spec, prompts=env["prompts_ref"], checker="testbed", seed=0,
                                       rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=MAX_NEW)),
                  progress=False)
    t = store.read_table(ref, "rollouts").to_pylist()
    assert any(r["token_ids"][-1] == env["second"] for r in t)
    for r in t:
        assert not stops & set(r["token_ids"][:-1])
        assert r["finish_reason"] == ("stop" if r["token_ids"][-1] in stops else "length")
        assert r["finish_reason"] == "stop" or len(r["token_ids"]) == MAX_NEW
    ev = EVALUATE(store, EvaluateInputs(model=spec, prompts=env["prompts_ref"], checker="testbed", seed=0,
                                        evaluation=EvaluationConfig(max_new_tokens=MAX_NEW)), progress=False)
    greedy = generate(env["model"], env["prompts"], eos_token_id=env["eos"], pad_token_id=env["tok"].pad_token_id,
                      temperature=0.0, max_new_tokens=MAX_NEW, progress=False)
    lengths = store.read_table(ev, "evals").column("num_tokens").to_pylist()
    assert lengths == [len(_cut(g.token_ids, stops)) for g in greedy]


def test_probe_continuations_stop_at_either_eos(env) -> None:
    model, tok, prompts = env["model"], env["tok"], env["prompts"]
    stops = stop_token_ids(tok, env["dir"])
    probes = [(i, len(p)) for i, p in enumerate(prompts)]  # continue from the end of each prompt
    conts, _ = probe_greedy(model, prompts, probes, MAX_NEW, eos_token_id=stops, pad_token_id=tok.pad_token_id,
                            batch_size=4)
    ref = generate(model, prompts, eos_token_id=env["eos"], pad_token_id=tok.pad_token_id, temperature=0.0,
                   max_new_tokens=MAX_NEW, progress=False)
    assert conts == [_cut(g.token_ids, set(stops)) for g in ref]
    assert any(c[-1] == env["second"] for c in conts)


def test_vllm_rollouts_stop_at_either_eos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the child process with the fake vLLM (which stops on any `stop_token_ids`): every id is passed,
    and a completion that ends on the second one is a "stop", not the error it used to be."""
    fake = install_fake_vllm(tmp_path, monkeypatch)
    kw = dict(n=2, temperature=0.8, top_p=1.0, max_new_tokens=6, seed=0, progress=False)
    first, _ = vb.generate(fake.model, [[1, 5]], eos_token_id=FAKE_EOS, **kw)
    second = next(t for t in first[0]["token_ids"][1:] if t != FAKE_EOS)
    recs, _ = vb.generate(fake.model, [[1, 5]], eos_token_id=[FAKE_EOS, second], **kw)
    calls = [json.loads(line) for line in fake.log.read_text().splitlines()]
    assert calls[-2]["params"]["stop_token_ids"] == [FAKE_EOS, second]
    for r, f in zip(recs, first, strict=True):
        want = _cut(f["token_ids"], {FAKE_EOS, second})
        assert r["token_ids"] == want
        assert r["finish_reason"] == ("stop" if want[-1] in (FAKE_EOS, second) else "length")
    assert recs[0]["token_ids"][-1] == second and recs[0]["finish_reason"] == "stop"
