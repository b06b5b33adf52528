"""The config tree: YAML loading, overrides, and errors that name the key path and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from opd_tasks.config import RunConfig
from opd_tasks.config_files import DEFAULT_CONFIG_PATH, dump_config, load_config
from opd_tasks.errors import ConfigError


def test_default_config_file_loads_and_matches_model_defaults_where_unset() -> None:
    cfg = load_config()
    assert DEFAULT_CONFIG_PATH.name == "testbed.yaml"
    assert cfg.name == "testbed" and cfg.models.teacher.path == "testbed:teacher"
    assert cfg.models.teacher.trust_remote_code is False
    assert cfg.analysis.high_loss_quantile == 0.2 and cfg.analysis.window == 8
    # The dump is complete and reloads to the same config.
    assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


def test_the_default_config_file_states_only_what_differs_from_the_defaults() -> None:
    from opd_tasks.config_files import read_yaml

    defaults = RunConfig().model_dump(mode="json")

    def same(data: dict, default: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in data.items():
            out += same(v, default[k], f"{prefix}{k}.") if isinstance(v, dict) else (
                [f"{prefix}{k}"] if default[k] == v else [])
        return out

    assert same(read_yaml(DEFAULT_CONFIG_PATH), defaults) == []
    assert load_config().device == "cpu"


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["rollout.temperature=0.7", "iterations=5", "update.bf16=false", "name=exp-1"])
    assert cfg.rollout.temperature == 0.7 and cfg.iterations == 5 and cfg.update.bf16 is False
    assert cfg.name == "exp-1"
    cfg = load_config(None, ["data.testbed.max_digits=4", "models.student.path=/m/s"])
    assert cfg.data.testbed.max_digits == 4 and cfg.models.student.path == "/m/s"


def test_a_model_section_without_a_path_keeps_the_default_model(tmp_path) -> None:
    cfg = load_config(None, ["models.student.dtype=bfloat16"])
    assert (cfg.models.student.path, cfg.models.student.dtype) == ("testbed:student", "bfloat16")
    assert cfg.models.teacher.path == "testbed:teacher"
    f = tmp_path / "c.yaml"
    f.write_text("models:\n  teacher: {dtype: float32}\n  student: {path: /m/s}\n")
    cfg = load_config(f)
    assert (cfg.models.teacher.path, cfg.models.teacher.dtype, cfg.models.student.path) == \
        ("testbed:teacher", "float32", "/m/s")
    with pytest.raises(ConfigError, match="models.student.path"):
        load_config(None, ["models.student.path="])



@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("rollout.tempurature=0.7", r"rollout\.tempurature: unknown key"),
        ("bogus=1", r"bogus: unknown key"),
        ("rollout.temperature=hot", r"rollout\.temperature: .*number.*\(got 'hot'\)"),
        ("rollout.temperature=-1", r"rollout\.temperature: .*greater than or equal to 0 \(got -1\)"),
        ("rollout.max_new_tokens=0", r"rollout\.max_new_tokens: .*greater than or equal to 1 \(got 0\)"),
        ("analysis.high_loss_quantile=1.5", r"analysis\.high_loss_quantile: .*\(got 1\.5\)"),
        ("method=ppo", r"method: .*'opd', 'opd_suppress', 'topd', 'opd_return' or 'opd_matched' \(got 'ppo'\)"),
        ("name=../evil", r"name: run name '\.\./evil'"),
        ("name=a/b", r"name: run name 'a/b'"),
        ("data.testbed.min_digits=5", r"data\.testbed: .*min_digits \(5\) must be <= max_digits \(3\)"),
        ("data.source=dataset", r"data\.path is required"),
        ("device.x=1", r"device is a value, not a section"),  # a value the file sets
        ("rollout.temperature.x=1", r"rollout\.temperature: Input should be a valid number"),  # a default's
        ("novalue", r"must look like key\.path=value"),
    ],
)
def test_bad_values_name_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*missing\.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: {temperature: 0.7\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping at the top, got list"):
        load_config(lst)
    typo = tmp_path / "typo.yaml"
    typo.write_text("rollout:\n  samples: 4\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*\n  rollout\.samples: unknown key"):
        load_config(typo)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == RunConfig()


def test_all_errors_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.top_p=0", "scoring.top_k=0"])
    assert "rollout.top_p" in str(e.value) and "scoring.top_k" in str(e.value)


def test_docs_config_reference_is_current() -> None:
    from opd_tasks.config_files import config_reference_markdown

    committed = (Path(__file__).resolve().parents[2] / "docs" / "config.md").read_text()
    assert committed == config_reference_markdown(), "regenerate: python -m opd_tasks.config_files > docs/config.md"


def test_every_shipped_config_loads() -> None:
    """configs/*.yaml are examples users copy: each must validate against the config tree."""
    files = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        cfg = load_config(f, [])
        assert cfg.name == f.stem, f


@pytest.mark.parametrize(("old", "new"), [("lambda_s", "topd.surface_weight"), ("alpha", "topd.spread_weight"),
                                          ("gamma", "topd.spread_decay and topd.bridge_decay"),
                                          ("horizon", "topd.spread_horizon"), ("beta", "topd.bridge_weight")])
def test_moved_topd_keys_are_refused_naming_the_new_key(tmp_path: Path, old: str, new: str) -> None:
    with pytest.raises(ConfigError, match=rf"update: update\.{old} moved to {new}$"):
        load_config(None, [f"update.{old}=0.5"])
    f = tmp_path / "old.yaml"
    f.write_text(f"update:\n  learning_rate: 0.001\n  {old}: 0.5\n")
    with pytest.raises(ConfigError, match=rf"update\.{old} moved to {new}"):
        load_config(f)


def test_method_and_fault_stage_come_from_their_registries() -> None:
    from opd_tasks.method import METHODS
    from opd_tasks.stages import STAGES

    for m in METHODS:
        assert load_config(None, [f"method={m}"]).method == m
    with pytest.raises(ConfigError, match=r"method: Input should be 'opd', 'opd_suppress', 'topd', 'opd_return' or "
                                          r"'opd_matched'"):
        load_config(None, ["method=grpo"])
    from opd_tasks.stages import check_config

    for s in STAGES:
        check_config(cfg := load_config(None, [f"fault.stage={s}"]))
        assert cfg.fault.stage == s
    with pytest.raises(ConfigError, match=r"fault\.stage: unknown stage 'scoring'; stages are prompts, rollout"):
        check_config(load_config(None, ["fault.stage=scoring"]))  # the stage table's check, when a run opens


def test_methods_turn_into_the_stages_switches() -> None:
    """opd_tasks/method.py: each method's plan, with the topd and baselines sections."""
    from opd_tasks.method import plan

    cfg = load_config(None, ["topd.surface_weight=0.2", "topd.bridge_weight=0.3", "baselines.compute_factor=1.6",
                             "rollout.samples_per_prompt=4"])
    p = {m: plan(cfg.model_copy(update={"method": m})) for m in ("opd", "opd_suppress", "topd", "opd_return",
                                                                     "opd_matched")}
    assert [m for m, x in p.items() if x.analyze] == ["opd_suppress", "topd"]
    assert p["opd"].weighting.surface_weight == 1.0 and p["opd_suppress"].weighting.surface_weight == 0.2
    assert p["opd_suppress"].weighting.spread_weight == 0.0 and p["topd"].weighting.spread_weight == 0.5
    assert p["topd"].bridge is not None and p["topd"].bridge.weight == 0.3
    assert all(p[m].bridge is None for m in ("opd", "opd_suppress", "opd_return", "opd_matched"))
    assert p["opd_return"].advantage is not None and p["opd_return"].advantage.horizon == 4
    assert all(p[m].advantage is None for m in ("opd", "topd", "opd_matched"))
    assert p["opd_matched"].samples_per_prompt == 6 and p["topd"].samples_per_prompt == 4
    no_bridge = plan(load_config(None, ["topd.bridge_weight=0"]))
    assert no_bridge.method.name == "topd" and no_bridge.bridge is None


def test_more_update_ranks_than_cores_is_refused_on_the_cpu(monkeypatch) -> None:
    import opd_tasks.stages as stages

    monkeypatch.setattr(stages.os, "cpu_count", lambda: 4)
    cfg = RunConfig.model_validate({"device": "cpu", "update": {"world_size": 64}})
    with pytest.raises(ConfigError, match="update.world_size is 64, but this machine has 4 CPU core"):
        stages.check_config(cfg)
    stages.check_config(RunConfig.model_validate({"device": "cpu", "update": {"world_size": 4}}))
    stages.check_config(RunConfig.model_validate({"device": "cuda", "update": {"world_size": 64}}))  # GPUs: later


def test_a_key_given_twice_and_a_boolean_for_a_number_are_refused(tmp_path: Path) -> None:
    """Issue 32, class 10: plain YAML keeps the last of two equal keys and reads `yes` as 1 for a number field;
    both are config errors naming the key."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: a\nupdate:\n  learning_rate: 1.0e-4\n  learning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"the key 'learning_rate' is given twice \(first on line 3\)"):
        load_config(twice)
    for override in ("iterations=yes", "update.learning_rate=true", "gates.max_truncated=on"):
        with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}: .*a number is expected, not a boolean"):
            load_config(None, [override])
    assert load_config(None, ["gates.enabled=false"]).gates.enabled is False  # a boolean field takes one
    assert load_config(None, ["models.teacher.trust_remote_code=true"]).models.teacher.trust_remote_code is True
