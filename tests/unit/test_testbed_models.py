"""Tokenizer round trips, tiny models through the Auto classes, model refs and tokenizer matching."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_tasks.config import ModelRef, TestbedTaskConfig
from opd_tasks.errors import ConfigError, ModelError
from opd_tasks.models import TESTBED_ASSETS, check_tokenizers_match, load_model, load_tokenizer, resolve_model
from opd_tasks.testbed.modeling import make_model
from opd_tasks.testbed.styles import CONNECTIVES, SEPARATORS
from opd_tasks.testbed.task import generate_problems
from opd_tasks.testbed.tokenizer import build_tokenizer, save_tokenizer, vocabulary
from opd_tasks.testbed.train import accuracy
from storage.hashing import sha256_tree


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    save_tokenizer(d)
    return d


def test_vocabulary_and_specials():
    tok = build_tokenizer()
    assert len(tok) == len(vocabulary()) == 127
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)


@pytest.mark.parametrize(
    "text",
    ["Q: 123+489=?\n", "3+9+0=12 then 2+8+1=11 hence the answer is 612.", "Hello, World! (x*y)/z ~ `a`", ""],
)
def test_round_trip(tok_dir, text):
    for tok in (build_tokenizer(), AutoTokenizer.from_pretrained(str(tok_dir))):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[1:]) == text


def test_digits_and_style_words_are_single_tokens():
    tok = build_tokenizer()
    for d in "0123456789":
        assert tok.convert_ids_to_tokens(tok(f"12{d}", add_special_tokens=False).input_ids)[-1] == d
    for sep in SEPARATORS:
        toks = tok.convert_ids_to_tokens(tok(f"1{sep}2", add_special_tokens=False).input_ids)
        assert toks == ["1", sep.rstrip(), " ", "2"]
    for conn in CONNECTIVES:
        toks = tok.convert_ids_to_tokens(tok(f"1 {conn} 2", add_special_tokens=False).input_ids)
        assert toks == ["1", " " + conn, " ", "2"]
    # words only match whole: "also", "these" are characters
    assert tok.convert_ids_to_tokens(tok("also", add_special_tokens=False).input_ids) == ["a", "l", "s", "o"]
    assert tok("é", add_special_tokens=False).input_ids == [tok.unk_token_id]


def test_prompt_and_completion_tokenize_independently():
    tok = build_tokenizer()
    prompt, completion = "Q: 12+34=?\n", "2+4+0=6 ; 1+3+0=4 so 46."
    joint = tok(prompt + completion).input_ids
    assert joint == tok(prompt).input_ids + tok(completion, add_special_tokens=False).input_ids


def test_left_padding(tok_dir):
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.padding_side == "left"
    enc = tok(["Q: 1+2=?\n", "Q: 10+20=?\n"], padding=True)
    assert enc["input_ids"][0][:2] == [tok.pad_token_id] * 2 and enc["attention_mask"][0][:3] == [0, 0, 1]
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_tiny_model_saves_and_loads_via_auto(tmp_path, role):
    tok = build_tokenizer()
    model = make_model(tok, role)
    n = model.num_parameters()
    assert (1_000_000 < n < 1_200_000) if role == "teacher" else (200_000 < n < 400_000)
    model.save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.generation_config.eos_token_id == tok.eos_token_id
    assert loaded.generation_config.pad_token_id == tok.pad_token_id
    ids = torch.tensor([tok("Q: 1+2=?\n").input_ids])
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)
    # through the model ref helpers
    ref = ModelRef(path=str(tmp_path))
    resolved = resolve_model(ref)
    assert resolved.sha256 == sha256_tree(tmp_path) and resolved.local_dir == str(tmp_path)
    assert not resolved.trust_remote_code
    again = load_model(ref)
    assert again.dtype == torch.float32 and not again.training
    out = again.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 3) or out[0, -1] == tok.eos_token_id
    assert load_tokenizer(ref).decode(ids[0], skip_special_tokens=True) == "Q: 1+2=?\n"


def test_committed_assets_resolve_and_load():
    """The committed assets load through the Auto classes with distinct content hashes (their accuracies are
    re-measured in test_committed_models_meet_the_accuracy_targets, not read from bootstrap.json)."""
    assert (TESTBED_ASSETS / "bootstrap.json").is_file()
    hashes = set()
    for name in ("testbed:teacher", "testbed:student", "testbed:tokenizer"):
        resolved = resolve_model(ModelRef(path=name))
        hashes.add(resolved.sha256)
        assert resolved.sha256 == sha256_tree(resolved.local_dir)
        tok = load_tokenizer(ModelRef(path=name))
        assert tok.eos_token_id == 2
    assert len(hashes) == 3
    teacher, student = load_model(ModelRef(path="testbed:teacher")), load_model(ModelRef(path="testbed:student"))
    assert teacher.num_parameters() > student.num_parameters()
    check_tokenizers_match(
        load_tokenizer(ModelRef(path="testbed:teacher")), load_tokenizer(ModelRef(path="testbed:student"))
    )


def test_missing_model_dir_errors(tmp_path):
    with pytest.raises(ModelError, match=str(tmp_path / "nope")):
        resolve_model(ModelRef(path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="unknown testbed model"):
        resolve_model(ModelRef(path="testbed:oracle"))
    with pytest.raises(ModelError, match="could not be fetched"):  # no network / no such repo
        resolve_model(ModelRef(path="no-such-org-xyz/no-such-model-xyz"))


def test_trust_remote_code_off_by_default():
    assert ModelRef(path="x").trust_remote_code is False
    from opd_tasks.config_files import load_config

    with pytest.raises(ConfigError, match=r"models\.teacher\.trust_code: unknown key"):
        load_config(None, ["models.teacher.trust_code=true"])


def test_check_tokenizers_match_names_the_difference(tmp_path):
    a, b = build_tokenizer(), build_tokenizer()
    check_tokenizers_match(a, b)
    b.add_tokens(["<extra>"])
    with pytest.raises(ModelError, match="vocab size: teacher 127 vs student 128"):
        check_tokenizers_match(a, b)
    c = build_tokenizer()
    c.pad_token = c.eos_token
    with pytest.raises(ModelError, match="pad_token_id: teacher 0 vs student 2"):
        check_tokenizers_match(a, c)
    d = build_tokenizer()
    d.eos_token = "<unk>"
    with pytest.raises(ModelError, match="eos_token_id: teacher 2 vs student 3"):
        check_tokenizers_match(a, d)


def test_load_tokenizer_without_pad_gets_eos(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("pad_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    loaded = load_tokenizer(ModelRef(path=str(tmp_path)))
    assert loaded.pad_token_id == loaded.eos_token_id


def test_committed_models_meet_the_accuracy_targets():
    """Re-measure the committed weights on 100 test problems (greedy): teacher >= 90%, student 10-60%."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is as fast, and immune to a busy CPU
    try:
        tok = load_tokenizer(ModelRef(path="testbed:tokenizer"))
        problems = generate_problems(TestbedTaskConfig(), "test", 100, seed=0)
        acc = {}
        for role in ("teacher", "student"):
            model = load_model(ModelRef(path=f"testbed:{role}"))
            acc[role] = accuracy(model, tok, problems, max_new_tokens=46)
    finally:
        torch.set_num_threads(threads)
    assert acc["teacher"] >= 0.9, acc
    assert 0.1 <= acc["student"] <= 0.6, acc
