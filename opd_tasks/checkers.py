"""Answer checkers: extract the final answer of a completion and compare it with the reference.

- `testbed`: the answer after the first connective (`so 579.`, `thus answer: 579`, `hence = 579`, ...),
  exactly as the labeler finds it; a completion without one is wrong.
- `numeric` (real math datasets): the last `\\boxed{...}`, else GSM8K's `#### 42`, else the last number in
  the text. Numbers are normalised before comparing: `1,234` = `1234.0` = `$1234`, `-5`, `0.50` = `1/2`,
  `\\frac{1}{2}` = `0.5`. Non-numeric boxed answers are compared as whitespace-free strings.
  A reference with `####` or `\\boxed{}` goes through the same extraction (a raw GSM8K answer works as is);
  any other reference is taken whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from fractions import Fraction

from opd_tasks.testbed.labeler import FINAL_ANSWER

Checker = Callable[[str, str], bool]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_GSM8K = re.compile(r"####\s*([^\n]+)")


def extract_testbed_answer(completion: str) -> str | None:
    """The digits after the first connective (`so`, `thus`, `hence`, `therefore`), or None."""
    m = FINAL_ANSWER.search(completion)
    return m.group("ans") if m else None


def check_testbed(completion: str, reference: str | int) -> bool:
    answer = extract_testbed_answer(completion)
    return answer is not None and normalize_number(answer) == normalize_number(str(reference))


def _boxed_contents(text: str) -> list[str]:
    """The contents of every `\\boxed{...}` / `\\fbox{...}`, with nested braces balanced."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def _strip_latex(s: str) -> str:
    s = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\$", "").replace("\\%", "").replace("\\!", "").replace("\\,", "").replace("$", "")
    return s.strip()


def normalize_number(text: str) -> str | None:
    """The canonical form of a number written in `text` (`"1,234.0"` -> `"1234"`, `"0.5"` -> `"1/2"`).

    Accepts an optional sign, `$`, thousands separators, a decimal part, a trailing `%` or `.`, a fraction
    `a/b` (also `(a)/(b)`) and scientific notation. None when `text` is not a single number.
    """
    s = _strip_latex(text).replace(",", "").replace(" ", "").rstrip(".").removesuffix("%")
    s = re.sub(r"^\((-?[\d.]+)\)/\((-?[\d.]+)\)$", r"\1/\2", s)
    if not s:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = Fraction(num) / Fraction(den)
        else:
            value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def extract_numeric_answer(text: str) -> str | None:
    """The final answer of a math completion: last `\\boxed{}`, else `#### X`, else the last number."""
    boxed = _boxed_contents(text)
    if boxed:
        return boxed[-1].strip()
    gsm = _GSM8K.findall(text)
    if gsm:
        return gsm[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _canonical(answer: str) -> str:
    number = normalize_number(answer)
    return number if number is not None else re.sub(r"[\s{}]+", "", _strip_latex(answer))


def check_numeric(completion: str, reference: str | int | float) -> bool:
    """True when the completion's final answer equals the reference's (numbers compared by value)."""
    answer = extract_numeric_answer(completion)
    ref = reference_answer(str(reference))
    if answer is None or not ref:
        return False
    return _canonical(answer) == _canonical(ref)


CHECKERS: dict[str, Checker] = {"testbed": check_testbed, "numeric": check_numeric}


def reference_answer(text: str) -> str:
    """The final answer inside a dataset's answer field: after `####` or in `\\boxed{}`, else the whole text."""
    if "####" in text or "boxed" in text:
        extracted = extract_numeric_answer(text)
        if extracted is not None:
            return extracted
    return text.strip()
