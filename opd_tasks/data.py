"""Prompt loading: the embedded testbed or a dataset (`datasets`: local jsonl/json/parquet/csv or hub id).

`load_prompts(data, tokenizer, split, n, seed, offset, max_context)` returns `PromptRecord`s. `split` is a
role or a split name:

`EVAL_SPLIT` (`test`, alias `eval`) is the held-out evaluation split of either source, the one the flow asks for
when `data.eval_split` is None:

- testbed (`data.source == "testbed"`): `train`, `validation`, `test` (disjoint by construction, see
  testbed/task.py). Prompts `offset .. offset+n-1` of the split's deterministic stream for `seed`; `n` is
  required (the stream is unbounded).
- dataset: `train` = the rows of split `data.split`, minus the held-out evaluation rows when
  `data.eval_split` is None, in a seeded shuffled order, windows wrapping around (so iteration i can ask for
  offset = i * n forever). `test` = the rows of `data.eval_split`, or when it is None the `data.eval_size`
  rows of `data.split` held out by hash of their prompt (seed-independent, never in `train`). Any other
  name is that split of the dataset. `test` and named splits keep file order; `n=None` means all rows.
  A local file is one split called `train`.

A cell of the prompt column is a question (text), or a conversation: a list of {role, content} chat messages
ending with a user turn (a `messages` column), always rendered with the tokenizer's chat template. With a
`teacher_context` (config `teacher_context`), each record also holds the teacher's prompt: the context, then the
same question or conversation (`teacher_text`).

The answer stored is the final answer (GSM8K's text after `####`, or a `\\boxed{}`), ready for the checker.
Rows whose answer is missing, null or empty are excluded with a warning that counts them (never trained or
scored against an empty answer); a split where every row lacks one is refused. With `data.answer_column` None
the data is prompt-only: every row is kept, its answer None (nothing is checked; evaluation reports the reverse
KL to the teacher instead of an accuracy).
`datasets` caches what it builds under `cache_dir` (the prompts stage passes `<root>/cache/datasets`).
Errors: DataError for a missing file, a local text file that is not UTF-8 or has a line longer than
MAX_LINE_BYTES (found by streaming it before `datasets` loads it), a missing column (with the columns present),
an empty selection, a prompt longer than `max_context` (default: the tokenizer's `model_max_length`);
ModelError for a tokenizer without EOS or PAD, or without a chat template when `data.chat_template` is set.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from opd_tasks.checkers import reference_answer
from opd_tasks.config import DataConfig, TeacherContextConfig
from opd_tasks.errors import ConfigError, DataError, ModelError
from opd_tasks.testbed.task import generate_problems

log = logging.getLogger(__name__)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

#: The longest line of a local .jsonl or .csv file (one row per line); a .json file is one document.
MAX_LINE_BYTES = 1 << 20
_LINE_LIMITS = {".jsonl": MAX_LINE_BYTES, ".csv": MAX_LINE_BYTES, ".json": None}

#: The held-out evaluation split (module docstring); `eval` is accepted as its alias.
EVAL_SPLIT = "test"
_EVAL_NAMES = (EVAL_SPLIT, "eval")


class PromptRecord(BaseModel):
    prompt_id: str  # first 16 hex digits of sha256(source + "\n" + text)
    text: str  # what the model sees (after the chat template, if any)
    token_ids: list[int]
    answer: str | None  # None: prompt-only data (data.answer_column None)
    source: str  # "testbed", a file name or a hub id
    teacher_token_ids: list[int] | None = None  # the teacher's prompt: its context + this one; None: no context


def teacher_prompts(table) -> list[list[int]]:
    """The prompt the teacher reads in each row of a `prompts` or `rollouts` table (pyarrow): its context + the
    student's prompt (`teacher_prompt_token_ids`), or the student's prompt where it has no context (null)."""
    return [t if t is not None else p for p, t in zip(table.column("prompt_token_ids").to_pylist(),
                                                      table.column("teacher_prompt_token_ids").to_pylist(),
                                                      strict=True)]


def prompt_id(source: str, text: str) -> str:
    return hashlib.sha256(f"{source}\n{text}".encode()).hexdigest()[:16]


def check_tokenizer(tokenizer: Any) -> None:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer {name!r} has no EOS token; rollouts could not stop")
    if tokenizer.pad_token_id is None:
        raise ModelError(
            f"tokenizer {name!r} has no PAD token; batched generation needs one "
            "(load it with opd_tasks.models.load_tokenizer, which sets PAD = EOS)"
        )


def load_prompts(
    data: DataConfig,
    tokenizer: Any,
    split: str,
    n: int | None,
    seed: int,
    offset: int = 0,
    max_context: int | None = None,
    cache_dir: Path | None = None,
    teacher_context: TeacherContextConfig | None = None,
) -> list[PromptRecord]:
    """The prompts of `split` (see the module docstring), tokenized, checked against `max_context`.
    `cache_dir`: where `datasets` caches (`datasets_cache_dir`); None: its default (~/.cache/huggingface).
    `teacher_context`: what only the teacher sees; each record then also holds the teacher's prompt (`teacher_text`)."""
    check_tokenizer(tokenizer)
    if (n is not None and n < 0) or offset < 0:
        raise DataError(f"n ({n}) and offset ({offset}) must be >= 0")
    if data.source == "testbed":
        pairs, source = _testbed_pairs(data, split, n, seed, offset), "testbed"
    else:
        pairs, source = _dataset_pairs(data, split, n, seed, offset, cache_dir)
    if max_context is None:
        limit = getattr(tokenizer, "model_max_length", None)
        max_context = limit if isinstance(limit, int) and limit < 10**7 else None
    context = teacher_context if teacher_context is not None and not teacher_context.empty else None
    records = []
    for question, answer in pairs:
        text, ids = _encode(tokenizer, question, data.chat_template)
        pid = prompt_id(source, text)
        teacher_ids = None
        if context is not None:
            teacher_ids = _encode(tokenizer, question, data.chat_template, context)[1]
        for whose, length in (("", len(ids)), ("the teacher's ", len(teacher_ids or ()))):
            if max_context is not None and length > max_context:
                raise DataError(
                    f"{whose}prompt {pid} from {source} has {length} tokens, more than the context of {max_context} "
                    f"tokens (the student's prompt: {text[:80]!r}...)"
                )
        records.append(PromptRecord(prompt_id=pid, text=text, token_ids=ids, answer=answer, source=source,
                                    teacher_token_ids=teacher_ids))
    return records


