"""The `distill` Prefect flow on a real (harness) Prefect server with tiny random models:
first run computes, a rerun is all Cached, a failure reruns only what failed and what depends on it, a config
change invalidates exactly the affected stages, and the per-stage artifacts are visible through the API."""

from __future__ import annotations

from pathlib import Path

import pytest

from opd_tasks.config import RunConfig
from opd_tasks.config_files import load_config
from opd_tasks.errors import ConfigError, DataError, TransientError
from storage.lineage import RunLineage
from storage.store import ArtifactStore
from tests.helpers import assert_no_pickle_persisted, tiny_model_dir


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory):
    import os

    results = tmp_path_factory.mktemp("prefect-results")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(results)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("models")
    s, _ = tiny_model_dir(base / "student", seed=0, hidden=32)
    t, _ = tiny_model_dir(base / "teacher", seed=1, hidden=48)
    return s, t


def _cfg(models, root: Path, *extra: str) -> RunConfig:
    s, t = models
    return load_config(None, [f"models.student.path={s}", f"models.teacher.path={t}", f"root={root}",
                              "iterations=2", "data.prompts_per_iteration=4", "rollout.samples_per_prompt=2",
                              "rollout.max_new_tokens=6", "evaluation.max_new_tokens=6", "data.eval_size=6",
                              "orchestration.retry_delay_seconds=0", "method=opd",
                              # random tiny models rarely emit EOS, do not agree on tokens and answer nothing:
                              "gates.max_truncated=null", "gates.min_topk_coverage=null", "gates.min_headroom=null",
                              *extra])


def _states(out: dict) -> list[tuple[int, str, str]]:
    return [(it["iteration"], r["stage"], r["state"]) for it in out["iterations"] for r in it["stages"]]


def _shas(out: dict) -> dict[tuple[int, str], str]:
    return {(it["iteration"], r["stage"]): r["sha256"] for it in out["iterations"] for r in it["stages"]}


STAGES = ["prompts", "rollout", "score", "gates", "update", "evaluate"]


def test_first_run_computes_then_rerun_is_all_cached(harness, models, tmp_path: Path) -> None:
    from flows.distill import distill

    cfg = _cfg(models, tmp_path)
    first = distill(cfg.model_dump(mode="json"))
    assert _states(first) == [(i, s, "Completed") for i in range(2) for s in STAGES]
    second = distill(cfg.model_dump(mode="json"))
    assert _states(second) == [(i, s, "Cached") for i in range(2) for s in STAGES]
    assert _shas(first) == _shas(second)
    # A new run name with the same inputs reuses everything too (names are labels, not key parts).
    third = distill(_cfg(models, tmp_path, "name=other").model_dump(mode="json"))
    assert {s for _, _, s in _states(third)} == {"Cached"} and _shas(third) == _shas(first)
    lin = RunLineage(tmp_path, "testbed")
    assert {(e.iteration, e.stage) for e in lin.entries()} >= {(1, s) for s in STAGES} | {(0, "baseline")}

    # (e) The per-stage table artifact is in the Prefect API and points at artifacts that exist.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["opd-testbed-stages"])))
    assert arts, "no table artifact published"
    import json

    rows = json.loads(arts[0].data) if isinstance(arts[0].data, str) else arts[0].data
    assert {r["stage"] for r in rows} == set(STAGES)
    store = ArtifactStore(tmp_path)
    for r in rows:
        ref = next(x for x in store.iter_artifacts() if x.uri == r["uri"])
        store.verify(ref)
    # Security default: every Prefect result (cache record) under the root is JSON, never a pickle.
    records = list((tmp_path / "prefect" / "results").iterdir())
    assert len(records) >= len(STAGES)
    for f in records:
        rec = json.loads(f.read_text())
        assert rec["metadata"]["serializer"]["type"] == "json"
        assert json.loads(rec["result"])["__class__"] == "storage.refs.ArtifactRef"


