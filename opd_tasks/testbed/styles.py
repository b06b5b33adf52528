"""Surface styles of the testbed's chain of thought.

Three slots in a completion are pure surface form: the separator between steps, the connective before the
answer and the answer phrase. Each slot has equivalent variants (none changes correctness). A *style* is a
probability distribution over the variants of each slot; the teacher is trained on the `teacher` style and
the student on the `student` style, which prefer different variants (mostly disjoint, not totally), so a
student rollout holds tokens that the teacher finds unlikely although they are harmless.

Every variant word is a single token of the testbed tokenizer (see `tokenizer.py`), so a style choice is one
token: ` then` vs ` ;`, ` hence` vs ` so`, ` the answer is` (three tokens, the first decides) vs nothing.

A style also says how often, at each boundary between two steps, the writer takes one of the two forks of the
mechanism switch (`data.testbed.fork`, docs/testbed.md):
- `stop` (the `consequential` fork): it stops early and states the answer directly, `3+9+0=12 so 612.`; the
  answer written is the right one, but a model that skips the steps rarely finds it, so a premature stop
  usually makes the answer wrong two to four tokens later;
- `filler` (the `harmless` twin): it writes the filler token ` :` there and goes on as usual.
At each boundary the stop is drawn first, then the filler.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from opd_tasks.errors import ConfigError

#: Text between two steps (and only there).
SEPARATORS: tuple[str, ...] = (" ; ", " , ", " then ", " and ")
#: The word after the last step that introduces the answer.
CONNECTIVES: tuple[str, ...] = ("so", "thus", "hence", "therefore")
#: How the answer itself is written after the connective; `{ans}` is the number.
ANSWER_PHRASES: tuple[str, ...] = ("{ans}.", "answer: {ans}", "the answer is {ans}.", "= {ans}")
#: The harmless filler a writer may put at a step boundary (one token of the testbed tokenizer).
FILLER = " :"


@dataclass(frozen=True)
class Style:
    """A distribution over the variants of each slot (weights need not sum to 1; missing variants get 0)."""

    name: str
    separator: dict[str, float]
    connective: dict[str, float]
    answer: dict[str, float]
    stop: float = 0.0  # probability, at each boundary between steps, of stopping early (the consequential fork)
    filler: float = 0.0  # probability, at each boundary, of writing FILLER first (the harmless fork)

    def __post_init__(self) -> None:
        if not (0.0 <= self.stop < 1.0 and 0.0 <= self.filler < 1.0):
            raise ConfigError(f"style {self.name!r}: stop and filler rates must be in [0, 1)")
        for slot, allowed in (("separator", SEPARATORS), ("connective", CONNECTIVES), ("answer", ANSWER_PHRASES)):
            weights = getattr(self, slot)
            unknown = set(weights) - set(allowed)
            if unknown:
                raise ConfigError(f"style {self.name!r}: unknown {slot} variants {sorted(unknown)}")
            if not any(w > 0 for w in weights.values()) or any(w < 0 for w in weights.values()):
                raise ConfigError(f"style {self.name!r}: {slot} weights must be >= 0 with one > 0")

    def pick(self, slot: str, rng: random.Random) -> str:
        weights = getattr(self, slot)
        variants = [v for v in weights if weights[v] > 0]
        return rng.choices(variants, weights=[weights[v] for v in variants])[0]

    def probability(self, slot: str, variant: str) -> float:
        weights = getattr(self, slot)
        return weights.get(variant, 0.0) / sum(weights.values())


STYLES: dict[str, Style] = {
    "teacher": Style(
        name="teacher",
        separator={" ; ": 0.8, " , ": 0.15, " then ": 0.05},
        connective={"so": 0.8, "thus": 0.15, "hence": 0.05},
        answer={"{ans}.": 0.8, "answer: {ans}": 0.15, "the answer is {ans}.": 0.05},
    ),
    "student": Style(
        name="student",
        separator={" then ": 0.5, " and ": 0.3, " , ": 0.15, " ; ": 0.05},
        connective={"hence": 0.5, "therefore": 0.3, "thus": 0.15, "so": 0.05},
        answer={"the answer is {ans}.": 0.5, "= {ans}": 0.3, "answer: {ans}": 0.15, "{ans}.": 0.05},
    ),
    # The teacher's favourites dominate, but every variant of every slot has non-zero probability (a teacher
    # that reads any phrasing but prefers its own).
    "teacher_broad": Style(
        name="teacher_broad",
        separator={" ; ": 0.7, " , ": 0.1, " then ": 0.1, " and ": 0.1},
        connective={"so": 0.7, "thus": 0.1, "hence": 0.1, "therefore": 0.1},
        answer={"{ans}.": 0.7, "answer: {ans}": 0.1, "the answer is {ans}.": 0.1, "= {ans}": 0.1},
    ),
    # The teacher of the mechanism switch (docs/testbed.md): broad (every variant of every slot at 0.05, so it reads
    # any phrasing) and rarely taking either fork (0.05 per boundary). Its students are below.
    "teacher_fork": Style(
        name="teacher_fork",
        separator={" ; ": 0.85, " , ": 0.05, " then ": 0.05, " and ": 0.05},
        connective={"so": 0.85, "thus": 0.05, "hence": 0.05, "therefore": 0.05},
        answer={"{ans}.": 0.85, "answer: {ans}": 0.05, "the answer is {ans}.": 0.05, "= {ans}": 0.05},
        stop=0.05, filler=0.05,
    ),
    "uniform": Style(
        name="uniform",
        separator=dict.fromkeys(SEPARATORS, 1.0),
        connective=dict.fromkeys(CONNECTIVES, 1.0),
        answer=dict.fromkeys(ANSWER_PHRASES, 1.0),
    ),
    # One fixed variant per slot: handy in tests (the output is fully determined by the problem).
    "plain": Style(name="plain", separator={" ; ": 1.0}, connective={"so": 1.0}, answer={"{ans}.": 1.0}),
}


# A student per fork of the switch: the student's phrasing, and its fork at 0.4 per boundary. By design the immediate
# k1 = log(p_S / p_T) of a fork or filler token (log(0.4 / 0.05) = 2.1) is like a style token's (log(0.5 / 0.05) =
# 2.3); measured, a fork's is higher, since it is also a connective choice (docs/testbed.md). 0.4 < 0.5, so greedy
# decoding never takes the fork; the sampled early-stop rate is the mechanistic readout.
STYLES["student_consequential"] = replace(STYLES["student"], name="student_consequential", stop=0.4)
STYLES["student_harmless"] = replace(STYLES["student"], name="student_harmless", filler=0.4)


def get_style(name: str) -> Style:
    """The registered style called `name`; ConfigError listing the known names otherwise."""
    try:
        return STYLES[name]
    except KeyError:
        raise ConfigError(f"unknown testbed style {name!r}; known styles: {sorted(STYLES)}") from None