def teacher_text(tokenizer: Any, question: str | list[dict], chat_template: bool,
                 context: TeacherContextConfig) -> str:
    """The teacher's prompt text: the context, then the student's prompt. With a chat template, one conversation:
    the context's system turn, its messages, then the row's own turns, rendered together (so the template's
    default system turn, if it adds one, comes once, first); without one, `context.prefix` + the question."""
    chat = chat_template or isinstance(question, list)
    if not chat:
        if context.system is not None or context.messages:
            raise ConfigError("teacher_context.system and teacher_context.messages need chat-formatted data "
                              "(data.chat_template: true); use teacher_context.prefix for plain text")
        return context.prefix + question
    if context.prefix:
        raise ConfigError("teacher_context.prefix is for plain-text prompts; with chat-formatted data "
                          "(data.chat_template: true, or a messages column) use teacher_context.system or "
                          "teacher_context.messages")
    messages = ([{"role": "system", "content": context.system}] if context.system is not None else []) + [
        m.model_dump() for m in context.messages] + _messages(question)
    return _render_chat(tokenizer, messages)


def _messages(question: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": question}] if isinstance(question, str) else question


def _render_chat(tokenizer: Any, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the data is chat-formatted (data.chat_template, or a messages column) but the tokenizer "
                         "has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tokenizer: Any, question: str | list[dict], chat_template: bool,
            context: TeacherContextConfig | None = None) -> tuple[str, list[int]]:
    """(text, token ids) of a prompt: the student's, or with `context` the teacher's. A question that is a list of
    chat messages (a messages column) is always rendered with the chat template."""
    chat = chat_template or isinstance(question, list)
    if context is not None:
        text = teacher_text(tokenizer, question, chat_template, context)
    elif chat:
        text = _render_chat(tokenizer, _messages(question))
    else:
        return question, list(tokenizer(question).input_ids)
    return text, list(tokenizer(text, add_special_tokens=False).input_ids if chat else tokenizer(text).input_ids)


def _testbed_pairs(data: DataConfig, split: str, n: int | None, seed: int, offset: int) -> list[tuple[str, str]]:
    if n is None:
        raise DataError("testbed prompts are an unbounded stream: pass n")
    problems = generate_problems(data.testbed, EVAL_SPLIT if split in _EVAL_NAMES else split, n, seed=seed,
                                 offset=offset)
    return [(p.prompt, str(p.answer)) for p in problems]


def datasets_cache_dir(root: Path) -> Path | None:
    """`<root>/cache/datasets`, or None (the datasets default) when the user set HF_DATASETS_CACHE or HF_HOME."""
    if os.environ.get("HF_DATASETS_CACHE") or os.environ.get("HF_HOME"):
        return None
    return Path(root) / "cache" / "datasets"


def check_text_file(path: Path, max_line_bytes: int | None) -> None:
    """DataError naming the file, byte offset and line: bytes that are not UTF-8, or a line longer than
    `max_line_bytes`. Streams the file in pieces of at most 1 MiB, so a huge line is never read whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, length = 0, 1, 0
    with path.open("rb") as f:
        while True:
            piece = f.readline(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of a character cut by the previous piece
            try:
                decoder.decode(piece, final=not piece)
            except UnicodeDecodeError as e:
                raise DataError(f"{path} is not UTF-8: byte offset {offset - pending + e.start} (line {line}): "
                                f"{e.reason}; re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
            if not piece:
                return
            offset, length = offset + len(piece), length + len(piece)
            if max_line_bytes is not None and length > max_line_bytes:
                raise DataError(f"{path}: line {line} is longer than {max_line_bytes} bytes (one row per line); "
                                "refused before loading it: shorten or drop that row")
            if piece.endswith(b"\n"):
                line, length = line + 1, 0


def check_rows(path: Path) -> None:
    """DataError naming the file and line for what `datasets` would report vaguely: a file with no rows (empty, or
    a CSV header alone), a CSV row with more or fewer fields than its header, a JSONL line that is not a JSON
    object. Run after `check_text_file` (UTF-8, line lengths), on .csv and .jsonl files."""
    import csv

    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as f:
        if suffix == ".csv":
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(c.strip() for c in header):
                raise DataError(f"{path} is empty: no header and no rows")
            rows = 0
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}: line {reader.line_num} has {len(row)} field(s), the header has "
                                    f"{len(header)} ({', '.join(header)}); quote fields that hold commas")
                rows += 1
            if rows == 0:
                raise DataError(f"{path} has a header ({', '.join(header)}) but no rows")
        elif suffix == ".jsonl":
            rows = 0
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}: line {number} is not JSON ({e}); one JSON object per line") from None
                if not isinstance(value, dict):
                    raise DataError(f"{path}: line {number} is a JSON {type(value).__name__}, not an object of "
                                    "columns; one JSON object per line")
                rows += 1
            if rows == 0:
                raise DataError(f"{path} is empty: no rows (one JSON object per line)")


def _load_split(data: DataConfig, split: str, cache_dir: Path | None) -> tuple[Any, str, str]:
    """(a datasets.Dataset, what to call it in errors, the source name for prompt ids)."""
    import datasets

    assert data.path is not None
    path = Path(data.path).expanduser()
    cache = {"cache_dir": str(cache_dir)} if cache_dir is not None else {}
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {sorted(_FILE_BUILDERS)}")
            if split != "train":
                raise DataError(f"{path} is a single file: its only split is 'train', not {split!r}")
            if path.suffix.lower() in _LINE_LIMITS:
                check_text_file(path, _LINE_LIMITS[path.suffix.lower()])
                check_rows(path)
            return datasets.load_dataset(builder, data_files=str(path), split="train", **cache), str(path), path.name
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.suffix.lower() in _LINE_LIMITS and f.is_file():
                    check_text_file(f, _LINE_LIMITS[f.suffix.lower()])
                    check_rows(f)
            return datasets.load_dataset(str(path), split=split, **cache), f"{path} (split {split!r})", path.name
        if data.path.startswith(("/", ".", "~")) or path.suffix.lower() in _FILE_BUILDERS:
            raise DataError(f"dataset file {path} does not exist (data.path)")
        return datasets.load_dataset(data.path, split=split, **cache), f"{data.path} (split {split!r})", data.path
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - malformed file, unknown split, no network...
        raise DataError(f"cannot load dataset {data.path!r} split {split!r}: {type(e).__name__}: {e}") from e


def _answer_text(value: Any) -> str:
    """A cell of the answer column as text; 5.0 (a float column, e.g. from csv type inference) is "5"."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "" if value is None else str(value)


def _rows(data: DataConfig, split: str, cache_dir: Path | None) -> tuple[list[tuple[str, str | None]], str, str]:
    ds, where, source = _load_split(data, split, cache_dir)
    missing = [c for c in (data.prompt_column, data.answer_column) if c is not None and c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: column(s) {missing} not found; columns present: {ds.column_names}")
    answers = ds[data.answer_column] if data.answer_column is not None else [None] * len(ds)
    cells = [(_prompt_value(q, where, data.prompt_column, i), a)
             for i, (q, a) in enumerate(zip(ds[data.prompt_column], answers, strict=True))]
    rows = [(q, None if data.answer_column is None else reference_answer(_answer_text(a)))
            for q, a in cells if q is not None]
    if not rows:
        raise DataError(f"{where}: the dataset is empty (no non-empty {data.prompt_column!r} values)")
    if len(rows) < len(cells):
        log.warning("%s: %d of %d rows have no prompt in column %r (null or empty); they are skipped", where,
                    len(cells) - len(rows), len(cells), data.prompt_column)
    if data.answer_column is None:  # prompt-only data: nothing is checked, every row is kept
        return _unique_prompts(rows, where), where, source
    answered = [r for r in rows if r[1]]
    if not answered:
        raise DataError(f"{where}: no row has a reference answer in column {data.answer_column!r} (all "
                        f"{len(rows)} missing, null or empty); refused: fix data.answer_column or the data")
    if len(answered) < len(rows):
        log.warning("%s: %d of %d rows have no reference answer in column %r (missing, null or empty); they are "
                    "excluded, neither trained nor scored", where, len(rows) - len(answered), len(rows),
                    data.answer_column)
    return _unique_prompts(answered, where), where, source


def _unique_prompts(rows: list[tuple[Any, str | None]], where: str) -> list[tuple[Any, str | None]]:
    """The rows with each prompt once (the first), with a warning: a repeated prompt would be held out and trained
    on at once, or counted twice in the eval set; two answers for one prompt are a DataError. (This rule is part of
    a local dataset's key: `ROWS_RULE`, opd_tasks/stages/inputs.py.)"""
    first: dict[bytes, str | None] = {}
    out = []
    for q, a in rows:
        k = _prompt_key(q)
        if k in first:
            if first[k] != a:
                raise DataError(f"{where}: the prompt {str(q)[:80]!r} appears with two reference answers "
                                f"({first[k]!r} and {a!r}); keep one")
            continue
        first[k] = a
        out.append((q, a))
    if len(out) < len(rows):
        log.warning("%s: %d of %d rows repeat an earlier prompt; each prompt is used once", where,
                    len(rows) - len(out), len(rows))
    return out


_ROLES = ("system", "user", "assistant")


def _prompt_value(value: Any, where: str, column: str, row: int) -> str | list[dict] | None:
    """A cell of the prompt column: a question (text), or a conversation (a list of {role, content} messages that
    ends with a user turn, rendered with the chat template); None for an empty cell (the row is skipped)."""
    if value is None:
        return None
    if not isinstance(value, list):
        return str(value) if str(value).strip() else None
    bad = next((m for m in value if not isinstance(m, dict) or m.get("role") not in _ROLES
                or not isinstance(m.get("content"), str)), None) if value else "an empty list"
    if bad is not None:
        raise DataError(f"{where}: row {row}, column {column!r}: a conversation is a list of {{role, content}} "
                        f"messages with role one of {list(_ROLES)}; got {str(bad)[:80]}")
    if value[-1]["role"] != "user":
        raise DataError(f"{where}: row {row}, column {column!r}: the conversation ends with a "
                        f"{value[-1]['role']!r} turn; it must end with the user turn the model answers")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _prompt_key(question: str | list[dict]) -> bytes:
    return (question if isinstance(question, str) else json.dumps(question, sort_keys=True)).encode()


def _dataset_pairs(
    data: DataConfig, split: str, n: int | None, seed: int, offset: int, cache_dir: Path | None
) -> tuple[list[tuple[str, str | None]], str]:
    heldout_split = split in _EVAL_NAMES
    if split != "train" and not heldout_split:
        rows, _, source = _rows(data, split, cache_dir)
        return rows[offset : None if n is None else offset + n], source
    if heldout_split and data.eval_split is not None:
        rows, _, source = _rows(data, data.eval_split, cache_dir)
        return rows[offset : None if n is None else offset + n], source
    rows, where, source = _rows(data, data.split, cache_dir)
    heldout: set[int] = set()
    if data.eval_split is None:
        if len(rows) <= data.eval_size:
            raise DataError(
                f"{where} has {len(rows)} rows, not more than data.eval_size ({data.eval_size}) held out for "
                "evaluation; lower data.eval_size or set data.eval_split"
            )
        by_hash = sorted(range(len(rows)), key=lambda i: hashlib.sha256(_prompt_key(rows[i][0])).hexdigest())
        heldout = set(by_hash[: data.eval_size])
    if heldout_split:
        picked = [rows[i] for i in sorted(heldout)]
        return picked[offset : None if n is None else offset + n], source
    train = [rows[i] for i in range(len(rows)) if i not in heldout]
    order = list(range(len(train)))
    random.Random(int(hashlib.sha256(f"data-order:{seed}".encode()).hexdigest()[:16], 16)).shuffle(order)
    count = len(train) if n is None else n
    return [train[order[(offset + k) % len(train)]] for k in range(count)], source
