"""Prompt loading: the testbed source and datasets from local files, with their error cases."""

import json
from pathlib import Path

import pytest

from opd_tasks.config import DataConfig, TestbedTaskConfig
from opd_tasks.data import PromptRecord, load_prompts, prompt_id
from opd_tasks.errors import DataError, ModelError
from opd_tasks.testbed.task import split_of
from opd_tasks.testbed.tokenizer import build_tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
GSM = DATA / "gsm8k_sample.jsonl"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _ds(path, **kw) -> DataConfig:
    return DataConfig(source="dataset", path=str(path), **kw)


def test_testbed_prompts(tok):
    data = DataConfig()
    recs = load_prompts(data, tok, "train", 5, seed=0)
    assert len(recs) == 5 and all(isinstance(r, PromptRecord) for r in recs)
    r = recs[0]
    assert r.source == "testbed" and r.text.startswith("Q: ") and r.text.endswith("=?\n")
    operands = [int(x) for x in r.text[3:-3].split("+")]
    assert r.answer == str(sum(operands)) and split_of(operands) == "train"
    assert r.token_ids == tok(r.text).input_ids and r.token_ids[0] == tok.bos_token_id
    assert r.prompt_id == prompt_id("testbed", r.text) and len(r.prompt_id) == 16
    # deterministic; offset windows continue the stream; eval is the test split
    assert load_prompts(data, tok, "train", 5, seed=0) == recs
    assert load_prompts(data, tok, "train", 2, seed=0, offset=3) == recs[3:]
    ev = load_prompts(data, tok, "eval", 20, seed=0)
    assert ev == load_prompts(data, tok, "test", 20, seed=0)
    assert not {r.prompt_id for r in ev} & {r.prompt_id for r in load_prompts(data, tok, "train", 500, seed=0)}


def test_testbed_needs_n_and_known_split(tok):
    with pytest.raises(DataError, match="pass n"):
        load_prompts(DataConfig(), tok, "train", None, seed=0)
    with pytest.raises(DataError, match="'dev'"):
        load_prompts(DataConfig(), tok, "dev", 3, seed=0)


def test_testbed_prompt_longer_than_context(tok):
    data = DataConfig(testbed=TestbedTaskConfig(min_digits=6, max_digits=6, operands=4))
    with pytest.raises(DataError, match="more than the context of 10 tokens"):
        load_prompts(data, tok, "train", 1, seed=0, max_context=10)


def test_gsm8k_jsonl_train_eval_holdout(tok):
    data = _ds(GSM, eval_size=2)
    train = load_prompts(data, tok, "train", None, seed=0)
    ev = load_prompts(data, tok, "eval", None, seed=0)
    assert len(train) == 6 and len(ev) == 2
    assert not {r.text for r in train} & {r.text for r in ev}
    assert {r.text for r in train} | {r.text for r in ev} == {
        json.loads(line)["question"] for line in GSM.read_text().splitlines()
    }
    by_q = {r.text: r for r in train + ev}
    mia = next(q for q in by_q if q.startswith("Mia"))
    assert by_q[mia].answer == "29" and by_q[mia].source == "gsm8k_sample.jsonl"
    assert {r.answer for r in train + ev} >= {"29", "270", "80", "-5"}
    # the held-out rows do not depend on the seed; the training order does
    assert load_prompts(data, tok, "eval", None, seed=5) == ev
    reordered = [r.text for r in load_prompts(data, tok, "train", None, seed=1)]
    assert sorted(reordered) == sorted(r.text for r in train) and reordered != [r.text for r in train]
    # windows wrap around the training rows
    window = load_prompts(data, tok, "train", 4, seed=0, offset=4)
    assert [r.text for r in window] == [train[i % 6].text for i in range(4, 8)]


def test_csv_and_parquet(tok, tmp_path):
    recs = load_prompts(_ds(DATA / "gsm8k_sample.csv", eval_size=1), tok, "train", None, seed=0)
    assert len(recs) == 2 and {r.answer for r in recs} <= {"5", "40", "4.5"}
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"problem": ["1+1?", "2+2?", "3+3?"], "solution": ["2", "4", "6"]}), tmp_path / "x.parquet")
    data = _ds(tmp_path / "x.parquet", prompt_column="problem", answer_column="solution", eval_size=1)
    assert len(load_prompts(data, tok, "train", None, seed=0)) == 2


