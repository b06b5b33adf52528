"""The testbed task: multi-operand addition with a digit-by-digit chain of thought.

    prompt:      "Q: 123+489=?\n"
    completion:  "3+9+0=12 ; 2+8+1=11 ; 1+4+1=6 so 612."   (teacher style; then EOS)

Column i (least significant first) is one step `d_1+...+d_k+carry=s`: the i-th digit of every operand (0
where an operand is shorter), the carry from the previous step, and their sum. The answer is the final carry
(if any) followed by the last digits of the step sums read in reverse, so every step determines the answer.
The separators, the connective and the answer phrase come from a style (`styles.py`).

Splits: a problem belongs to `train`, `validation` or `test` by a hash of its canonical form (the operands
sorted, so `a+b` and `b+a` share a split), independently of the seed: 80% / 10% / 10%. A split's problems are
drawn by rejection, so the splits never share a problem. The stream of problems of (task, split, seed) is
deterministic: the same seed gives the same problems, in the same order, on every machine.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from opd_tasks.config import TestbedTaskConfig
from opd_tasks.errors import ConfigError, DataError
from opd_tasks.testbed.styles import ANSWER_PHRASES, CONNECTIVES, FILLER, SEPARATORS, Style

SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_BUCKETS = {"train": (0, 800), "validation": (800, 900), "test": (900, 1000)}  # of 1000


@dataclass(frozen=True)
class Problem:
    operands: tuple[int, ...]

    @property
    def answer(self) -> int:
        return sum(self.operands)

    @property
    def prompt(self) -> str:
        return prompt_text(self.operands)

    def steps(self) -> list[str]:
        return cot_steps(self.operands)


def prompt_text(operands: tuple[int, ...] | list[int]) -> str:
    return "Q: " + "+".join(str(x) for x in operands) + "=?\n"


_PROMPT = re.compile(r"Q: (\d+(?:\+\d+)+)=\?\n?")


def operands_of(prompt: str) -> tuple[int, ...] | None:
    """The operands of a testbed prompt (`Q: 12+345=?`), or None when the text is not one."""
    m = _PROMPT.search(prompt)
    return tuple(int(x) for x in m.group(1).split("+")) if m else None


def step_count(operands: tuple[int, ...] | list[int]) -> int:
    """How many steps a complete chain of thought has: one per column of the longest operand."""
    return max(len(str(x)) for x in operands)


def cot_steps(operands: tuple[int, ...] | list[int]) -> list[str]:
    """The steps `d_1+...+d_k+carry=sum`, one per column, least significant digit first."""
    digits = [str(x)[::-1] for x in operands]
    width = max(len(d) for d in digits)
    steps, carry = [], 0
    for i in range(width):
        column = [int(d[i]) if i < len(d) else 0 for d in digits]
        total = sum(column) + carry
        steps.append("+".join(str(c) for c in [*column, carry]) + f"={total}")
        carry = total // 10
    return steps


def render_completion(problem: Problem, style: Style, rng: random.Random) -> str:
    """The chain of thought and the answer phrase, in `style` (without EOS); at each boundary between steps the
    style's forks may stop the chain early or insert the filler (styles.py)."""
    steps = problem.steps()
    text = steps[0]
    for step in steps[1:]:
        if style.stop and rng.random() < style.stop:
            break
        if style.filler and rng.random() < style.filler:
            text += FILLER
        text += style.pick("separator", rng) + step
    connective = style.pick("connective", rng)
    phrase = style.pick("answer", rng).format(ans=problem.answer)
    return f"{text} {connective} {phrase}"


def split_of(operands: tuple[int, ...] | list[int]) -> str:
    """The split a problem belongs to: a hash of its canonical form (sorted operands). Seed-independent."""
    canonical = "+".join(str(x) for x in sorted(operands))
    bucket = int.from_bytes(hashlib.sha256(f"testbed:{canonical}".encode()).digest()[:8], "big") % 1000
    for split, (lo, hi) in _SPLIT_BUCKETS.items():
        if lo <= bucket < hi:
            return split
    raise AssertionError(bucket)  # pragma: no cover


def seeded_rng(*parts: object) -> random.Random:
    """A random.Random seeded from a hash of `parts` (stable across processes and machines)."""
    key = ":".join(str(p) for p in parts).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))


def _draw_operand(rng: random.Random, task: TestbedTaskConfig) -> int:
    digits = rng.randint(task.min_digits, task.max_digits)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def generate_problems(
    task: TestbedTaskConfig, split: str, n: int, seed: int = 0, offset: int = 0, unique: bool = True
) -> list[Problem]:
    """Problems `offset .. offset+n-1` of the deterministic stream of (task, split, seed).

    Each operand has a number of digits drawn uniformly in [min_digits, max_digits], then a value drawn
    uniformly among the numbers with that many digits. With `unique` (default) the stream never repeats a
    problem, so consecutive windows (offset = iteration * n) give new problems; ConfigError if the task has
    too few problems in this split.
    """
    if split not in SPLITS:
        raise DataError(f"testbed split {split!r} does not exist; use one of {list(SPLITS)}")
    if n < 0 or offset < 0:
        raise DataError(f"n ({n}) and offset ({offset}) must be >= 0")
    rng = seeded_rng("testbed-problems", seed, split, task.min_digits, task.max_digits, task.operands)
    out: list[Problem] = []
    seen: set[tuple[int, ...]] = set()
    misses = 0
    while len(out) < offset + n:
        operands = tuple(_draw_operand(rng, task) for _ in range(task.operands))
        if split_of(operands) != split or (unique and operands in seen):
            misses += 1
            if misses > 10_000 + 100 * (offset + n):
                raise ConfigError(
                    f"the testbed task {task.model_dump()} has too few distinct problems in split {split!r} "
                    f"for {offset + n} of them; raise max_digits or operands"
                )
            continue
        misses = 0
        seen.add(operands)
        out.append(Problem(operands))
    return out[offset:]


def sample_train_problems(task: TestbedTaskConfig, n: int, rng: random.Random) -> list[Problem]:
    """`n` training problems drawn with replacement (for SFT batches; cheaper than a unique stream)."""
    out: list[Problem] = []
    while len(out) < n:
        operands = tuple(_draw_operand(rng, task) for _ in range(task.operands))
        if split_of(operands) == "train":
            out.append(Problem(operands))
    return out


def longest_completion(task: TestbedTaskConfig) -> str:
    """The longest completion any style can write for this task (all operands 9...9, longest variants)."""
    operands = [10**task.max_digits - 1] * task.operands
    steps = cot_steps(operands)
    sep = max(SEPARATORS, key=len)
    phrase = max(ANSWER_PHRASES, key=len).format(ans=sum(operands))
    return sep.join(steps) + f" {max(CONNECTIVES, key=len)} {phrase}"
