"""The teacher's own context (on-policy context distillation, config `teacher_context`): the prompts hold the
teacher's prompt beside the student's, and wherever the teacher runs (scoring, the gates' re-score, the
full-vocabulary loss, evaluation's reverse KL) it reads its context + the student's prompt and scores exactly the
student's completion tokens. Each is checked against a slow reference that writes the teacher's input out by hand,
one sequence at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from opd_tasks.config import (
    AnalysisConfig,
    ChatMessage,
    DataConfig,
    EvaluationConfig,
    GatesConfig,
    RunConfig,
    TeacherContextConfig,
)
from opd_tasks.errors import ConfigError, DataError
from tests.helpers import scored_env

PREFIX = "Worked example: 12+34=46. Now yours.\n"


def _model(spec):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32).eval()


def _tokenizer(spec):
    from opd_tasks.backends.loaded import LOADED

    return LOADED.tokenizer(spec)


@torch.no_grad()
def _completion_logprobs_by_hand(model, prompt: list[int], completion: list[int]) -> list[float]:
    logp = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0].float(), -1)
    return [float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(completion)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return scored_env(tmp_path_factory.mktemp("ctx"), prompts=3, samples=2, max_new_tokens=6, top_k=4,
                      teacher_context=TeacherContextConfig(prefix=PREFIX))


def test_the_prompts_hold_the_teachers_prompt_written_out(env) -> None:
    tok = _tokenizer(env["student"])
    for row in env["store"].read_table(env["prompts"], "prompts").to_pylist():
        assert row["teacher_prompt_token_ids"] == tok(PREFIX + row["prompt"]).input_ids
        assert row["prompt_token_ids"] == tok(row["prompt"]).input_ids
    teacher_prompts = {r["prompt_id"]: r["teacher_prompt_token_ids"]
                       for r in env["store"].read_table(env["prompts"], "prompts").to_pylist()}
    rollouts = env["store"].read_table(env["roll"], "rollouts").to_pylist()
    assert rollouts and all(r["teacher_prompt_token_ids"] == teacher_prompts[r["prompt_id"]] for r in rollouts)


def test_scores_are_the_teachers_log_probs_after_its_context(env) -> None:
    store, tok, teacher = env["store"], _tokenizer(env["student"]), _model(env["teacher"])
    prompts = {r["prompt_id"]: r["prompt"] for r in store.read_table(env["prompts"], "prompts").to_pylist()}
    scores: dict[tuple[str, int], list[float]] = {}
    for r in store.read_table(env["scores"], "teacher_scores").sort_by("pos").to_pylist():
        scores.setdefault((r["prompt_id"], r["sample_id"]), []).append(r["teacher_logprob"])
    moved = 0.0
    for r in store.read_table(env["roll"], "rollouts").to_pylist():
        if not r["token_ids"]:
            continue
        by_hand = _completion_logprobs_by_hand(teacher, tok(PREFIX + prompts[r["prompt_id"]]).input_ids,
                                               r["token_ids"])
        assert scores[(r["prompt_id"], r["sample_id"])] == pytest.approx(by_hand, abs=2e-5)
        without = _completion_logprobs_by_hand(teacher, r["prompt_token_ids"], r["token_ids"])
        moved = max(moved, max(abs(a - b) for a, b in zip(by_hand, without, strict=True)))
    assert moved > 1e-3  # the context changes what the teacher says: the check above can fail


def test_the_gates_rescore_the_teacher_with_its_context(env) -> None:
    from opd_tasks.stages import GATES, GatesInputs

    ref = GATES(env["store"], GatesInputs(student=env["student"], teacher=env["teacher"], rollouts=env["roll"],
                                          scores=env["scores"], gates=GatesConfig(max_truncated=None)), progress=False)
    gates = env["store"].manifest(ref)["meta"]["gates"]
    assert gates["teacher_repeat_diff"]["value"] < 1e-4  # with the student's prompt it would be the context's effect


def test_the_full_vocabulary_loss_reads_the_teachers_context(env) -> None:
    from opd_tasks.config import UpdateConfig
    from opd_tasks.training.objective import micro_batch_loss
    from opd_tasks.training.sequences import scored_sequences

    student, teacher = _model(env["student"]), _model(env["teacher"])
    seqs = scored_sequences(env["store"], env["roll"], env["scores"])
    assert all(s.teacher_prompt is not None and s.teacher_prompt != s.prompt for s in seqs)
    pad = _tokenizer(env["student"]).pad_token_id
    loss, _ = micro_batch_loss(student, seqs, UpdateConfig(loss="full_rkl", old_logprobs="sampler"), None, pad,
                               torch.device("cpu"), teacher=teacher)
    by_hand = 0.0
    with torch.no_grad():
        for s in seqs:
            ls = torch.log_softmax(student(torch.tensor([s.prompt + s.tokens])).logits[0].float(), -1)
            lt = torch.log_softmax(teacher(torch.tensor([s.teacher_prompt + s.tokens])).logits[0].float(), -1)
            for j in range(len(s.tokens)):
                p, q = ls[len(s.prompt) + j - 1], lt[len(s.teacher_prompt) + j - 1]
                by_hand += float((p.exp() * (p - q)).sum())
    assert float(loss.detach()) == pytest.approx(by_hand, rel=1e-4)


def test_evaluation_measures_the_reverse_kl_to_the_teacher_with_its_context(env) -> None:
    from opd_tasks.stages import EVALUATE, EvaluateInputs

    store = env["store"]
    cfg = EvaluationConfig(max_new_tokens=5, batch_size=4)
    ref = EVALUATE(store, EvaluateInputs(model=env["student"], teacher=env["teacher"], prompts=env["prompts"],
                                         evaluation=cfg, checker="testbed", seed=0), progress=False)
    evals, meta = store.read_table(ref, "evals").to_pylist(), store.manifest(ref)["meta"]
    tok, student, teacher = _tokenizer(env["student"]), _model(env["student"]), _model(env["teacher"])
    prompts = {r["prompt_id"]: r for r in store.read_table(env["prompts"], "prompts").to_pylist()}
    total, checked = 0.0, 0
    for e in evals:
        answer = tok(e["text"], add_special_tokens=False).input_ids  # the answer's tokens, decoded and re-encoded
        p = prompts[e["prompt_id"]]
        kl = 0.0
        with torch.no_grad():
            ls = torch.log_softmax(student(torch.tensor([p["prompt_token_ids"] + answer])).logits[0].float(), -1)
            lt = torch.log_softmax(teacher(torch.tensor([p["teacher_prompt_token_ids"] + answer])).logits[0].float(),
                                   -1)
        for j in range(len(answer)):
            a, b = ls[len(p["prompt_token_ids"]) + j - 1], lt[len(p["teacher_prompt_token_ids"]) + j - 1]
            kl += float((a.exp() * (a - b)).sum())
        if len(answer) == e["num_tokens"]:  # the re-encoding is the generated ids (no EOS, no merge)
            assert e["rkl"] == pytest.approx(kl, rel=1e-4, abs=1e-5)
            checked += 1
        total += e["rkl"]
    assert checked >= len(evals) // 2
    assert meta["rkl_per_sequence"] == pytest.approx(total / len(evals), rel=1e-6)
    assert meta["rkl_per_token"] == pytest.approx(total / sum(e["num_tokens"] for e in evals), rel=1e-6)
    assert meta["truncated"] == sum(e["truncated"] for e in evals) / len(evals)
    assert all(e["truncated"] == (e["num_tokens"] == 5) for e in evals if e["num_tokens"] < 5)


def test_a_teacher_that_is_the_student_without_a_context_has_no_reverse_kl(env) -> None:
    from opd_tasks.stages import EVALUATE, PROMPTS, EvaluateInputs, PromptsInputs

    store = env["store"]
    plain = PROMPTS(store, PromptsInputs(data=DataConfig(), tokenizer=env["student"], split="test", n=4, offset=0,
                                         max_context=None, seed=0))
    ref = EVALUATE(store, EvaluateInputs(model=env["student"], teacher=env["student"], prompts=plain,
                                         evaluation=EvaluationConfig(max_new_tokens=5), checker="testbed", seed=0),
                   progress=False)
    assert all(abs(v) < 1e-6 for v in store.read_table(ref, "evals").column("rkl").to_pylist())


def _analyze(env, cfg: AnalysisConfig):
    from opd_tasks.method import plan
    from opd_tasks.stages import ANALYZE, AnalyzeInputs

    p = plan(RunConfig(method="topd"))  # with the bridge: the teacher's continuations at divergent positions
    return ANALYZE(env["store"], AnalyzeInputs(
        student=env["student"], teacher=env["teacher"], rollouts=env["roll"], scores=env["scores"], analysis=cfg,
        weighting=p.weighting, bridge=True, label_roles=False, seed=0), progress=False)


def _logprobs_one_by_one(model, prefix: list[int], cont: list[int]) -> list[float]:
    """log p(cont[j] | prefix + cont[:j]), one full forward per token (no cache, no batch, no padding)."""
    with torch.no_grad():
        return [float(torch.log_softmax(model(torch.tensor([prefix + cont[:j]])).logits[0, -1].float(), -1)[t])
                for j, t in enumerate(cont)]


def _greedy(model, prefix: list[int], k: int) -> list[int]:
    from opd_tasks.backends.hf import generate

    return generate(model, [prefix], eos_token_id=2, pad_token_id=0, n=1, temperature=0.0, max_new_tokens=k,
                    progress=False)[0].token_ids


def _prefixes(env, p: dict) -> tuple[list[int], list[int], list[int]]:
    """(the student's prefix s_t, the teacher's: its context + the same, the completion) of probe row `p`."""
    tok = _tokenizer(env["student"])
    prompts = {r["prompt_id"]: r["prompt"] for r in env["store"].read_table(env["prompts"], "prompts").to_pylist()}
    roll = {(r["prompt_id"], r["sample_id"]): r for r in env["store"].read_table(env["roll"], "rollouts").to_pylist()}
    r = roll[(p["prompt_id"], p["sample_id"])]
    done = r["token_ids"][: p["pos"]]
    return tok(prompts[p["prompt_id"]]).input_ids + done, tok(PREFIX + prompts[p["prompt_id"]]).input_ids + done, \
        r["token_ids"]


def _swap_by_hand(teacher, prefix: list[int], y: list[int], t: int, window: int = 3) -> float:
    """swap's D_t at completion position t after `prefix`: the teacher re-reads y_t+1..y_t+W after y_t and after
    a_t, its most likely token other than y_t."""
    fut = y[t + 1 : t + 1 + window]
    with torch.no_grad():
        logits = teacher(torch.tensor([prefix])).logits[0, -1]
    logits[y[t]] = -float("inf")
    own = _logprobs_one_by_one(teacher, prefix + [y[t]], fut)
    alt = _logprobs_one_by_one(teacher, prefix + [int(logits.argmax())], fut)
    return sum(a - b for a, b in zip(own, alt, strict=True)) / len(fut) if fut else 0.0


@pytest.mark.parametrize("delta_mode", ["absolute", "quantile"])
def test_swap_rereads_the_student_tokens_after_the_teachers_context(env, delta_mode: str) -> None:
    """`swap` with a context: D_t = mean_j[log T(y_t+j | c, s_t, y_t, ..) - log T(y_t+j | c, s_t, a_t, ..)], the
    teacher reading its context c (written out by hand) before the student's prefix, one forward per token; a_t from
    the teacher's own logits after c + s_t; a divergent position's bridge is the teacher's greedy continuation
    after c + s_t (made block by block with an absolute delta, in the merge with a quantile one). Without c the
    values differ, so each check can fail."""
    cfg = AnalysisConfig(detector="swap", window=3, probe_tokens=3, probe_budget=2, batch_size=4,
                         high_loss_quantile=0.5, delta_mode=delta_mode, delta=0.0 if delta_mode == "absolute" else 0.5)
    ref = _analyze(env, cfg)
    probes = env["store"].read_table(ref, "probes").to_pylist()
    delta = env["store"].manifest(ref)["meta"]["delta"]
    teacher = _model(env["teacher"])
    assert len(probes) >= 3
    moved, bridged = 0.0, 0
    for p in probes:
        student_prefix, teacher_prefix, y = _prefixes(env, p)
        assert p["distance"] == pytest.approx(_swap_by_hand(teacher, teacher_prefix, y, p["pos"]), abs=1e-4)
        moved = max(moved, abs(_swap_by_hand(teacher, student_prefix, y, p["pos"]) - p["distance"]))
        if p["distance"] >= delta:
            assert p["teacher_continuation"] == _greedy(teacher, teacher_prefix, 3)
            bridged += 1
        else:
            assert p["teacher_continuation"] == []
    assert moved > 1e-3 and bridged > 0


@pytest.mark.parametrize("probe_student", ["realised", "greedy"])
def test_the_probe_continues_the_teacher_after_its_context(env, probe_student: str) -> None:
    """`probe` (xent) with a context: the teacher's continuation c_T is its greedy one after c + s_t and its
    log-probs are read after c + s_t, the student's after s_t alone: distance = 0.5 * (mean_j[log T(c_T | c, s_t) -
    log S(c_T | s_t)] + mean_j[log S(c_S | s_t) - log T(c_S | c, s_t)]), recomputed one token at a time."""
    cfg = AnalysisConfig(detector="probe", distance="xent", probe_student=probe_student, probe_tokens=3,
                         probe_budget=2, batch_size=4)
    probes = env["store"].read_table(_analyze(env, cfg), "probes").to_pylist()
    student, teacher = _model(env["student"]), _model(env["teacher"])
    assert len(probes) >= 3
    differs = 0
    for p in probes:
        student_prefix, teacher_prefix, y = _prefixes(env, p)
        c_t, c_s = p["teacher_continuation"], p["student_continuation"]
        assert c_t == _greedy(teacher, teacher_prefix, 3)
        differs += c_t != _greedy(teacher, student_prefix, 3)
        realised = y[p["pos"] : p["pos"] + 3]
        assert c_s == (realised if probe_student == "realised" else _greedy(student, student_prefix, 3))
        gap_t = np.mean(np.subtract(_logprobs_one_by_one(teacher, teacher_prefix, c_t),
                                    _logprobs_one_by_one(student, student_prefix, c_t)))
        gap_s = np.mean(np.subtract(_logprobs_one_by_one(student, student_prefix, c_s),
                                    _logprobs_one_by_one(teacher, teacher_prefix, c_s)))
        assert p["distance"] == pytest.approx(0.5 * (gap_t + gap_s), abs=1e-4)
    assert differs > 0  # the context changes what the teacher writes: the continuation check can fail


def test_no_detector_is_refused_with_a_context() -> None:
    from opd_tasks.stages import check_config

    for detector in ("window", "probe", "swap", "oracle"):
        check_config(RunConfig.model_validate({"method": "topd", "teacher_context": {"prefix": "x"},
                                               "analysis": {"detector": detector}}))


# ------------------------------------------------------------------ chat rendering and the messages column


def _chat_tokenizer(spec):
    tok = _tokenizer(spec)
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}[sys]default\n{% endif %}{% for m in messages %}"
                         "[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant]"
                         "{% endif %}")
    return tok


def test_chat_data_renders_the_teachers_conversation_once_with_its_context(env, tmp_path: Path) -> None:
    from opd_tasks.data import load_prompts

    tok = _chat_tokenizer(env["student"])
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, '
                    '{"role": "user", "content": "2+2?"}], "answer": "4"}\n'
                    '{"messages": [{"role": "user", "content": "3+3?"}], "answer": "6"}\n')
    cfg = DataConfig(source="dataset", path=str(data), prompt_column="messages", eval_size=1)
    context = TeacherContextConfig(messages=[ChatMessage(role="user", content="1+1?"),
                                             ChatMessage(role="assistant", content="2")])
    records = load_prompts(cfg, tok, "train", None, 0, teacher_context=context) + load_prompts(
        cfg, tok, "test", None, 0, teacher_context=context)
    texts = sorted((r.text, tok.decode(r.teacher_token_ids)) for r in records)
    assert texts[0] == ("[sys]default\n[user]3+3?\n[assistant]",
                        "[sys]default\n[user]1+1?\n[assistant]2\n[user]3+3?\n[assistant]")
    assert texts[1][0] == "[sys]default\n[user]hi\n[assistant]hello\n[user]2+2?\n[assistant]"
    assert texts[1][1] == "[sys]default\n[user]1+1?\n[assistant]2\n[user]hi\n[assistant]hello\n[user]2+2?\n[assistant]"
    system = load_prompts(cfg, tok, "test", None, 0, teacher_context=TeacherContextConfig(system="be brief"))
    assert tok.decode(system[0].teacher_token_ids).startswith("[system]be brief\n[user]")


@pytest.mark.parametrize(("cell", "pattern"), [
    ('[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]', "ends with a 'assistant' turn"),
    ('[{"role": "narrator", "content": "q"}]', "role one of"),
    ("[]", "an empty list"),
])
def test_a_bad_conversation_names_its_row(env, tmp_path: Path, cell: str, pattern: str) -> None:
    from opd_tasks.data import load_prompts

    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "fine"}], "answer": "1"}\n'
                    f'{{"messages": {cell}, "answer": "2"}}\n')
    cfg = DataConfig(source="dataset", path=str(data), prompt_column="messages", eval_size=1)
    with pytest.raises(DataError, match=rf"row 1, column 'messages'.*{pattern}"):
        load_prompts(cfg, _chat_tokenizer(env["student"]), "train", None, 0)


def test_a_context_of_the_wrong_kind_for_the_data_is_refused(env) -> None:
    from opd_tasks.data import teacher_text

    tok = _chat_tokenizer(env["student"])
    with pytest.raises(ConfigError, match="need chat-formatted data"):
        teacher_text(tok, "q", False, TeacherContextConfig(system="s"))
    with pytest.raises(ConfigError, match=r"prefix is for plain-text prompts; with chat-formatted data "
                                          r"\(data.chat_template: true, or a messages column\)"):
        teacher_text(tok, "q", True, TeacherContextConfig(prefix="p"))
