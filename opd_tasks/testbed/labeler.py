"""Ground-truth token roles of a testbed completion, by parsing its text.

Labels (`ROLES`):
- `reasoning`: the digits of a step `d_1+...+d_k+carry=sum` (operand digits, carry, sum). A wrong one is a
  real reasoning fork: it changes the answer.
- `answer`: the digits of the final answer (after a connective such as `so`).
- `form`: everything that is surface form: `+` and `=` inside steps, step separators (`;`, `,`, `then`,
  `and`), the connective, the answer phrase (`answer:`, `the answer is`, `=`, `.`), whitespace, and every
  special token (EOS, PAD, BOS), which decode to no text.
- `unknown`: characters that no rule explains (garbage, a stray word). Never raises on any input.

Note: the separator after a step and the connective before the answer also decide *when* the chain stops;
they are still labelled `form` (the step count is fixed by the operands, not a style choice).

Parsing is a left-to-right scan; at each position the first rule that matches wins:
final answer, complete step, separator, truncated step or truncated answer phrase at the very end of the
text, whitespace; otherwise one character of `unknown`. Labels are per character and then per token: a token
gets the strongest label among its characters (`answer` > `reasoning` > `unknown` > `form`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

FORM, REASONING, ANSWER, UNKNOWN = "form", "reasoning", "answer", "unknown"
ROLES: tuple[str, ...] = (FORM, REASONING, ANSWER, UNKNOWN)
_STRENGTH = {FORM: 0, UNKNOWN: 1, REASONING: 2, ANSWER: 3}

_CONN = r"(?<![A-Za-z])(?:so|thus|hence|therefore)"  # a whole word only: not the "so" of "also"
FINAL_ANSWER = re.compile(rf"\s*{_CONN}\s+(?:answer:\s*|the answer is\s+|=\s*)?(?P<ans>-?\d+)\.?")
_STEP = re.compile(r"\d+(?:\+\d+)+=\d+")
_SEP = re.compile(r"\s*(?:;|,|(?<![A-Za-z])(?:then|and)(?![A-Za-z]))\s*")
# Only at the end of the text (a rollout cut by max_new_tokens):
_PARTIAL_STEP = re.compile(r"\d+(?:\+\d*)*(?:=\d*)?\Z")
_PARTIAL_FINAL = re.compile(rf"\s*{_CONN}(?:\s+(?:answer:?|the(?:\s+answer(?:\s+is)?)?|=))?\s*\Z")
_SPACE = re.compile(r"\s+")


def _digit_labels(text: str, start: int, end: int, digit_label: str) -> list[str]:
    return [digit_label if c.isdigit() else FORM for c in text[start:end]]


def label_chars(text: str) -> list[str]:
    """One label per character of a completion (the text after the prompt, without special tokens)."""
    labels: list[str] = []
    pos = 0
    while pos < len(text):
        if m := FINAL_ANSWER.match(text, pos):
            labels += [FORM] * (m.start("ans") - pos)
            labels += _digit_labels(text, m.start("ans"), m.end("ans"), ANSWER)
            labels += [FORM] * (m.end() - m.end("ans"))
        elif (m := _STEP.match(text, pos)) or (m := _PARTIAL_STEP.match(text, pos)):
            labels += _digit_labels(text, pos, m.end(), REASONING)
        elif (m := _SEP.match(text, pos)) or (m := _PARTIAL_FINAL.match(text, pos)) or (m := _SPACE.match(text, pos)):
            labels += [FORM] * (m.end() - pos)
        else:
            labels.append(UNKNOWN)
            pos += 1
            continue
        pos = m.end()
    return labels


def label_spans(text: str, spans: Sequence[tuple[int, int]]) -> list[str]:
    """Labels of tokens given their character spans [start, end) in `text`; an empty span is `form`."""
    chars = label_chars(text)
    out = []
    for start, end in spans:
        best = FORM
        for label in chars[max(start, 0) : min(end, len(chars))]:
            if _STRENGTH[label] > _STRENGTH[best]:
                best = label
        out.append(best)
    return out


def token_spans(tokenizer: Any, token_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text of `token_ids` (special tokens skipped) and each token's character span in it.

    Fast path: when the token strings concatenate to the decoded text (the testbed tokenizer), spans are
    their running lengths. Otherwise each prefix is decoded (works for any tokenizer, quadratic but small).
    """
    ids = [int(i) for i in token_ids]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = [
        "" if i in special else tokenizer.convert_tokens_to_string([t])
        for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)
    ]
    if "".join(pieces) == text:
        spans, pos = [], 0
        for p in pieces:
            spans.append((pos, pos + len(p)))
            pos += len(p)
        return text, spans
    spans, prev = [], 0
    for k in range(1, len(ids) + 1):
        cur = len(tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False))
        cur = max(prev, min(cur, len(text)))
        spans.append((prev, cur))
        prev = cur
    return text, spans


def label_token_ids(tokenizer: Any, token_ids: Sequence[int]) -> list[str]:
    """One role per token of a completion's token ids (prompt excluded; EOS/PAD/BOS are `form`)."""
    if len(token_ids) == 0:
        return []
    text, spans = token_spans(tokenizer, token_ids)
    return label_spans(text, spans)