def test_failure_then_rerun_recomputes_only_failed_and_downstream(harness, models, tmp_path: Path) -> None:
    from flows.distill import distill

    clean = distill(_cfg(models, tmp_path / "clean").model_dump(mode="json"))
    faulty = _cfg(models, tmp_path / "f", "fault.stage=update", "fault.iteration=1", "orchestration.retries=0")
    with pytest.raises(TransientError, match="injected fault"):
        distill(faulty.model_dump(mode="json"))
    assert_no_pickle_persisted(tmp_path / "f")
    rerun = distill(faulty.model_dump(mode="json"))  # the fault fires once
    states = {(i, s): st for i, s, st in _states(rerun)}
    assert [k for k, v in states.items() if v != "Cached"] == [(1, "update"), (1, "evaluate")]
    # Same inputs, same bytes: the recovered run equals a run that never failed.
    assert _shas(rerun) == _shas(clean)


def test_transient_fault_is_retried(harness, models, tmp_path: Path) -> None:
    from flows.distill import distill

    cfg = _cfg(models, tmp_path, "fault.stage=score", "fault.iteration=0", "orchestration.retries=1")
    out = distill(cfg.model_dump(mode="json"))
    assert [s for s in _states(out) if s[2] != "Completed"] == []
    assert (Path(tmp_path) / "faults" / "testbed.score.it0").exists()


def test_changed_setting_invalidates_exactly_downstream(harness, models, tmp_path: Path) -> None:
    from flows.distill import distill

    distill(_cfg(models, tmp_path).model_dump(mode="json"))
    out = distill(_cfg(models, tmp_path, "update.learning_rate=0.01").model_dump(mode="json"))
    st = {(i, s): v for i, s, v in _states(out)}
    assert st[(0, "prompts")] == st[(0, "rollout")] == st[(0, "score")] == "Cached"
    assert st[(0, "update")] == st[(0, "evaluate")] == "Completed"
    assert st[(1, "prompts")] == "Cached"  # prompts do not depend on the student
    assert st[(1, "rollout")] == st[(1, "score")] == st[(1, "update")] == "Completed"


def test_refresh_retires_and_recomputes(harness, models, tmp_path: Path) -> None:
    from flows.distill import distill

    cfg = _cfg(models, tmp_path, "iterations=1")
    first = distill(cfg.model_dump(mode="json"))
    out = distill(cfg.model_dump(mode="json"), refresh=["score"])
    st = {s: v for _, s, v in _states(out)}
    assert st["score"] == "Completed" and st["rollout"] == "Cached"
    assert st["update"] == "Cached"  # deterministic on CPU: the recomputed scores have the same hash
    assert _shas(out) == _shas(first)
    assert len(list((tmp_path / "retired" / "score").iterdir())) == 1


def test_should_retry_only_transient() -> None:
    from flows.executors import _should_retry

    class S:
        def __init__(self, e):
            self.e = e

        def result(self, raise_on_failure=True):
            raise self.e

    assert _should_retry(None, None, S(TransientError("x"))) is True
    assert _should_retry(None, None, S(RuntimeError("CUDA error"))) is True
    assert _should_retry(None, None, S(ConfigError("bad"))) is False
    assert _should_retry(None, None, S(DataError("bad"))) is False


def test_resume_continues_from_latest_checkpoint_on_new_prompts(harness, models, tmp_path: Path) -> None:
    from flows.distill import distill

    cfg = _cfg(models, tmp_path, "iterations=1")
    first = distill(cfg.model_dump(mode="json"))
    second = distill(cfg.model_dump(mode="json"), resume=True)
    assert [it["iteration"] for it in second["iterations"]] == [1]
    lin = RunLineage(tmp_path, "testbed")
    # Iteration 1 started from iteration 0's checkpoint, on the next slice of prompts.
    it1_roll_key = lin.get(1, "rollout").ref.key
    from opd_tasks.models import ModelSpec
    from opd_tasks.stages import ROLLOUT, RolloutInputs

    store = ArtifactStore(tmp_path)
    ck = ModelSpec.from_checkpoint(store, RunLineage(tmp_path, "testbed").get(0, "update").ref)
    assert it1_roll_key == ROLLOUT.key(RolloutInputs(student=ck, prompts=lin.get(1, "prompts").ref,
                                                     rollout=cfg.rollout, checker="testbed", seed=cfg.seed))
    assert lin.get(1, "prompts").ref.sha256 != lin.get(0, "prompts").ref.sha256
    assert first["iterations"][0]["checkpoint"]["sha256"] == ck.sha256


