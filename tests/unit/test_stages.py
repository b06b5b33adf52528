"""Rollout, teacher scoring, update and evaluate on tiny random models, each against an independent reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from opd_tasks.backends.hf import load_causal_lm, score_sequences
from opd_tasks.config import DataConfig, EvaluationConfig, RolloutConfig, ScoringConfig, UpdateConfig
from opd_tasks.errors import ModelError, TrainingError
from opd_tasks.models import ModelSpec
from opd_tasks.stages import (
    EVALUATE,
    PROMPTS,
    ROLLOUT,
    SCORE,
    UPDATE,
    EvaluateInputs,
    PromptsInputs,
    RolloutInputs,
    ScoreInputs,
    UpdateInputs,
)
from opd_tasks.stages.evaluate import accuracy
from opd_tasks.training.checkpoint import save_checkpoint
from opd_tasks.training.sequences import group_tokens
from storage.store import ArtifactStore
from tests.helpers import scored_env

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    return scored_env(tmp_path_factory.mktemp("stages"), prompts=6, samples=3, max_new_tokens=12, top_k=5,
                      score_batch=4)


def _prompts(store: ArtifactStore, tokenizer: ModelSpec, split: str = "train", n: int = 6):
    return PROMPTS(store, PromptsInputs(data=DataConfig(), tokenizer=tokenizer, split=split, n=n, offset=0,
                                        max_context=None, seed=0))


def _rollout(store: ArtifactStore, student: ModelSpec, prompts, cfg: RolloutConfig, seed: int):
    return ROLLOUT(store, RolloutInputs(student=student, prompts=prompts, rollout=cfg, checker="testbed", seed=seed),
                   progress=False)


def _update_inputs(env, cfg: UpdateConfig, seed: int, student: ModelSpec | None = None, scores=None) -> UpdateInputs:
    return UpdateInputs(student=student or env["student"], rollouts=env["roll"], scores=scores or env["scores"],
                        analysis=None, teacher=env["teacher"], update=cfg, bridge=None, seed=seed)


def _update(env, cfg: UpdateConfig, seed: int, student: ModelSpec | None = None):
    return UPDATE(env["store"], _update_inputs(env, cfg, seed, student), progress=False)


def test_rollout_table_is_consistent_and_reproducible(env) -> None:
    store: ArtifactStore = env["store"]
    t = store.read_table(env["roll"])
    assert t.num_rows == 18
    assert sorted(set(t.column("sample_id").to_pylist())) == [0, 1, 2]
    eos = 2
    for toks, lps, reason in zip(t.column("token_ids").to_pylist(), t.column("logprobs").to_pylist(),
                                 t.column("finish_reason").to_pylist(), strict=True):
        assert len(toks) == len(lps) >= 1
        assert all(lp <= 0 for lp in lps)
        assert (reason == "stop") == (toks[-1] == eos) and eos not in toks[:-1]
        assert reason == "stop" or len(toks) == 12
    # A fresh store, same inputs and seed: the same bytes (content hash).
    other = ArtifactStore(env["base"] / "other-root")
    p2 = _prompts(other, env["student"])
    r2 = _rollout(other, env["student"], p2, env["roll_cfg"], seed=0)
    assert other.read_table(r2).equals(t)
    r3 = _rollout(other, env["student"], p2, env["roll_cfg"], seed=1)
    assert not other.read_table(r3).column("token_ids").equals(t.column("token_ids"))


def test_sampling_logprobs_equal_teacher_forced_recompute(env) -> None:
    t = env["store"].read_table(env["roll"])
    model = load_causal_lm(env["student"].path, CPU)
    rescored = score_sequences(model, t.column("prompt_token_ids").to_pylist(), t.column("token_ids").to_pylist(),
                               pad_token_id=0, top_k=1, batch_size=5, progress=False)
    for lps, sc in zip(t.column("logprobs").to_pylist(), rescored, strict=True):
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(sc.logprob), rtol=1e-4, atol=1e-4)


def test_teacher_scores_equal_slow_loop(env) -> None:
    store = env["store"]
    roll = store.read_table(env["roll"])
    scores = group_tokens(store.read_table(env["scores"]), ["teacher_logprob", "teacher_entropy", "topk_ids",
                                                            "topk_logprobs", "token_id"])
    model = load_causal_lm(env["teacher"].path, CPU)
    checked = 0
    for pid, sid, prompt, comp in zip(*(roll.column(c).to_pylist() for c in
                                        ("prompt_id", "sample_id", "prompt_token_ids", "token_ids")), strict=True):
        got = scores[(pid, sid)]
        assert got["token_id"] == comp
        for j, tok in enumerate(comp):  # one unpadded forward per token: the obvious way
            with torch.no_grad():
                logits = model(torch.tensor([prompt + comp[:j]])).logits[0, -1].double()
            logp = torch.log_softmax(logits, -1)
            assert got["teacher_logprob"][j] == pytest.approx(logp[tok].item(), abs=1e-4)
            assert got["teacher_entropy"][j] == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-4)
            top = logp.topk(5)
            assert got["topk_ids"][j] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor(got["topk_logprobs"][j], dtype=torch.float64), top.values,
                                       rtol=0, atol=1e-4)
            checked += 1
    assert checked == sum(len(c) for c in roll.column("token_ids").to_pylist())


def test_padding_and_batching_never_change_a_value(env) -> None:
    model = load_causal_lm(env["teacher"].path, CPU)
    prompts = [[1, 20, 21, 22], [1, 30], [1, 40, 41, 42, 43, 44, 45]]
    comps = [[50, 51, 52], [60, 61, 62, 63, 64, 65], [70]]
    alone = [score_sequences(model, [p], [c], pad_token_id=0, top_k=3, progress=False)[0]
             for p, c in zip(prompts, comps, strict=True)]
    batched = score_sequences(model, prompts, comps, pad_token_id=0, top_k=3, batch_size=3, progress=False)
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(torch.tensor(a.logprob), torch.tensor(b.logprob), rtol=1e-5, atol=1e-5)
        assert a.topk_ids == b.topk_ids


def test_tokenizer_mismatch_is_refused(env) -> None:
    bad_dir = env["base"] / "bad-teacher"
    shutil.copytree(env["teacher"].path, bad_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bad_dir)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(bad_dir)
    bad = ModelSpec(path=str(bad_dir), sha256="0" * 64)
    with pytest.raises(ModelError, match="vocab size: teacher 128 vs student 127"):
        SCORE(env["store"], ScoreInputs(teacher=bad, student=env["student"], rollouts=env["roll"],
                                        scoring=ScoringConfig(top_k=3)), progress=False)


def _weights(spec: ModelSpec) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(spec.path) / "model.safetensors"))


def test_update_checkpoint_cache_and_microbatch_invariance(env) -> None:
    store = env["store"]
    cfg = UpdateConfig(learning_rate=1e-2, micro_batch_size=18, grad_accumulation=1)
    ref = _update(env, cfg, seed=0)
    upd = store.read_table(ref, "updates")
    assert upd.num_rows == 1 and upd.column("tokens_trained")[0].as_py() == sum(
        len(x) for x in store.read_table(env["roll"]).column("token_ids").to_pylist())
    n_pub = len(store.published)
    assert _update(env, cfg, seed=0) == ref
    assert len(store.published) == n_pub  # a cache hit publishes nothing
    new = ModelSpec.from_checkpoint(store, ref)
    assert new.checkpoint == ref and new.sha256 == ref.sha256
    # The tokenizer files are the student's, byte for byte (never how this process happened to load them).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (new.dir / name).read_bytes() == (env["student"].dir / name).read_bytes(), name
    before, after = _weights(env["student"]), _weights(new)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Same optimizer step split into 3 micro-batches x accumulation 3: same weights.
    cfg2 = UpdateConfig(learning_rate=1e-2, micro_batch_size=6, grad_accumulation=3)
    ref2 = _update(env, cfg2, seed=0)
    w2 = _weights(ModelSpec.from_checkpoint(store, ref2))
    for k in after:
        torch.testing.assert_close(after[k], w2[k], rtol=1e-4, atol=1e-5)  # fp32 summation order


def test_resume_equals_uninterrupted(env) -> None:
    """Optimizer and RNG state carry over. With the sampler's old log-probs: with recomputed ones, the resumed update
    would take its own starting model as the old policy of rollouts it did not sample (the uninterrupted one keeps
    the first model's), a different objective by design."""
    store = env["store"]
    one = UpdateConfig(learning_rate=5e-3, micro_batch_size=4, epochs=1, old_logprobs="sampler")
    two = UpdateConfig(learning_rate=5e-3, micro_batch_size=4, epochs=2, old_logprobs="sampler")
    straight = _update(env, two, seed=3)
    first = _update(env, one, seed=3)
    resumed = _update(env, one, seed=3, student=ModelSpec.from_checkpoint(store, first))
    a = _weights(ModelSpec.from_checkpoint(store, straight))
    b = _weights(ModelSpec.from_checkpoint(store, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    steps = store.read_table(resumed, "updates").column("step").to_pylist()
    assert steps == list(range(5, 10))  # counters continue: 18 sequences / 4 per step = 5 steps per epoch


def test_bfloat16_optimizer_state_halves_it_and_the_next_update_continues_from_the_rounded_moments(env) -> None:
    """update.optimizer_state: bfloat16 stores AdamW's moments rounded to bfloat16 (the step counts as they are):
    the float32 run's moments rounded, in about half the bytes; the update after it trains from them, close to the
    float32 chain; and the key changes only for the new setting (a float32 key is what it was before the field)."""
    from safetensors.torch import load_file

    from opd_tasks.stages import UPDATE
    from opd_tasks.training.checkpoint import OPTIMIZER_FILE

    store = env["store"]
    full = UpdateConfig(learning_rate=5e-3, micro_batch_size=6, old_logprobs="sampler")
    half = full.model_copy(update={"optimizer_state": "bfloat16"})
    assert "optimizer_state" not in full.key_slice() and half.key_slice()["optimizer_state"] == "bfloat16"
    assert UPDATE.key(_update_inputs(env, full, 0)) != UPDATE.key(_update_inputs(env, half, 0))
    a, b = _update(env, full, seed=0), _update(env, half, seed=0)
    sa, sb = (load_file(str(store.path_of(r) / "state" / OPTIMIZER_FILE)) for r in (a, b))
    assert sa.keys() == sb.keys() and any(k.endswith(".exp_avg_sq") for k in sa)
    for k, v in sa.items():
        if v.dim() == 0:  # the step count
            assert sb[k].dtype == v.dtype and torch.equal(sb[k], v)
        else:
            assert sb[k].dtype == torch.bfloat16 and torch.equal(sb[k], v.to(torch.bfloat16)), k
    size = {r: (store.path_of(r) / "state" / OPTIMIZER_FILE).stat().st_size for r in (a, b)}
    assert size[b] < 0.55 * size[a]
    wa, wb = _weights(ModelSpec.from_checkpoint(store, a)), _weights(ModelSpec.from_checkpoint(store, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the same first update: only what is stored differs
    next_a = _weights(ModelSpec.from_checkpoint(store, _update(env, full, 0, ModelSpec.from_checkpoint(store, a))))
    next_b = _weights(ModelSpec.from_checkpoint(store, _update(env, half, 0, ModelSpec.from_checkpoint(store, b))))
    moved = max(float((next_a[k] - next_b[k]).abs().max()) for k in next_a)
    assert 0 < moved < 5e-3 * 0.05  # a step of lr 5e-3 is changed by the moments' rounding, by under 5% of it


def test_checkpoint_round_trip_identical_logits(env, tmp_path: Path) -> None:
    model = load_causal_lm(env["student"].path, CPU, "float32")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 5, 6, 7]])).logits.sum().backward()
    opt.step()
    from transformers import AutoTokenizer

    store = ArtifactStore(tmp_path)
    with store.writer("update", "ee" * 32) as w:
        save_checkpoint(w.path, model, AutoTokenizer.from_pretrained(env["student"].path), env["student"].dir, opt,
                        {"global_step": 1, "global_epoch": 1}, seed=0)
        ref = w.commit()
    spec = ModelSpec.from_checkpoint(store, ref)
    loaded = load_causal_lm(spec.path, CPU, "float32")
    x = torch.tensor([[1, 9, 8, 7, 6, 5]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    state = json.loads((store.path_of(ref) / "state" / "trainer.json").read_text())
    assert state["global_step"] == 1 and len(state["rng_cpu"]) > 100


def test_nan_loss_stops_update_and_publishes_nothing(env) -> None:
    store = env["store"]
    t = store.read_table(env["scores"])
    nan = t.set_column(t.column_names.index("teacher_logprob"), "teacher_logprob",
                       pa.array([float("nan")] * t.num_rows, pa.float32()))
    bad_scores = store.put_table("score", "dd" * 32, "teacher_scores", nan)
    inputs = _update_inputs(env, UpdateConfig(), seed=0, scores=bad_scores)
    with pytest.raises(TrainingError, match="not finite.*previous checkpoint"):
        UPDATE(store, inputs, progress=False)
    assert store.lookup("update", UPDATE.key(inputs)) is None


@pytest.mark.parametrize("loss", ["topk_rkl", "full_rkl"])
def test_supervised_losses_move_student_toward_teacher(env, loss: str) -> None:
    """After a few epochs on the same rollouts, the student's full-vocab reverse KL to the teacher drops."""
    store = env["store"]
    roll = store.read_table(env["roll"])
    prompts, comps = roll.column("prompt_token_ids").to_pylist(), roll.column("token_ids").to_pylist()
    teacher = load_causal_lm(env["teacher"].path, CPU)

    def rkl(spec: ModelSpec) -> float:
        from opd_tasks.backends.hf import completion_logits, pack_right
        from opd_tasks.training.losses import full_rkl

        m = load_causal_lm(spec.path, CPU)
        ids, attn, pred, cm = pack_right(prompts, comps, 0)
        with torch.no_grad():
            s, t = completion_logits(m, ids, attn, pred), completion_logits(teacher, ids, attn, pred)
        return (full_rkl(s, t, torch.ones_like(cm, dtype=torch.float32), cm.float()) / cm.sum()).item()

    cfg = UpdateConfig(loss=loss, learning_rate=3e-3, micro_batch_size=6, epochs=8)
    ref = _update(env, cfg, seed=0)
    assert rkl(ModelSpec.from_checkpoint(store, ref)) < 0.9 * rkl(env["student"])


def test_pg_step_shrinks_per_token_gap_on_its_samples(env) -> None:
    """One small policy-gradient step lowers log pi_S where it exceeds log pi_T and raises it where it is
    below: the squared per-token gap k1 on the sampled tokens shrinks."""
    store = env["store"]
    roll = store.read_table(env["roll"])
    prompts, comps = roll.column("prompt_token_ids").to_pylist(), roll.column("token_ids").to_pylist()
    t_lp = [torch.tensor(s.logprob) for s in score_sequences(load_causal_lm(env["teacher"].path, CPU), prompts,
                                                             comps, pad_token_id=0, top_k=1, progress=False)]

    def gap(spec: ModelSpec) -> float:
        sc = score_sequences(load_causal_lm(spec.path, CPU), prompts, comps, pad_token_id=0, top_k=1,
                             progress=False)
        return float(sum(((torch.tensor(s.logprob) - t) ** 2).sum() for s, t in zip(sc, t_lp, strict=True)))

    ref = _update(env, UpdateConfig(loss="pg", learning_rate=1e-3, micro_batch_size=18), seed=0)
    assert gap(ModelSpec.from_checkpoint(store, ref)) < gap(env["student"])


@pytest.mark.parametrize("pass_k", [1, 3])
def test_evaluate_checks_the_trained_students_answers_against_arithmetic(tmp_path: Path, pass_k: int) -> None:
    """The committed (trained) testbed student answers 30 held-out sums: each sample's `correct` equals an
    independent check (the last number of the completion against a + b computed from the prompt text); accuracy
    is the mean over samples, pass@k the share of prompts with a correct sample. Some answers are right and some
    wrong, so neither outcome passes by default."""
    import re

    from opd_tasks.config import ModelRef
    from opd_tasks.models import spec_of

    store = ArtifactStore(tmp_path)
    student = spec_of(ModelRef(path="testbed:student"))
    prompts = _prompts(store, student, split="test", n=30)
    ref = EVALUATE(store, EvaluateInputs(model=student, prompts=prompts, evaluation=EvaluationConfig(pass_k=pass_k),
                                         checker="testbed", seed=0), progress=False)
    t = store.read_table(ref, "evals")
    assert t.num_rows == 30 * pass_k
    asked = dict(zip(*(store.read_table(prompts).column(c).to_pylist() for c in ("prompt_id", "prompt")),
                     strict=True))
    expected = []
    for pid, text in zip(t.column("prompt_id").to_pylist(), t.column("text").to_pylist(), strict=True):
        a, b = map(int, re.fullmatch(r"Q: (\d+)\+(\d+)=\?\n", asked[pid]).groups())
        numbers = re.findall(r"\d+", text)
        expected.append(bool(numbers) and int(numbers[-1]) == a + b)
    assert t.column("correct").to_pylist() == expected
    assert 0 < sum(expected) < len(expected)
    assert accuracy(store, ref) == sum(expected) / len(expected)
    meta = store.manifest(ref)["meta"]
    early = [bool(re.search(r"\b(?:so|thus|hence|therefore)\b", text))
             and len(re.findall(r"\d+(?:\+\d+)+=\d+", text)) < max(map(len, re.findall(r"\d+", asked[pid])))
             for pid, text in zip(t.column("prompt_id").to_pylist(), t.column("text").to_pylist(), strict=True)]
    assert meta["early_stop_rate"] == sum(early) / len(early)
    if pass_k > 1:
        by_prompt: dict[str, bool] = {}
        for pid, ok in zip(t.column("prompt_id").to_pylist(), expected, strict=True):
            by_prompt[pid] = by_prompt.get(pid, False) or ok
        assert meta["pass_at_k"] == sum(by_prompt.values()) / 30 and meta["k"] == pass_k
        assert meta["pass_at_k"] >= meta["accuracy"]
    else:
        assert "pass_at_k" not in meta


def test_models_load_without_remote_code_unless_configured(env, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from opd_tasks.config import ModelRef

    seen = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(path, **kw)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    assert ModelRef(path="x").trust_remote_code is False
    load_causal_lm(env["student"].path, CPU)
    load_causal_lm(env["student"].path, CPU, trust_remote_code=True)
    assert seen == [False, True]
