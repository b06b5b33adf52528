"""The labeler: hand-labelled cases, malformed text, and labels of real token ids."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_tasks.config import TestbedTaskConfig
from opd_tasks.testbed.labeler import ROLES, label_chars, label_spans, label_token_ids
from opd_tasks.testbed.styles import STYLES
from opd_tasks.testbed.task import generate_problems, render_completion
from opd_tasks.testbed.tokenizer import build_tokenizer

F, R, A, U, K, L = "form", "reasoning", "answer", "unknown", "fork", "filler"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _labels(tok, text, eos=True):
    ids = tok(text, add_special_tokens=False).input_ids + ([tok.eos_token_id] if eos else [])
    return list(zip(tok.convert_ids_to_tokens(ids), label_token_ids(tok, ids), strict=True))


def test_hand_labelled_teacher_style(tok):
    got = _labels(tok, "3+9+0=12 ; 2+8+1=11 so 112.")
    assert got == [
        ("3", R), ("+", F), ("9", R), ("+", F), ("0", R), ("=", F), ("1", R), ("2", R),
        (" ;", F), (" ", F),
        ("2", R), ("+", F), ("8", R), ("+", F), ("1", R), ("=", F), ("1", R), ("1", R),
        (" so", F), (" ", F), ("1", A), ("1", A), ("2", A), (".", F), ("<eos>", F),
    ]  # fmt: skip


def test_hand_labelled_student_phrases(tok):
    got = _labels(tok, "7+5+0=12 then 0+0+1=1 hence the answer is 12.")
    assert [t for t, lab in got if lab == A] == ["1", "2"]
    assert [t for t, lab in got if lab == F and t.strip().isalpha()] == [" then", " hence", " the", " answer", " is"]
    assert [t for t, lab in got if lab == R] == list("750120011")
    got = _labels(tok, "7+5+0=12 and 0+0+1=1 therefore = 12", eos=False)
    assert got[-5:] == [(" therefore", F), (" =", F), (" ", F), ("1", A), ("2", A)]
    got = _labels(tok, "1+1+0=2 thus answer: 2", eos=False)
    assert got[-5:] == [(" thus", F), (" answer", F), (":", F), (" ", F), ("2", A)]


def test_hand_labelled_forks(tok):
    """A premature stop's connective is `fork` when the prompt says more steps were due; the harmless filler is
    `filler` wherever it stands; a complete chain's connective stays `form`."""
    prompt = tok("Q: 123+489=?\n").input_ids  # three columns
    text = "3+9+0=12 so 612."
    ids = tok(text, add_special_tokens=False).input_ids
    got = list(zip(tok.convert_ids_to_tokens(ids), label_token_ids(tok, ids, prompt), strict=True))
    assert got == [("3", R), ("+", F), ("9", R), ("+", F), ("0", R), ("=", F), ("1", R), ("2", R),
                   (" so", K), (" ", F), ("6", A), ("1", A), ("2", A), (".", F)]  # fmt: skip
    assert K not in label_token_ids(tok, ids)  # without the prompt the stop reads as an ordinary answer
    full = tok("3+9+0=12 ; 2+8+1=11 ; 1+4+1=6 hence the answer is 612.", add_special_tokens=False).input_ids
    assert K not in label_token_ids(tok, full, prompt)
    late = tok("3+9+0=12 ; 2+8+1=11 thus = 612", add_special_tokens=False).input_ids  # stops before the third
    assert [t for t, lab in zip(tok.convert_ids_to_tokens(late), label_token_ids(tok, late, prompt), strict=True)
            if lab == K] == [" thus"]
    filled = tok("3+9+0=12 : then 2+8+1=11 : ; 1+4+1=6 so 612.", add_special_tokens=False).input_ids
    labs = label_token_ids(tok, filled, prompt)
    toks = tok.convert_ids_to_tokens(filled)
    assert [t for t, lab in zip(toks, labs, strict=True) if lab == L] == [" :", " :"]
    assert U not in labs and K not in labs and [t for t, lab in zip(toks, labs, strict=True) if lab == A] == list("612")
    # `answer:` keeps its colon as form
    got = _labels(tok, "1+1+0=2 thus answer: 2", eos=False)
    assert (":", F) in got and L not in [lab for _, lab in got]


