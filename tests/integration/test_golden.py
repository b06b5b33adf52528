"""The golden tests: every method and detector on the committed testbed models reproduces the figures recorded in
tests/golden/testbed.json, so a change that was meant to be a refactor provably changes nothing numerical.

- `test_exact`: every artifact's bytes, every per-step loss and every meta value equal. Exact float equality holds on
  the torch version and CPU kernel family the figures were recorded on; on another the test is skipped, and the
  skip says why in the summary (`-ra`).
- `test_tolerant`: runs on every machine, so a refactor is always covered: the same artifacts, every table's rows
  and discrete columns (tokens, text, flags, regimes) equal, every float within the tolerance stated in
  tests/golden/__init__.py.

Both read one measurement per case (about 4 s each on 2 cores).
"""

from __future__ import annotations

import copy
import json

import pytest

from tests.golden import ATOL, CASES, GOLDEN, RTOL, measure, platform, tolerant_mismatches

RECORDED = json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory):
    """case -> its measurement, made once for both checks."""
    cache: dict[str, dict] = {}

    def get(case: str) -> dict:
        if case not in cache:
            cache[case] = measure(case, tmp_path_factory.mktemp(case))
        return cache[case]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_exact(case: str, measured) -> None:
    if RECORDED["platform"] != platform():
        pytest.skip(f"exact golden figures were recorded on {RECORDED['platform']}, this is {platform()}: exact float "
                    "equality does not carry over (the tolerant test covers this machine)")
    want, got = RECORDED["cases"][case], measured(case)
    assert got["baseline"] == want["baseline"] and got["accuracy"] == want["accuracy"]
    assert got["updates"] == want["updates"]  # every optimizer step's loss, KL, grad norm, tokens
    assert sorted(got["artifacts"]) == sorted(want["artifacts"])  # the same stages at the same iterations
    for label, art in want["artifacts"].items():
        assert got["artifacts"][label]["content"] == art["content"], f"{case} {label}: artifact content changed"
        assert got["artifacts"][label]["meta"] == art["meta"], f"{case} {label}: manifest meta changed"
        assert got["artifacts"][label]["tables"] == art["tables"], f"{case} {label}: table figures changed"


@pytest.mark.parametrize("case", list(CASES))
def test_tolerant(case: str, measured) -> None:
    problems = tolerant_mismatches(measured(case), RECORDED["cases"][case])
    assert not problems, f"{case}: {len(problems)} figure(s) differ from tests/golden/testbed.json:\n" + "\n".join(
        problems[:20])


def test_tolerant_check_finds_what_matters() -> None:
    """The tolerant check on known cases: a float moved inside the tolerance passes; one beyond it, a changed
    token, a missing artifact or a changed accuracy fails, each named."""
    want = RECORDED["cases"]["topd"]
    assert tolerant_mismatches(copy.deepcopy(want), want) == []

    near = copy.deepcopy(want)
    step = near["updates"]["0"][0]
    step["loss"] += 0.5 * (ATOL + RTOL * abs(step["loss"]))
    assert tolerant_mismatches(near, want) == []

    far = copy.deepcopy(want)
    far["updates"]["0"][0]["loss"] += 2 * (ATOL + RTOL * abs(want["updates"]["0"][0]["loss"]))
    assert [p.split(":")[0] for p in tolerant_mismatches(far, want)] == ["updates.0[0].loss"]

    token = copy.deepcopy(want)
    token["artifacts"]["it0.rollout"]["tables"]["rollouts"]["discrete"] = "0" * 64  # a sha256, compared
    assert [p.split(":")[0] for p in tolerant_mismatches(token, want)] == ["it0.rollout.tables.rollouts.discrete"]

    gone = copy.deepcopy(want)
    del gone["artifacts"]["it1.analyze"]
    assert tolerant_mismatches(gone, want)[0].startswith("artifacts:")

    acc = copy.deepcopy(want)
    acc["accuracy"][-1] -= 0.05
    assert [p.split(":")[0] for p in tolerant_mismatches(acc, want)] == ["accuracy[1]"]
