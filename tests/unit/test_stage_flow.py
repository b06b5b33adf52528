"""`orchestration.stage_runner` / `stage_deployment` (config validation and deployment names) and the `opd-stage`
flow's JSON inputs turned back into the stage's inputs record, with the same cache key (no Prefect server needed)."""

from __future__ import annotations

import json

import pytest
from pydantic_core import to_jsonable_python

from opd_tasks.config_files import load_config
from opd_tasks.errors import ConfigError
from opd_tasks.models import ModelSpec
from opd_tasks.stages import STAGES, gpu_stages, stage_deployment_name
from storage.refs import ArtifactRef


def test_stage_runner_defaults_and_deployment_names() -> None:
    o = load_config().orchestration
    assert o.stage_runner == "inline" and o.stage_deployment == "opd-stage/{stage}"
    assert [stage_deployment_name(o, s) for s in gpu_stages()] == [
        "opd-stage/rollout", "opd-stage/score", "opd-stage/gates", "opd-stage/analyze", "opd-stage/update",
        "opd-stage/evaluate"]
    o = load_config(None, ["orchestration.stage_runner=deployment",
                           "orchestration.stage_deployment=opd-stage/a100-{stage}.v2"]).orchestration
    assert o.stage_runner == "deployment" and stage_deployment_name(o, "update") == "opd-stage/a100-update.v2"
    with pytest.raises(ConfigError, match=r"stage 'prompts' has no deployment; GPU stages are rollout, score"):
        stage_deployment_name(o, "prompts")


@pytest.mark.parametrize("bad", ["rollout", "opd-stage/gpu", "distill/{stage}", "opd-stage/{stage}/x",
                                 "opd-stage/{stage}{stage}", "opd-stage/{other}", "opd-stage/{stage} x",
                                 "opd-stage/{stage}-{iteration}"])
def test_bad_stage_deployment_is_an_error_naming_the_key(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"orchestration\.stage_deployment: must be 'opd-stage/NAME' where NAME "
                                          r"holds \{stage\} once"):
        load_config(None, [f"orchestration.stage_deployment={bad}"])


@pytest.mark.parametrize(("override", "pattern"), [
    ("orchestration.stage_runner=k8s", r"orchestration\.stage_runner: Input should be 'inline' or 'deployment'"),
    ("orchestration.stage_poll_seconds=0", r"orchestration\.stage_poll_seconds: .*greater than 0"),
])
def test_bad_stage_runner_settings(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def _ref(stage: str) -> ArtifactRef:
    return ArtifactRef(uri=f"/r/{stage}", stage=stage, key="k" * 64, sha256="c" * 64, rows=3, bytes=10,
                       schema_name=stage, schema_version=1)


def test_stage_inputs_survive_json_with_their_types_and_cache_keys() -> None:
    """What `run_deployment` sends (JSON) comes back as the stage's inputs record, with the same cache key."""
    from flows.stage import typed_inputs
    from opd_tasks.method import Bridge
    from opd_tasks.stages import RolloutInputs, UpdateInputs

    cfg = load_config(None, ["rollout.temperature=0.7"])
    student = ModelSpec(path="/m/s", sha256="a" * 64, checkpoint=_ref("update"))
    teacher = ModelSpec(path="/m/t", sha256="b" * 64)
    inputs = RolloutInputs(student=student, prompts=_ref("prompts"), rollout=cfg.rollout, checker="testbed", seed=3)
    back = typed_inputs("rollout", json.loads(json.dumps(to_jsonable_python(inputs))))
    assert back == inputs and type(back.rollout) is type(cfg.rollout) and type(back.prompts) is ArtifactRef
    assert STAGES["rollout"].key(back) == STAGES["rollout"].key(inputs)
    # Optional inputs: None stays None, a ref is a ref, a bridge is a bridge.
    for analysis, bridge in ((None, None), (_ref("analyze"), Bridge(weight=0.1, decay=0.8))):
        inputs = UpdateInputs(student=student, rollouts=_ref("rollout"), scores=_ref("score"), analysis=analysis,
                              teacher=teacher, update=cfg.update, bridge=bridge, seed=0)
        back = typed_inputs("update", json.loads(json.dumps(to_jsonable_python(inputs))))
        assert back == inputs and STAGES["update"].key(back) == STAGES["update"].key(inputs)


def test_a_stage_context_survives_json() -> None:
    """What `run_deployment` sends of a planned call (its key, parts and `prepare` result) comes back equal."""
    from opd_tasks.stages import Span, StageContext

    ctx = StageContext("/r", "file:///m", "analyze", "a" * 64, "cpu", False, "run", 3, "analyze",
                       (Span(0, 2, 0, 4), Span(1, 2, 4, 6)), {"cut": 0.5})
    assert StageContext.from_json(json.loads(json.dumps(ctx.to_json()))) == ctx


def test_stage_inputs_errors_name_the_stage_and_field() -> None:
    from flows.stage import typed_inputs

    ok = to_jsonable_python(dict(model=ModelSpec(path="/m", sha256="a" * 64), prompts=_ref("prompts"),
                                 evaluation=load_config().evaluation, seed=0, checker="testbed"))
    assert typed_inputs("evaluate", ok).seed == 0
    with pytest.raises(ConfigError, match=r"opd-stage: unknown stage 'train'"):
        typed_inputs("train", ok)
    with pytest.raises(ConfigError, match=r"opd-stage evaluate: bad inputs: bogus: Extra inputs are not permitted"):
        typed_inputs("evaluate", {**ok, "bogus": 1})
    with pytest.raises(ConfigError, match=r"opd-stage evaluate: bad inputs: prompts: Field required"):
        typed_inputs("evaluate", {k: v for k, v in ok.items() if k != "prompts"})
    with pytest.raises(ConfigError, match=r"opd-stage evaluate: bad inputs: prompts\.stage: Field required"):
        typed_inputs("evaluate", {**ok, "prompts": {"uri": "/x"}})
    with pytest.raises(ConfigError, match=r"bad inputs: device: Extra inputs"):  # runtime settings are not inputs
        typed_inputs("evaluate", {**ok, "device": "cpu"})


def test_deploy_stages_refuses_non_gpu_stages_and_bad_names_before_any_api_call() -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["deploy-stages", "--pool", "gpu", "--stages", "rollout,prompts"])
    assert out.exit_code == 2 and "not GPU stage(s) ['prompts']" in out.output
    out = runner.invoke(app, ["deploy-stages", "--pool", "gpu", "--set", "orchestration.stage_deployment=x/{stage}"])
    assert out.exit_code == 2 and "orchestration.stage_deployment: must be" in out.output