def test_stopped_early():
    from opd_tasks.testbed.labeler import stopped_early

    prompt = "Q: 123+489=?\n"
    assert stopped_early("3+9+0=12 so 612.", prompt)
    assert stopped_early("3+9+0=12 ; 2+8+1=11 hence = 612", prompt)
    assert not stopped_early("3+9+0=12 ; 2+8+1=11 ; 1+4+1=6 so 612.", prompt)
    assert not stopped_early("3+9+0=12 : ; 2+8+1=11 : ; 1+4+1=6 so 612.", prompt)  # fillers are harmless
    assert not stopped_early("3+9+0=12 ; 2+8", prompt)  # cut off, not stopped
    assert not stopped_early("3+9+0=12 so 612.", "not a testbed prompt")


def test_truncated_text(tok):
    # cut inside a step: the partial step is still reasoning
    assert [lab for _, lab in _labels(tok, "3+9+0=12 ; 2+8", eos=False)][-3:] == [R, F, R]
    # cut inside the answer phrase: form, no answer yet
    labs = [lab for _, lab in _labels(tok, "3+9+0=12 so the answer", eos=False)]
    assert A not in labs and U not in labs


def test_garbage_and_empty_never_crash(tok):
    assert label_chars("") == []
    assert label_token_ids(tok, []) == []
    assert label_token_ids(tok, [tok.eos_token_id]) == [F]
    assert label_token_ids(tok, [tok.pad_token_id, tok.bos_token_id]) == [F, F]
    got = _labels(tok, "hello 12 world")
    assert {lab for t, lab in got[:-1] if t.strip()} == {U} and got[-1] == ("<eos>", F)
    # a malformed step (no '=') in the middle is unknown, the valid parts around it are still labelled
    got = _labels(tok, "1+2+0=3 ; 4+ so 3.")
    assert got[0] == ("1", R) and ("4", U) in got and got[-3:] == [("3", A), (".", F), ("<eos>", F)]
    for junk in ["====", "so so so", "\n\n1", "+++1", "é<unk>", "answer: 5", "9" * 300]:
        ids = tok(junk, add_special_tokens=False).input_ids
        labs = label_token_ids(tok, ids)
        assert len(labs) == len(ids) and set(labs) <= set(ROLES)


def test_every_styled_completion_is_fully_parsed(tok):
    task = TestbedTaskConfig(min_digits=1, max_digits=4, operands=3)
    rng = random.Random(0)
    for p in generate_problems(task, "train", 60, seed=0):
        for style in (s for s in STYLES.values() if not s.stop):  # a stop skips steps by design
            text = render_completion(p, style, rng)
            ids = tok(text, add_special_tokens=False).input_ids
            labs = label_token_ids(tok, ids)
            assert U not in labs
            answer = "".join(t for t, lab in zip(tok.convert_ids_to_tokens(ids), labs, strict=True) if lab == A)
            assert answer == str(p.answer)
            n_reasoning = sum(lab == R for lab in labs)
            assert n_reasoning == sum(len(s.replace("+", "").replace("=", "")) for s in p.steps())


def test_label_spans_priority():
    text = "1+2+0=3 so 3."
    # a token covering '=3 so' (form, reasoning, form) is reasoning; covering ' 3.' is answer
    assert label_spans(text, [(5, 10), (10, 13), (0, 0)]) == [R, A, F]


class _CharTokenizer:
    """A tokenizer whose token strings do not concatenate to the text (forces the prefix-decoding path)."""

    all_special_ids = [0]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(i) for i in ids if i != 0)

    def convert_ids_to_tokens(self, ids):
        return [f"<{i}>" for i in ids]

    def convert_tokens_to_string(self, tokens):
        return "?"


def test_generic_tokenizer_path():
    text = "1+2+0=3 so 3."
    ids = [ord(c) for c in text] + [0]
    assert label_token_ids(_CharTokenizer(), ids) == label_chars(text) + [F]


_PIECES = [*"0123456789+=;,:. \nsothenaswrié", " so ", " then ", " hence the answer is ", "answer: ", "3+4+0=7"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join))
def test_any_text_gets_one_valid_label_per_character(text):
    labels = label_chars(text)
    assert len(labels) == len(text) and set(labels) <= set(ROLES)
