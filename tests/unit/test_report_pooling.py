"""`opd report` pools the runs of an arm as its seeds only when they are (issue 32, class 9): the same settings but
the seed, one run per seed, the same number of iterations; otherwise a ConfigError names what differs."""

from __future__ import annotations

import pytest

from opd_tasks.config import RunConfig
from opd_tasks.errors import ConfigError
from opd_tasks.report.queries import RunInfo, check_poolable


def _run(name: str, seed: int, arm: str = "opd", **changes) -> RunInfo:
    cfg = RunConfig().model_dump(mode="json") | {"seed": seed, "name": name, "root": f"/r/{name}"}
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        cfg[section] = {**cfg[section], key: value} if key else value
    return RunInfo(name, arm, seed, cfg)


def test_seeds_of_one_setting_pool_and_other_arms_may_differ() -> None:
    runs = [_run("a-s0", 0), _run("a-s1", 1, orchestration__shards=2), _run("t-s0", 0, arm="topd", method="topd")]
    check_poolable(runs, {r.run: 3 for r in runs})


@pytest.mark.parametrize("changes, pattern", [
    ({"iterations": 5}, r"differ in more than the seed \(iterations: 3 vs 5\)"),
    ({"update__learning_rate": 1e-3}, r"update.learning_rate: 0.0001 vs 0.001"),
    ({"data__eval_size": 10}, r"data.eval_size"),
])
def test_other_settings_are_not_seeds(changes: dict, pattern: str) -> None:
    runs = [_run("a-s0", 0), _run("a-s1", 1, **changes)]
    with pytest.raises(ConfigError, match=pattern):
        check_poolable(runs, {r.run: 3 for r in runs})


def test_a_seed_counts_once_and_lengths_must_match() -> None:
    twins = [_run("a", 0), _run("b", 0)]
    with pytest.raises(ConfigError, match=r"runs a, b of arm 'opd' share seed\(s\) \[0\]"):
        check_poolable(twins, {"a": 3, "b": 3})
    runs = [_run("a-s0", 0), _run("a-s1", 1)]
    with pytest.raises(ConfigError, match=r"different numbers of iterations \(a-s0: 3, a-s1: 1\)"):
        check_poolable(runs, {"a-s0": 3, "a-s1": 1})