def test_missing_file(tok, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(_ds(tmp_path / "nope.jsonl"), tok, "train", 3, seed=0)


def test_missing_column_lists_columns(tok):
    with pytest.raises(DataError, match=r"\['problem'\] not found; columns present: \['question', 'answer'\]"):
        load_prompts(_ds(GSM, prompt_column="problem", eval_size=1), tok, "train", 3, seed=0)


def test_empty_dataset(tok, tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text(json.dumps({"question": "", "answer": "1"}) + "\n")
    with pytest.raises(DataError, match="empty"):
        load_prompts(_ds(p), tok, "train", 3, seed=0)
    p2 = tmp_path / "zero.jsonl"
    p2.write_text("")
    with pytest.raises(DataError):
        load_prompts(_ds(p2), tok, "train", 3, seed=0)


@pytest.mark.parametrize("name, text, pattern", [
    ("zero.csv", "", r"zero.csv is empty: no header and no rows"),
    ("header.csv", "question,answer\n", r"has a header \(question, answer\) but no rows"),
    ("ragged.csv", "question,answer\nWhat is 1+1?,2\nWhat is 2+2?,4,x\n", r"line 3 has 3 field\(s\), the header has 2"),
    ("zero.jsonl", "\n\n", r"zero.jsonl is empty: no rows"),
    ("bad.jsonl", '{"question": "a", "answer": "1"}\n{"question": \n', r"line 2 is not JSON"),
    ("list.jsonl", "[1, 2]\n", r"line 1 is a JSON list, not an object of columns"),
])
def test_a_file_without_usable_rows_is_named_with_its_line(tok, tmp_path, name, text, pattern):
    """Issue 32, class 10: what `datasets` reports as 'An error occurred while generating the dataset' or a bare
    StopIteration is a DataError naming the file and the line."""
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError, match=pattern):
        load_prompts(_ds(p, eval_size=1), tok, "train", 3, seed=0)


def test_repeated_and_null_prompts_are_used_once_and_said(tok, tmp_path, caplog):
    p = tmp_path / "rows.jsonl"
    rows = [{"question": q, "answer": a} for q, a in (("a", "1"), (None, "2"), ("b", "2"), ("a", "1"), ("c", "3"))]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = load_prompts(_ds(p, eval_size=1), tok, "train", None, seed=0)
    held = load_prompts(_ds(p, eval_size=1), tok, "test", None, seed=0)
    assert sorted(r.text for r in train + held) == ["a", "b", "c"]  # "a" once: never both held out and trained on
    assert "1 of 5 rows have no prompt in column 'question'" in caplog.text
    assert "1 of 4 rows repeat an earlier prompt" in caplog.text
    p.write_text("".join(json.dumps(r) + "\n" for r in [*rows, {"question": "b", "answer": "7"}]))
    with pytest.raises(DataError, match=r"the prompt 'b' appears with two reference answers \('2' and '7'\)"):
        load_prompts(_ds(p, eval_size=1), tok, "train", None, seed=0)


def test_too_few_rows_for_holdout_and_unknown_split(tok):
    with pytest.raises(DataError, match="eval_size"):
        load_prompts(_ds(GSM, eval_size=100), tok, "train", 3, seed=0)
    with pytest.raises(DataError, match="only split is 'train'"):
        load_prompts(_ds(GSM, eval_size=1), tok, "validation", 3, seed=0)


def test_prompt_longer_than_context(tok):
    with pytest.raises(DataError, match="more than the context of 50 tokens"):
        load_prompts(_ds(GSM, eval_size=1), tok, "train", None, seed=0, max_context=50)


def test_tokenizer_without_eos_or_pad(tok):
    no_pad = build_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ModelError, match="no PAD"):
        load_prompts(DataConfig(), no_pad, "train", 1, seed=0)
    no_eos = build_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ModelError, match="no EOS"):
        load_prompts(DataConfig(), no_eos, "train", 1, seed=0)


def test_chat_template(tok):
    with pytest.raises(ModelError, match="no chat template"):
        load_prompts(_ds(GSM, eval_size=1, chat_template=True), tok, "train", 1, seed=0)
    templated = build_tokenizer()
    templated.chat_template = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"
    recs = load_prompts(_ds(GSM, eval_size=1, chat_template=True), templated, "train", 2, seed=0)
    assert all(r.text.startswith("Q: ") and r.text.endswith("\nA:") for r in recs)
    assert recs[0].token_ids == templated(recs[0].text, add_special_tokens=False).input_ids
