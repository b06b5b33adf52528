"""Old log-probs of the PPO ratio (issue 19, item 8): the trainer recomputes them (default) or takes the sampler's
(`update.old_logprobs: sampler`); the update records both. Each figure against a slow, obvious loop."""

from __future__ import annotations

import math

import pytest
import torch

from opd_tasks.backends.hf import load_causal_lm
from opd_tasks.config import UpdateConfig
from opd_tasks.stages import UPDATE, UpdateInputs
from opd_tasks.training.logprobs import completion_logprobs
from opd_tasks.training.objective import micro_batch_loss
from opd_tasks.training.sequences import ScoredSequence, scored_sequences
from tests.helpers import scored_env

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    return scored_env(tmp_path_factory.mktemp("old-logprobs"), prompts=4, samples=2, max_new_tokens=10, top_k=4)


def slow_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log p(completion[j] | prompt + completion[:j]), one unpadded forward per token."""
    out = []
    with torch.no_grad():
        for j, tok in enumerate(completion):
            logits = model(input_ids=torch.tensor([prompt + completion[:j]])).logits[0, -1].double()
            out.append(float(torch.log_softmax(logits, -1)[tok]))
    return out


def _seqs(env) -> list[ScoredSequence]:
    return scored_sequences(env["store"], env["roll"], env["scores"])


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_completion_logprobs_equal_a_slow_loop(env, batch_size: int) -> None:
    model = load_causal_lm(env["student"].path, CPU, "float32")
    seqs = _seqs(env)
    got = completion_logprobs(model, [s.prompt for s in seqs], [s.tokens for s in seqs], pad_token_id=0,
                              batch_size=batch_size)
    for s, lps in zip(seqs, got, strict=True):
        assert lps == pytest.approx(slow_logprobs(model, s.prompt, s.tokens), abs=2e-5)


def test_update_records_sampler_and_recomputed_logprobs(env) -> None:
    """The `old_logprobs` table holds the rollout's sampling log-probs as written and the trainer's recomputation,
    which equals the slow loop on the starting student; on the fp32 CPU testbed the two agree closely."""
    store = env["store"]
    ref = UPDATE(store, UpdateInputs(student=env["student"], rollouts=env["roll"], scores=env["scores"],
                                     analysis=None, teacher=env["teacher"], update=UpdateConfig(micro_batch_size=3),
                                     bridge=None, seed=0), progress=False)
    rows = store.read_table(ref, "old_logprobs").to_pylist()
    model = load_causal_lm(env["student"].path, CPU, "float32")
    seqs = _seqs(env)
    assert len(rows) == sum(len(s.tokens) for s in seqs)
    by_key = {(r["prompt_id"], r["sample_id"], r["pos"]): r for r in rows}
    diffs = []
    for s in seqs:
        slow = slow_logprobs(model, s.prompt, s.tokens)
        for pos, (sampled, ref_lp) in enumerate(zip(s.sampling_logprobs, slow, strict=True)):
            row = by_key[(s.prompt_id, s.sample_id, pos)]
            assert row["sampling_logprob"] == pytest.approx(sampled, abs=0)  # float32 as written by the rollout
            assert row["trainer_logprob"] == pytest.approx(ref_lp, abs=2e-5)
            diffs.append(abs(row["sampling_logprob"] - row["trainer_logprob"]))
    assert max(diffs) < 1e-4  # sampler and trainer are both fp32 here
    meta = store.manifest(ref)["meta"]
    assert meta["old_logprobs"] == "recompute"
    assert meta["logprob_drift"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-3, abs=1e-9)


def _batch(env, shift: float) -> list[ScoredSequence]:
    """The first sequences, with trainer log-probs equal to the slow loop's and sampler log-probs `shift` above."""
    model = load_causal_lm(env["student"].path, CPU, "float32")
    out = []
    for s in _seqs(env)[:3]:
        slow = slow_logprobs(model, s.prompt, s.tokens)
        out.append(ScoredSequence(s.prompt_id, s.sample_id, s.prompt, s.tokens, [v + shift for v in slow],
                                  s.teacher_logprobs, trainer_logprobs=slow))
    return out


@pytest.mark.parametrize("source", ["recompute", "sampler"])
def test_the_switch_chooses_the_old_logprobs_of_the_ratio(env, source: str) -> None:
    """On the unchanged model the current log-probs equal the trainer's, so (no clip, weight 1) the pg loss is
    sum_t r_t * (old_t - teacher_t) with r_t = exp(trainer_t - old_t): with the recomputed old log-probs r = 1;
    with the sampler's, `shift` above them, r = exp(-shift) and the advantage is shifted too."""
    shift = 0.3
    batch = _batch(env, shift)
    model = load_causal_lm(env["student"].path, CPU, "float32")
    cfg = UpdateConfig(clip_ratio=None, old_logprobs=source)
    with torch.no_grad():
        loss, stats = micro_batch_loss(model, batch, cfg, None, 0, CPU)
    want, kl = 0.0, 0.0
    for s in batch:
        for trainer, sampled, teacher in zip(s.trainer_logprobs, s.sampling_logprobs, s.teacher_logprobs,
                                             strict=True):
            old = trainer if source == "recompute" else sampled
            want += math.exp(trainer - old) * (old - teacher)
            kl += old - teacher
    assert loss.item() == pytest.approx(want, rel=1e-4)
    assert stats["kl"] == pytest.approx(kl, rel=1e-4)


def test_recompute_without_trainer_logprobs_is_an_error_naming_the_field(env) -> None:
    s = _seqs(env)[0]
    with pytest.raises(ValueError, match="update.old_logprobs is 'recompute'"):
        s.old_logprobs("recompute")
    assert s.old_logprobs("sampler") is s.sampling_logprobs
    with pytest.raises(ValueError, match="update.old_logprobs must be"):
        s.old_logprobs("vllm")