def test_ablations_share_rollouts_and_scores(harness, models, tmp_path: Path) -> None:
    """opd, then opd_suppress and topd on the same student: iteration 0's prompts, rollouts and teacher scores
    are cache hits; a changed analysis setting recomputes exactly analysis and what follows it."""
    from flows.distill import distill

    base = distill(_cfg(models, tmp_path, "iterations=1", "method=opd").model_dump(mode="json"))
    for method in ("opd_suppress", "topd"):
        out = distill(_cfg(models, tmp_path, "iterations=1", f"method={method}").model_dump(mode="json"))
        st = {s: v for _, s, v in _states(out)}
        assert st["prompts"] == st["rollout"] == st["score"] == "Cached"
        assert st["analyze"] == st["update"] == st["evaluate"] == "Completed"
        assert {k: v for k, v in _shas(out).items() if k[1] in ("rollout", "score")} == {
            k: v for k, v in _shas(base).items() if k[1] in ("rollout", "score")}
    out = distill(_cfg(models, tmp_path, "iterations=1", "method=topd", "analysis.probe_tokens=3")
                  .model_dump(mode="json"))
    st = {s: v for _, s, v in _states(out)}
    assert [s for s, v in st.items() if v != "Cached"] == ["analyze", "update", "evaluate"]


