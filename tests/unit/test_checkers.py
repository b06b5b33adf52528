"""Answer checkers: the testbed checker and the general numeric checker."""

import pytest

from opd_tasks.checkers import (
    check_numeric,
    check_testbed,
    extract_numeric_answer,
    extract_testbed_answer,
    normalize_number,
    reference_answer,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3+9+0=12 ; 2+8+1=11 ; 1+4+1=6 so 612.", "612"),
        ("3+9+0=12 then 1+4+1=6 hence the answer is 612.", "612"),
        ("3+9+0=12 , 1+4+1=6 therefore = 612", "612"),
        ("3+9+0=12 and 1+4+1=6 thus answer: 612", "612"),
        ("3+9+0=12 so 612. 1+1+0=2 so 2.", "612"),  # the first answer counts
        ("3+9+0=12 ; 2+8", None),  # truncated: no answer
        ("", None),
        ("so", None),
        ("also 5", None),  # "so" only as a whole word
    ],
)
def test_extract_testbed(text, expected):
    assert extract_testbed_answer(text) == expected


def test_check_testbed():
    assert check_testbed("1+1+0=2 so 2.", 2)
    assert check_testbed("1+1+0=2 so 2.", "2")
    assert not check_testbed("1+1+0=2 so 3.", 2)
    assert not check_testbed("garbage", 2)
    assert check_testbed("0+1+0=1 ; 1+0+0=1 so 011.", 11)  # leading zeros: same number


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", "1234"),
        ("1234.0", "1234"),
        ("1234", "1234"),
        ("-5", "-5"),
        ("$1,000", "1000"),
        ("0.5", "1/2"),
        ("1/2", "1/2"),
        ("\\frac{1}{2}", "1/2"),
        ("\\dfrac{3}{4}", "3/4"),
        ("12%", "12"),
        ("42.", "42"),
        ("abc", None),
        ("", None),
        ("1/0", None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{1,234}.", "1,234"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("Step 1: 3 * 12 = 36.\n#### 36", "36"),
        ("The total is 5 + 7 = 12 apples", "12"),
        ("no numbers here", None),
        ("a \\boxed{unclosed", None),
        ("\\boxed{\\frac{1}{2}} then 7", "\\frac{1}{2}"),  # a boxed answer wins over a later number
    ],
)
def test_extract_numeric(text, expected):
    assert extract_numeric_answer(text) == expected


def test_check_numeric():
    gsm_ref = "He has 3 * 12 = <<3*12=36>>36 pencils.\n#### 36"
    assert reference_answer(gsm_ref) == "36"
    assert check_numeric("So he has \\boxed{36} pencils.", gsm_ref)
    assert check_numeric("36.0", "36")
    assert check_numeric("The answer is 1,234", "1234")
    assert check_numeric("\\boxed{0.75}", "\\frac{3}{4}")
    assert check_numeric("\\boxed{x^{2}}", "x^2")  # non-numeric: compared as strings
    assert check_numeric("it drops to -5 degrees", "#### -5")
    assert not check_numeric("35", gsm_ref)
    assert not check_numeric("no answer", "36")
    assert not check_numeric("36", "")

