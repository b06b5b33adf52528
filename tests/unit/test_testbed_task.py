"""The testbed task generator: known cases, determinism, split disjointness, styles."""

import random
import re

import pytest

from opd_tasks.config import TestbedTaskConfig
from opd_tasks.errors import ConfigError, DataError
from opd_tasks.testbed.styles import ANSWER_PHRASES, CONNECTIVES, SEPARATORS, STYLES, get_style
from opd_tasks.testbed.task import (
    SPLITS,
    Problem,
    cot_steps,
    generate_problems,
    longest_completion,
    render_completion,
    split_of,
)

TASK = TestbedTaskConfig()


def test_steps_by_hand():
    assert cot_steps((123, 489)) == ["3+9+0=12", "2+8+1=11", "1+4+1=6"]
    assert cot_steps((999, 1)) == ["9+1+0=10", "9+0+1=10", "9+0+1=10"]
    assert cot_steps((5, 70, 308)) == ["5+0+8+0=13", "0+7+0+1=8", "0+0+3+0=3"]


def test_plain_render_and_prompt():
    p = Problem((123, 489))
    assert p.prompt == "Q: 123+489=?\n"
    assert render_completion(p, get_style("plain"), random.Random(0)) == "3+9+0=12 ; 2+8+1=11 ; 1+4+1=6 so 612."


def _answer_from_steps(steps: list[str]) -> int:
    """Slow reference: read the answer off the steps (last digit of each sum, reversed, + final carry)."""
    sums = [int(s.split("=")[1]) for s in steps]
    digits = "".join(str(s % 10) for s in reversed(sums))
    return int(str(sums[-1] // 10) + digits)


@pytest.mark.parametrize("operands", [2, 3, 4])
def test_steps_determine_the_answer(operands):
    task = TestbedTaskConfig(min_digits=1, max_digits=4, operands=operands)
    for p in generate_problems(task, "train", 300, seed=3):
        assert _answer_from_steps(p.steps()) == p.answer == sum(p.operands)


def test_digits_in_range():
    task = TestbedTaskConfig(min_digits=2, max_digits=3, operands=3)
    problems = generate_problems(task, "train", 500, seed=1)
    assert all(len(p.operands) == 3 for p in problems)
    lengths = {len(str(x)) for p in problems for x in p.operands}
    assert lengths == {2, 3}


def test_same_seed_same_problems_other_seed_differs():
    a = generate_problems(TASK, "test", 50, seed=7)
    assert a == generate_problems(TASK, "test", 50, seed=7)
    assert a != generate_problems(TASK, "test", 50, seed=8)


def test_offset_windows_continue_the_stream():
    whole = generate_problems(TASK, "train", 30, seed=0)
    assert generate_problems(TASK, "train", 10, seed=0, offset=20) == whole[20:]
    assert len(set(whole)) == 30  # unique within the stream


def test_splits_are_disjoint_and_sized():
    seen = {s: {tuple(sorted(p.operands)) for p in generate_problems(TASK, s, 2000, seed=0)} for s in SPLITS}
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"]
    assert not seen["validation"] & seen["test"]
    # every problem is in exactly the split its hash names; commuted operands share the split
    for split, canon in seen.items():
        assert all(split_of(c) == split for c in canon)
        assert all(split_of(tuple(reversed(c))) == split for c in canon)
    # ~80/10/10 over many problems
    counts = {s: 0 for s in SPLITS}
    for a in range(10, 200):
        counts[split_of((a, 7))] += 1
    assert counts["train"] > counts["validation"] and counts["train"] > counts["test"]


def test_unknown_split_and_too_small_space():
    with pytest.raises(DataError, match="split 'dev'"):
        generate_problems(TASK, "dev", 3)
    tiny = TestbedTaskConfig(min_digits=1, max_digits=1, operands=2)
    with pytest.raises(ConfigError, match="too few distinct problems"):
        generate_problems(tiny, "test", 200)


def test_styles_registry_and_preferences():
    with pytest.raises(ConfigError, match="known styles"):
        get_style("nope")
    teacher, student = get_style("teacher"), get_style("student")
    for slot in ("separator", "connective", "answer"):
        t_top = max(getattr(teacher, slot), key=getattr(teacher, slot).get)
        s_top = max(getattr(student, slot), key=getattr(student, slot).get)
        assert t_top != s_top
        assert teacher.probability(slot, s_top) <= 0.05  # the student's favourite is unlikely to the teacher
        assert student.probability(slot, t_top) > 0  # ... but not impossible the other way round (overlap)
    for style in STYLES.values():
        assert set(style.separator) <= set(SEPARATORS) and set(style.connective) <= set(CONNECTIVES)
        assert set(style.answer) <= set(ANSWER_PHRASES)


def test_style_sampling_follows_weights():
    rng = random.Random(0)
    style = get_style("teacher")
    picks = [style.pick("connective", rng) for _ in range(4000)]
    assert abs(picks.count("so") / 4000 - 0.8) < 0.03
    assert "therefore" not in picks


def test_completion_in_any_style_has_the_same_steps_and_answer():
    p = Problem((48, 977))
    for name in (n for n, style in STYLES.items() if not style.stop):  # a stop skips steps by design
        text = render_completion(p, get_style(name), random.Random(1))
        for step in p.steps():
            assert step in text
        assert str(p.answer) in text.split()[-1] or text.endswith(str(p.answer))


def test_longest_completion():
    text = longest_completion(TASK)
    assert text.startswith("9+9+0=18") and "1998" in text and "therefore" in text


def test_fork_styles_stop_early_or_insert_the_filler_at_their_rates():
    """Over 2,000 three-column problems, the consequential student stops at a boundary about 40% of the time and
    then states the right answer directly; the harmless twin writes ` :` there instead and keeps every step; the
    fork-free styles never do either, so their completions (and the committed models' data) are unchanged."""
    rng = random.Random(0)
    problems = [Problem((100 + i % 500, 300 + i // 4)) for i in range(2000)]  # three columns, two boundaries each
    stops = fillers = 0
    for p in problems:
        text = render_completion(p, get_style("student_consequential"), rng)
        done = re.findall(r"\d+(?:\+\d+)+=\d+", text)
        assert done == p.steps()[: len(done)] and text.rstrip(".").endswith(str(p.answer)) and " :" not in text
        stops += len(done) < 3
        text = render_completion(p, get_style("student_harmless"), rng)
        assert all(s in text for s in p.steps()) and str(p.answer) in text
        fillers += text.count(" :")
    assert abs(stops / 2000 - (1 - 0.6**2)) < 0.04  # one of the two boundaries stops (standard error 0.011)
    assert abs(fillers / 4000 - 0.4) < 0.03  # per boundary (standard error 0.008)
    assert render_completion(Problem((12, 34)), get_style("student"), random.Random(3)) == render_completion(
        Problem((12, 34)), get_style("student"), random.Random(3))
    for name, style in STYLES.items():
        if name not in ("teacher_fork", "student_consequential", "student_harmless"):
            assert style.stop == style.filler == 0.0, name
    assert get_style("teacher_fork").stop == get_style("teacher_fork").filler == 0.05


def test_operands_and_step_count_from_a_prompt():
    from opd_tasks.testbed.task import operands_of, prompt_text, step_count

    assert operands_of(prompt_text((48, 977))) == (48, 977) and step_count((48, 977)) == 3
    assert operands_of("<bos>Q: 5+6+70=?\n") == (5, 6, 70) and step_count((5, 6, 70)) == 2
    assert operands_of("no prompt here") is None