def _latest_flow_run_task_runs() -> list:
    """The task runs of the flow run that started last (tests in this module run one flow at a time)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        latest = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[latest.id])))


def test_failed_gate_stops_before_the_update(harness, models, tmp_path: Path) -> None:
    from flows.distill import distill

    cfg = _cfg(models, tmp_path, "name=gated", "iterations=1", "gates.max_truncated=0.0")
    with pytest.raises(DataError, match=r"quality gates failed.*truncated"):
        distill(cfg.model_dump(mode="json"))
    stages = {e.stage for e in RunLineage(tmp_path, "gated").entries()}
    assert "gates" in stages and "update" not in stages
    assert [r.name for r in _latest_flow_run_task_runs() if r.name.startswith("update")] == []


def test_data_error_in_a_stage_is_not_retried_and_a_transient_one_is(harness, models, tmp_path: Path) -> None:
    """With 3 retries allowed, a stage that fails with a DataError (a dataset file without the prompt column) runs
    once; a stage that fails with a TransientError (an injected fault) runs again and completes."""
    from flows.distill import distill

    data = tmp_path / "bad.jsonl"
    data.write_text('{"q": "1+1", "a": "2"}\n')
    cfg = _cfg(models, tmp_path, "data.source=dataset", f"data.path={data}", "data.eval_split=train",
               "orchestration.retries=3", "orchestration.retry_delay_seconds=0")
    with pytest.raises(DataError, match=r"column\(s\) \['question', 'answer'\] not found"):
        distill(cfg.model_dump(mode="json"))
    [prompts] = _latest_flow_run_task_runs()
    assert prompts.name == "prompts-it0" and prompts.state.is_failed() and prompts.run_count == 1
    cfg = _cfg(models, tmp_path, "fault.stage=score", "fault.iteration=0", "orchestration.retries=3",
               "orchestration.retry_delay_seconds=0", "iterations=1")
    distill(cfg.model_dump(mode="json"))
    [score] = [r for r in _latest_flow_run_task_runs() if r.name == "score-it0"]
    assert score.state.is_completed() and score.run_count == 2


def test_deleted_artifact_is_recomputed_not_served_from_a_stale_cache_record(harness, models, tmp_path: Path) -> None:
    import shutil

    from flows.distill import distill

    cfg = _cfg(models, tmp_path, "iterations=1")
    first = distill(cfg.model_dump(mode="json"))
    score_ref = RunLineage(tmp_path, "testbed").get(0, "score").ref
    shutil.rmtree(ArtifactStore(tmp_path).path_of(score_ref))  # the Prefect cache record for this key still exists
    out = distill(cfg.model_dump(mode="json"))
    st = {s: v for _, s, v in _states(out)}
    assert st["score"] == "Completed" and st["rollout"] == "Cached" and st["update"] == "Cached"
    assert _shas(out) == _shas(first)
    ArtifactStore(tmp_path).verify(score_ref)  # the same bytes are back under the same key


@pytest.mark.parametrize("tamper", ["edit", "unparseable"])
def test_tampered_manifest_is_recomputed_not_adopted(harness, models, tmp_path: Path, tamper: str) -> None:
    """A checkpoint manifest edited to show another loss (its Prefect cache record and the lineage still hold the
    published sha256), or made unparseable: the rerun retires it, recomputes the update, reports the true loss,
    and `opd verify` agrees."""
    import json

    from typer.testing import CliRunner

    from flows.cli import app
    from flows.distill import distill
    from storage.hashing import canonical_json

    cfg = _cfg(models, tmp_path, "iterations=1")
    first = distill(cfg.model_dump(mode="json"))
    store = ArtifactStore(tmp_path)
    mpath = store.path_of(RunLineage(tmp_path, "testbed").get(0, "update").ref) / "_manifest.json"
    m = json.loads(mpath.read_bytes())
    m["meta"]["mean_loss"] = -99.0
    mpath.write_bytes(canonical_json(m) if tamper == "edit" else b"{")
    out = distill(cfg.model_dump(mode="json"))
    st = {s: v for _, s, v in _states(out)}
    assert st["update"] == "Completed" and st["rollout"] == "Cached"
    assert out["iterations"][0]["mean_loss"] == first["iterations"][0]["mean_loss"] != -99.0
    assert _shas(out) == _shas(first)
    [moved] = (tmp_path / "retired" / "update").iterdir()
    assert moved.name.endswith("-corrupted")
    r = CliRunner().invoke(app, ["verify", "testbed", "--root", str(tmp_path)])
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_experiment_runs_methods_x_seeds_shares_cache_and_publishes_the_report(harness, models, tmp_path: Path) -> None:
    """`opd experiment`: one distill subflow per (seed, method); within a seed the second method's baseline and
    first-iteration prompts/rollouts/scores are cache hits, and the greedy baseline is one for all seeds; the
    report covers exactly these runs and is published as a Prefect markdown artifact."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.experiment import experiment

    cfg = _cfg(models, tmp_path, "iterations=1", "analysis.probe_tokens=3")
    out = experiment(cfg.model_dump(mode="json"), ["opd", "topd"], [0, 1], "exp", report_out=str(tmp_path / "rep"))
    assert [(r["run"], r["method"], r["seed"]) for r in out["runs"]] == [
        ("exp-opd-s0", "opd", 0), ("exp-topd-s0", "topd", 0), ("exp-opd-s1", "opd", 1), ("exp-topd-s1", "topd", 1)]
    store = ArtifactStore(tmp_path)
    for seed in (0, 1):
        a, b = RunLineage(store.layout, f"exp-opd-s{seed}"), RunLineage(store.layout, f"exp-topd-s{seed}")
        for it, stage in ((0, "baseline"), (0, "prompts"), (0, "rollout"), (0, "score")):
            assert b.get(it, stage).cached and b.get(it, stage).ref.sha256 == a.get(it, stage).ref.sha256
        assert not b.get(0, "update").cached and b.get(0, "update").ref.sha256 != a.get(0, "update").ref.sha256
    assert RunLineage(store.layout, "exp-opd-s0").get(0, "rollout").ref.sha256 != \
        RunLineage(store.layout, "exp-opd-s1").get(0, "rollout").ref.sha256  # seeds differ
    s0, s1 = RunLineage(store.layout, "exp-opd-s0").get(0, "baseline"), RunLineage(store.layout, "exp-opd-s1").get(
        0, "baseline")
    assert s1.cached and s1.ref == s0.ref  # a greedy evaluation is keyed without the seed: computed once
    rep = out["report"]
    assert Path(rep["html"]).is_file() and set(rep["summary"]["methods"]) == {"opd", "topd"}
    assert rep["summary"]["methods"]["topd"]["seeds"] == [0, 1]

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="opd-report-%")))

    arts = asyncio.run(artifacts())
    assert arts and any("exp-topd-s1" in (a.data or "") and "final accuracy" in (a.data or "") for a in arts)


