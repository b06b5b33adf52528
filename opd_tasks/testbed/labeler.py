"""Ground-truth token roles of a testbed completion, by parsing its text.

Labels (`ROLES`):
- `reasoning`: the digits of a step `d_1+...+d_k+carry=sum` (operand digits, carry, sum). A wrong one is a
  real reasoning fork: it changes the answer.
- `answer`: the digits of the final answer (after a connective such as `so`).
- `form`: everything that is surface form: `+` and `=` inside steps, step separators (`;`, `,`, `then`,
  `and`), the connective, the answer phrase (`answer:`, `the answer is`, `=`, `.`), whitespace, and every
  special token (EOS, PAD, BOS), which decode to no text.
- `fork` (the `consequential` switch): the connective of a premature stop, the token where the chain stops
  before its last step (`3+9+0=12 so 612.` for a three-column sum) and answers directly. It needs the number of
  steps, from the prompt (`steps=` / `prompt_ids=`); without it a premature stop reads as an ordinary answer.
- `filler` (the `harmless` switch): the filler ` :` written at a step boundary, with no consequence.
- `unknown`: characters that no rule explains (garbage, a stray word). Never raises on any input.

Note: the separator after a step and the connective before the answer also decide *when* the chain stops;
they are still labelled `form` (the step count is fixed by the operands, not a style choice).

Parsing is a left-to-right scan; at each position the first rule that matches wins:
final answer, complete step, separator, filler, truncated step or truncated answer phrase at the very end of the
text, whitespace; otherwise one character of `unknown`. Labels are per character and then per token: a token
gets the strongest label among its characters (`answer` > `reasoning`, `fork` > `unknown` > `filler` > `form`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

FORM, REASONING, ANSWER, UNKNOWN, FORK, FILLER = "form", "reasoning", "answer", "unknown", "fork", "filler"
ROLES: tuple[str, ...] = (FORM, REASONING, ANSWER, UNKNOWN, FORK, FILLER)
_STRENGTH = {FORM: 0, FILLER: 1, UNKNOWN: 2, REASONING: 3, FORK: 3, ANSWER: 4}

_CONN = r"(?<![A-Za-z])(?:so|thus|hence|therefore)"  # a whole word only: not the "so" of "also"
FINAL_ANSWER = re.compile(rf"\s*(?P<conn>{_CONN})\s+(?:answer:\s*|the answer is\s+|=\s*)?(?P<ans>-?\d+)\.?")
_STEP = re.compile(r"\d+(?:\+\d+)+=\d+")
_SEP = re.compile(r"\s*(?:;|,|(?<![A-Za-z])(?:then|and)(?![A-Za-z]))\s*")
_FILLER = re.compile(r" ?:")
# Only at the end of the text (a rollout cut by max_new_tokens):
_PARTIAL_STEP = re.compile(r"\d+(?:\+\d*)*(?:=\d*)?\Z")
_PARTIAL_FINAL = re.compile(rf"\s*{_CONN}(?:\s+(?:answer:?|the(?:\s+answer(?:\s+is)?)?|=))?\s*\Z")
_SPACE = re.compile(r"\s+")


def _digit_labels(text: str, start: int, end: int, digit_label: str) -> list[str]:
    return [digit_label if c.isdigit() else FORM for c in text[start:end]]


def label_chars(text: str, steps: int | None = None) -> list[str]:
    """One label per character of a completion (the text after the prompt, without special tokens); `steps`: how
    many steps the chain should have (then a connective after fewer complete steps is a premature stop, `fork`)."""
    labels: list[str] = []
    pos, done = 0, 0
    while pos < len(text):
        if m := FINAL_ANSWER.match(text, pos):
            premature = steps is not None and 0 < done < steps
            labels += [FORM] * (m.start("conn") - pos)
            labels += [FORK if premature else FORM] * (m.end("conn") - m.start("conn"))
            labels += [FORM] * (m.start("ans") - m.end("conn"))
            labels += _digit_labels(text, m.start("ans"), m.end("ans"), ANSWER)
            labels += [FORM] * (m.end() - m.end("ans"))
        elif m := _STEP.match(text, pos):
            labels += _digit_labels(text, pos, m.end(), REASONING)
            done += 1
        elif m := _PARTIAL_STEP.match(text, pos):
            labels += _digit_labels(text, pos, m.end(), REASONING)
        elif m := _FILLER.match(text, pos):
            labels += [FILLER] * (m.end() - pos)
        elif (m := _SEP.match(text, pos)) or (m := _PARTIAL_FINAL.match(text, pos)) or (m := _SPACE.match(text, pos)):
            labels += [FORM] * (m.end() - pos)
        else:
            labels.append(UNKNOWN)
            pos += 1
            continue
        pos = m.end()
    return labels


def label_spans(text: str, spans: Sequence[tuple[int, int]], steps: int | None = None) -> list[str]:
    """Labels of tokens given their character spans [start, end) in `text`; an empty span is `form`."""
    chars = label_chars(text, steps)
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


def label_token_ids(tokenizer: Any, token_ids: Sequence[int], prompt_ids: Sequence[int] | None = None) -> list[str]:
    """One role per token of a completion's token ids (prompt excluded; EOS/PAD/BOS are `form`). With the prompt's
    ids, a premature stop is labelled `fork` (the prompt gives the number of steps)."""
    if len(token_ids) == 0:
        return []
    steps = None
    if prompt_ids is not None:
        from opd_tasks.testbed.task import operands_of, step_count

        operands = operands_of(tokenizer.decode([int(i) for i in prompt_ids], skip_special_tokens=True))
        steps = step_count(operands) if operands else None
    text, spans = token_spans(tokenizer, token_ids)
    return label_spans(text, spans, steps)


def stopped_early(completion: str, prompt: str) -> bool:
    """Whether a completion answers before the last step its prompt needs (a premature stop, the `fork`)."""
    from opd_tasks.testbed.task import operands_of, step_count

    operands = operands_of(prompt)
    return operands is not None and FORK in label_chars(completion, step_count(operands))
