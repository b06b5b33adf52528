"""The stage table: keys follow content (never paths or runtime settings), run_stage publishes under the key and
never looks the store up, the generated docs/stages.md, and the documented way of adding a stage, run exactly as
docs/architecture.md shows it."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

from opd_tasks.config import EvaluationConfig, RolloutConfig, UpdateConfig
from opd_tasks.errors import ConfigError
from opd_tasks.models import ModelSpec
from opd_tasks.stages import (
    EVALUATE,
    ROLLOUT,
    SCORE,
    STAGES,
    UPDATE,
    EvaluateInputs,
    Output,
    RolloutInputs,
    ScoreInputs,
    Stage,
    StageContext,
    UpdateInputs,
    reference_markdown,
    run_stage,
)
from storage.refs import ArtifactRef
from storage.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]


def _ref(stage: str, sha: str = "c", uri: str | None = None) -> ArtifactRef:
    return ArtifactRef(uri=uri or f"/r/{stage}", stage=stage, key="b" * 64, sha256=sha * 64, rows=1, bytes=1,
                       schema_name=stage, schema_version=1)


def _model(sha: str, path: str = "/m") -> ModelSpec:
    return ModelSpec(path=path, sha256=sha * 64)


def test_docs_stages_reference_is_current() -> None:
    assert (REPO / "docs" / "stages.md").read_text() == reference_markdown(), (
        "regenerate with: python -m opd_tasks.stages > docs/stages.md")


def test_registry_order_and_gpu_flags() -> None:
    assert tuple(STAGES) == ("prompts", "rollout", "score", "gates", "analyze", "update", "evaluate")
    assert [s for s in STAGES if not STAGES[s].gpu] == ["prompts"]


def test_keys_follow_content_not_paths_or_names() -> None:
    def key(**kw) -> str:
        base = dict(student=_model("a"), prompts=_ref("prompts"), rollout=RolloutConfig(), checker="testbed", seed=0)
        return ROLLOUT.key(RolloutInputs(**(base | kw)))

    k = key()
    assert re.fullmatch(r"[0-9a-f]{64}", k)
    assert key(student=_model("a", path="/elsewhere")) == k  # a model by its content hash, never its path
    assert key(prompts=_ref("prompts", uri="/moved/root/prompts")) == k  # an artifact likewise
    assert len({k, key(student=_model("d")), key(prompts=_ref("prompts", sha="e")), key(seed=1),
                key(checker="numeric"), key(rollout=RolloutConfig(temperature=0.7))}) == 6


def test_unkeyed_and_conditional_inputs() -> None:
    score = ScoreInputs(teacher=_model("a"), student=_model("b"), rollouts=_ref("rollout"),
                        scoring=SCORE.inputs.model_fields["scoring"].annotation())
    assert SCORE.key(score) == SCORE.key(score.model_copy(update={"student": _model("f")}))
    assert SCORE.key(score) != SCORE.key(score.model_copy(update={"teacher": _model("f")}))

    def update_key(loss: str, teacher: str) -> str:
        return UPDATE.key(UpdateInputs(student=_model("a"), rollouts=_ref("rollout"), scores=_ref("score"),
                                       analysis=None, teacher=_model(teacher), update=UpdateConfig(loss=loss),
                                       bridge=None, seed=0))

    assert update_key("pg", "1") == update_key("pg", "2")  # the pg loss never reads the teacher model
    assert update_key("full_rkl", "1") != update_key("full_rkl", "2")
    with pytest.raises(ConfigError, match="stage 'update' takes UpdateInputs, got ScoreInputs"):
        UPDATE.key(score)


def test_a_greedy_evaluation_is_keyed_without_the_seed() -> None:
    """The same greedy answers under every seed: an experiment's seeds share the baseline and teacher_eval."""
    def evaluate_key(seed: int, **evaluation) -> str:
        return EVALUATE.key(EvaluateInputs(model=_model("a"), teacher=_model("b"), prompts=_ref("prompts"),
                                           evaluation=EvaluationConfig(**evaluation), checker="numeric", seed=seed))

    assert evaluate_key(1) == evaluate_key(2)
    assert evaluate_key(1, pass_k=4) != evaluate_key(2, pass_k=4)
    assert evaluate_key(1, greedy=False) != evaluate_key(2, greedy=False)
    assert len({evaluate_key(1), evaluate_key(1, pass_k=4), evaluate_key(1, greedy=False)}) == 3


def test_run_stage_publishes_under_the_key_and_never_looks_up(tmp_path: Path, monkeypatch) -> None:
    """run_stage computes and publishes under ctx.key, even when the store has that key (the runner's one lookup
    decides hits): the second call's writer finds the key taken and returns the stored artifact; its compute ran
    twice. The Stage as a plain function looks up first and computes once."""
    store = ArtifactStore(tmp_path)
    calls = []

    def compute(ctx: StageContext, x) -> Output:
        calls.append(ctx.key)
        return Output(meta={"n": 1})

    fake = Stage("gates", 1, ScoreInputs, (), compute, "a test stage", gpu=False)
    inputs = ScoreInputs(teacher=_model("a"), student=_model("b"), rollouts=_ref("rollout"),
                         scoring=SCORE.inputs.model_fields["scoring"].annotation())
    lookups = []
    real = ArtifactStore.lookup
    monkeypatch.setattr(ArtifactStore, "lookup", lambda self, *a: lookups.append(a) or real(self, *a))
    ctx = StageContext(str(tmp_path), None, "gates", fake.key(inputs))
    first = run_stage(fake, ctx, inputs)
    assert first.key == ctx.key and store.manifest(first)["meta"] == {"n": 1} and lookups == []
    assert run_stage(fake, ctx, inputs) == first and len(calls) == 2
    assert fake(store, inputs) == first and len(calls) == 2 and len(lookups) == 1


def test_the_documented_example_stage_runs_and_caches(tmp_path: Path) -> None:
    """docs/architecture.md, "Adding a stage": the code block, run as written, makes a stage that computes once
    and is then served from its key."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- example stage:[^\n]*-->\n```python\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md lost its example stage"
    namespace: dict = {}
    # dont_inherit: the block runs as its own module would, without this file's `from __future__` import
    exec(compile(block.group(1), "docs/architecture.md", "exec", dont_inherit=True), namespace)  # noqa: S102
    stage, inputs_type = namespace["REWARD_STATS"], namespace["RewardStatsInputs"]
    store = ArtifactStore(tmp_path)
    rollouts = store.put_table("rollout", "a" * 64, "rollouts", pa.table({
        "prompt_id": ["p0", "p0"], "sample_id": pa.array([0, 1], pa.int32()),
        "prompt_token_ids": pa.array([[1, 5], [1, 5]], pa.list_(pa.int32())),
        "token_ids": pa.array([[7, 2], [8, 2]], pa.list_(pa.int32())),
        "logprobs": pa.array([[-0.1, -0.2], [-0.3, -0.4]], pa.list_(pa.float32())),
        "text": ["7", "8"], "finish_reason": ["stop", "stop"], "reward": pa.array([1.0, 0.0], pa.float32()),
        "teacher_prompt_token_ids": pa.array([None, None], pa.list_(pa.int32()))}))
    ref = stage(store, inputs_type(rollouts=rollouts))
    assert store.manifest(ref)["meta"] == {"mean_reward": 0.5} and ref.stage == "reward_stats"
    n = len(store.published)
    assert stage(store, inputs_type(rollouts=rollouts)) == ref and len(store.published) == n