def test_deployment_runner_without_stage_deployments_fails_before_any_work(harness, models, tmp_path: Path) -> None:
    from flows.distill import distill

    cfg = _cfg(models, tmp_path, "iterations=1", "orchestration.stage_runner=deployment")
    with pytest.raises(ConfigError, match=r"deployment\(s\) opd-stage/rollout, opd-stage/score, opd-stage/gates, "
                                          r"opd-stage/update, opd-stage/evaluate do not exist .*opd deploy-stages"):
        distill(cfg.model_dump(mode="json"))
    assert list(ArtifactStore(tmp_path).iter_artifacts()) == []


def test_stage_flow_computes_what_the_inline_run_computed(harness, models, tmp_path: Path) -> None:
    """The `opd-stage` flow (what each stage deployment runs), called with JSON parameters (the inputs record and
    the planned call's context) after an inline run whose baseline artifact was then retired, publishes the same
    artifact under the same key; a context for other inputs is refused."""
    from pydantic_core import to_jsonable_python

    from flows.distill import distill
    from flows.stage import opd_stage
    from opd_tasks.pipeline import checker_name, resolve_models
    from opd_tasks.stages import EVALUATE, EvaluateInputs, StageContext

    cfg = _cfg(models, tmp_path, "iterations=1")
    distill(cfg.model_dump(mode="json"))
    lin = RunLineage(tmp_path, "testbed")
    models = resolve_models(cfg)
    inputs = EvaluateInputs(model=models.initial_student, teacher=models.teacher,
                            prompts=lin.get(0, "eval_prompts").ref, evaluation=cfg.evaluation,
                            checker=checker_name(cfg), seed=cfg.seed)
    baseline = lin.get(0, "baseline").ref
    ArtifactStore(tmp_path).retire(baseline)
    ctx = StageContext(str(tmp_path), None, "evaluate", EVALUATE.key(inputs), cfg.device, run="testbed")
    params = dict(stage="evaluate", inputs=to_jsonable_python(inputs), ctx=ctx.to_json(),
                  orchestration=cfg.orchestration.model_dump(mode="json"))
    assert opd_stage(**params) == baseline
    with pytest.raises(ConfigError, match="the context is for evaluate/0{64}, not these inputs"):
        opd_stage(**{**params, "ctx": {**ctx.to_json(), "key": "0" * 64}})


def _lineage_shas(root: Path, run: str) -> dict[tuple[int, str], str]:
    return {(e.iteration, e.stage): e.ref.sha256 for e in RunLineage(root, run).entries()}


def test_flow_and_plain_driver_run_one_loop_with_identical_artifacts(harness, models, tmp_path: Path) -> None:
    """Two topd iterations through the Prefect flow and through the plain driver, each in its own root: every
    stage of every iteration has the same artifact sha256 (manifest, hence key, content and meta)."""
    from flows.distill import distill
    from opd_tasks.pipeline import run_plain

    extra = ("method=topd", "analysis.probe_tokens=3", "analysis.delta_mode=quantile", "analysis.delta=0.5")
    out = distill(_cfg(models, tmp_path / "flow", *extra).model_dump(mode="json"))
    plain = run_plain(_cfg(models, tmp_path / "plain", *extra), log=lambda m: None, progress=False)
    flow_shas, plain_shas = _lineage_shas(tmp_path / "flow", "testbed"), _lineage_shas(tmp_path / "plain", "testbed")
    assert {s for _, s in flow_shas} == {"eval_prompts", "baseline", "prompts", "rollout", "score", "gates",
                                         "analyze", "update", "evaluate"}
    assert {i for i, _ in flow_shas} == {0, 1}
    assert flow_shas == plain_shas
    assert [it["accuracy"] for it in out["iterations"]] == [it.accuracy for it in plain.iterations]
    assert out["iterations"][1]["analysis"] == plain.iterations[1].analysis


def test_plain_driver_fault_refresh_and_resume(models, tmp_path: Path) -> None:
    """The plain driver honours fault.*, --refresh and resume like the flow (no retries: a rerun recovers)."""
    from opd_tasks.pipeline import run_plain

    quiet = dict(log=lambda m: None, progress=False)
    clean = run_plain(_cfg(models, tmp_path / "clean"), **quiet)
    faulty = _cfg(models, tmp_path / "f", "fault.stage=update", "fault.iteration=1")
    with pytest.raises(TransientError, match="injected fault: stage 'update' at iteration 1"):
        run_plain(faulty, **quiet)
    rerun = run_plain(faulty, **quiet)
    computed = [(it.iteration, s) for it in rerun.iterations for s, r in it.stages.items() if not r.cached]
    assert computed == [(1, "update"), (1, "evaluate")]
    assert _lineage_shas(tmp_path / "f", "testbed") == _lineage_shas(tmp_path / "clean", "testbed")
    assert [it.accuracy for it in rerun.iterations] == [it.accuracy for it in clean.iterations]

    refreshed = run_plain(_cfg(models, tmp_path / "clean"), refresh=["score"], **quiet)
    assert {s: r.cached for s, r in refreshed.iterations[0].stages.items()} == {
        "prompts": True, "rollout": True, "score": False, "gates": True, "update": True, "evaluate": True}
    assert len(list((tmp_path / "clean" / "retired" / "score").iterdir())) == 2  # one per iteration
    with pytest.raises(ConfigError, match=r"--refresh: unknown stage\(s\) \['scores'\]; stages are prompts, rollout"):
        run_plain(_cfg(models, tmp_path / "clean"), refresh=["scores"], **quiet)

    resumed = run_plain(_cfg(models, tmp_path / "clean", "iterations=1"), resume=True, **quiet)
    assert [it.iteration for it in resumed.iterations] == [2]
    lin = RunLineage(tmp_path / "clean", "testbed")
    assert lin.get(2, "prompts").ref.sha256 not in {lin.get(i, "prompts").ref.sha256 for i in (0, 1)}


def test_baseline_methods_run_through_the_loop(models, tmp_path: Path) -> None:
    """opd_matched samples compute_factor x the rollouts per prompt (its own rollouts, no analysis); opd_return
    shares OPD's rollouts and scores and trains with the discounted return (a different checkpoint)."""
    from opd_tasks.pipeline import run_plain

    quiet = dict(log=lambda m: None, progress=False)
    cfg = ("iterations=1", "rollout.samples_per_prompt=2", "baselines.compute_factor=2")
    opd = run_plain(_cfg(models, tmp_path, *cfg, "name=a", "method=opd"), **quiet)
    matched = run_plain(_cfg(models, tmp_path, *cfg, "name=b", "method=opd_matched"), **quiet)
    ret = run_plain(_cfg(models, tmp_path, *cfg, "name=c", "method=opd_return"), **quiet)
    store = ArtifactStore(tmp_path)
    rows = {name: store.read_table(run.iterations[0].stages["rollout"].ref, "rollouts").num_rows
            for name, run in (("opd", opd), ("matched", matched), ("return", ret))}
    assert rows == {"opd": 8, "matched": 16, "return": 8}  # 4 prompts
    assert "analyze" not in matched.iterations[0].stages and "analyze" not in ret.iterations[0].stages
    assert ret.iterations[0].stages["rollout"].cached and ret.iterations[0].stages["score"].cached
    assert ret.iterations[0].checkpoint.sha256 != opd.iterations[0].checkpoint.sha256


@pytest.mark.parametrize("stage", ["prompts", "rollout", "score", "gates", "analyze", "update", "evaluate"])
def test_disk_full_in_any_stage_stops_cleanly_and_a_rerun_recovers(models, tmp_path: Path, monkeypatch,
                                                                    stage: str) -> None:
    """The disk fills while `stage` publishes (the fsync of its files fails with ENOSPC): the run stops with a
    DiskFullError naming the file, not retried; nothing of that stage is published, the lineage of what finished
    stays; with room again, a rerun computes the rest and `verify` is clean."""
    import errno
    import os

    from opd_tasks.pipeline import run_plain
    from storage.errors import DiskFullError

    cfg = _cfg(models, tmp_path, "iterations=1", "method=topd", "analysis.probe_tokens=3")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if f"/artifacts/{stage}/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError, match=f"disk full while writing .*/artifacts/{stage}/") as info:
        run_plain(cfg, log=lambda m: None, progress=False)
    assert not info.value.retryable
    store = ArtifactStore(tmp_path)
    assert not [r for r in store.iter_artifacts() if r.stage == stage]
    assert not list((tmp_path / "artifacts" / stage).glob(".tmp-*"))  # the temp dir went with the error
    monkeypatch.setattr(os, "fsync", real_fsync)
    out = run_plain(cfg, log=lambda m: None, progress=False)
    assert stage in {s for s, r in out.iterations[0].stages.items() if not r.cached}
    for e in RunLineage(tmp_path, "testbed").entries():
        store.verify(e.ref)


def test_gpu_stages_carry_the_concurrency_tag_only_when_a_limit_exists(harness, models, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """A tagged task run asks the API for a slot of its tag even with no limit on it (flows/executors.py): the tag
    goes on GPU stages only when `prefect concurrency-limit create gpu N` made one, and then it caps them."""
    from prefect.client.orchestration import get_client

    import flows.executors
    from flows.distill import distill

    monkeypatch.setattr(flows.executors, "TAG_CHECK_SECONDS", 0.0)  # no cached answer between the two runs

    def tags() -> dict[str, list[str]]:  # by stage (task runs are named `<stage>-it<i>`)
        return {r.name.rsplit("-", 1)[0]: sorted(r.tags) for r in _latest_flow_run_task_runs()}

    distill(_cfg(models, tmp_path / "a", "iterations=1", "name=untagged").model_dump(mode="json"))
    untagged = tags()
    assert set(untagged) >= {"rollout", "score", "update"} and not any(untagged.values()), untagged
    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="gpu", concurrency_limit=4)
    try:
        distill(_cfg(models, tmp_path / "b", "iterations=1", "name=tagged").model_dump(mode="json"))
        by_stage = tags()
        assert all(by_stage[s] == ["gpu"] for s in ("rollout", "score", "update", "evaluate")), by_stage
        assert by_stage["prompts"] == []  # not a GPU stage
    finally:
        with get_client(sync_client=True) as client:
            client.delete_concurrency_limit_by_tag("gpu")


def test_sharded_stages_run_as_task_runs_in_processes_and_a_failed_shard_is_retried_alone(harness, models,
                                                                                        tmp_path: Path) -> None:
    """orchestration.shards=2: each shard of rollout, score, analyze and evaluate is its own task run in a process
    pool; shard 1 of score fails once and is retried alone; every artifact equals an unsharded plain run's."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.distill import distill
    from opd_tasks.pipeline import run_plain
    from opd_tasks.stages import sharded_stages

    small = ("iterations=1", "rollout.batch_size=4", "scoring.batch_size=4", "evaluation.batch_size=3",
             "method=topd", "analysis.batch_size=4")
    run_plain(_cfg(models, tmp_path / "plain", *small), log=lambda m: None, progress=False)
    cfg = _cfg(models, tmp_path / "flow", *small, "orchestration.shards=2", "orchestration.retries=1",
               "fault.stage=score", "fault.shard=1", "fault.iteration=0")
    distill(cfg.model_dump(mode="json"))
    assert _lineage_shas(tmp_path / "flow", "testbed") == _lineage_shas(tmp_path / "plain", "testbed")
    assert (tmp_path / "flow" / "faults" / "testbed.score.it0.shard1").exists()
    with get_client(sync_client=True) as client:
        runs = {r.name: r for r in client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(
            any_=[f"{s}-it0-shard{i}" for s in sharded_stages() for i in (0, 1)])))
            if r.flow_run_id is not None}
    assert set(runs) == {f"{s}-it0-shard{i}" for s in sharded_stages() for i in (0, 1)}
    assert all(r.state.is_completed() for r in runs.values())
    assert runs["score-it0-shard1"].run_count == 2 and runs["score-it0-shard0"].run_count == 1  # retried alone


def test_the_flow_reaches_a_stage_compute_in_four_calls(harness, models, tmp_path: Path, monkeypatch) -> None:
    """Under Prefect the project's path is the plain driver's: run_iteration -> StageRunner.__call__ ->
    PrefectExecutor.run -> run_stage (the task; Prefect's engine frames between are not ours) -> the compute."""
    import opd_tasks.stages.gates as gates
    from flows.distill import distill
    from tests.unit.test_stage_path import project_path_to_here

    seen, real = [], gates.gates

    def traced(ctx, x):
        seen.append(project_path_to_here())
        return real(ctx, x)

    monkeypatch.setattr(gates, "gates", traced)
    distill(_cfg(models, tmp_path, "iterations=1").model_dump(mode="json"))
    assert seen == [["run_iteration", "__call__", "run", "run_stage"]]
