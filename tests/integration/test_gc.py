"""`opd gc` on real runs (plain driver, tiny models): what goes, what stays, the bytes, a dry run, a crash halfway,
live runs, and a rerun that recomputes what gc removed (issue 20, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from opd_tasks.config_files import load_config
from opd_tasks.errors import ConfigError
from opd_tasks.pipeline import run_plain
from storage import gc
from storage.lineage import RunLineage
from storage.store import ArtifactStore
from storage.views import connect
from tests.helpers import tiny_model_dir

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
OPTIMIZER = "state/optimizer.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("models")
    return tiny_model_dir(base / "student", seed=0)[0], tiny_model_dir(base / "teacher", seed=1, hidden=48)[0]


def _run(models, root: Path, name: str = "a", iterations: int = 3):
    s, t = models
    cfg = load_config(None, [f"models.student.path={s}", f"models.teacher.path={t}", f"root={root}", f"name={name}",
                             f"iterations={iterations}", "data.prompts_per_iteration=4", "rollout.samples_per_prompt=2",
                             "rollout.max_new_tokens=6", "evaluation.max_new_tokens=6", "data.eval_size=4",
                             "method=opd", "gates.max_truncated=null", "gates.min_topk_coverage=null",
                             "gates.min_headroom=null"])
    return run_plain(cfg, log=lambda m: None, progress=False)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _ckpt(root: Path, run: str, it: int):
    return RunLineage(root, run).get(it, "update").ref


def test_gc_prunes_old_checkpoints_keeps_logs_and_a_rerun_recomputes(models, tmp_path: Path) -> None:
    _run(models, tmp_path)
    shas = {(e.iteration, e.stage): e.ref.sha256 for e in RunLineage(tmp_path, "a").entries()}
    store = ArtifactStore(tmp_path)
    orphan = store.put_table("analyze", "ee" * 32, "updates", store.read_table(_ckpt(tmp_path, "a", 0), "updates"))
    before = _tree(tmp_path)

    dry = runner.invoke(app, ["gc", "--keep-last", "2", "--dry-run", "--root", str(tmp_path)])
    assert dry.exit_code == 0, dry.output
    assert _tree(tmp_path) == before  # a dry run changes nothing
    todo = gc.plan(store, 2, "update", (OPTIMIZER,))
    by = {(r.what, r.target): r for r in todo}
    it0, it1, it2 = (_ckpt(tmp_path, "a", i) for i in range(3))
    assert set(by) == {("checkpoint files", f"update/{it0.key}"), ("optimizer state", f"update/{it1.key}"),
                       ("unreferenced artifact", f"analyze/{orphan.key}")}
    assert by[("optimizer state", f"update/{it1.key}")].paths == (OPTIMIZER,)
    tables = tuple(f"{t}/" for t in store.manifest(it0)["tables"])  # updates/, old_logprobs/: kept, logs
    assert tables and all(not p.startswith(tables) for p in by[("checkpoint files", f"update/{it0.key}")].paths)
    manifest0 = {e["path"]: e["bytes"] for e in store.manifest(it0)["files"]}
    assert by[("checkpoint files", f"update/{it0.key}")].bytes == sum(
        b for p, b in manifest0.items() if not p.startswith(tables))
    assert f"would free {sum(r.bytes for r in todo) / 1e6:.1f} MB" in dry.output

    done = runner.invoke(app, ["gc", "--keep-last", "2", "--root", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert f"freed {sum(r.bytes for r in todo) / 1e6:.1f} MB" in done.output
    assert not (store.path_of(it0) / "model").exists() and not (store.path_of(it1) / OPTIMIZER).exists()
    assert (store.path_of(it2) / OPTIMIZER).is_file() and not store.path_of(orphan).exists()
    assert runner.invoke(app, ["verify", "--root", str(tmp_path)]).exit_code == 0
    # The training log of every iteration stays queryable.
    assert connect(tmp_path).sql("SELECT count(DISTINCT iteration) FROM updates").fetchall() == [(3,)]
    assert gc.plan(store, 2, "update", (OPTIMIZER,)) == []  # nothing more to do

    # A rerun recomputes the pruned checkpoint (the loop needs its weights) byte-identically; nothing else changes.
    again = _run(models, tmp_path)
    assert {(e.iteration, e.stage): e.ref.sha256 for e in RunLineage(tmp_path, "a").entries()} == shas
    assert not again.iterations[0].stages["update"].cached and again.iterations[1].stages["update"].cached
    assert store.pruned(_ckpt(tmp_path, "a", 0)) == {}
    assert runner.invoke(app, ["verify", "--root", str(tmp_path)]).exit_code == 0


def test_keep_marks_and_retired_and_shared_checkpoints(models, tmp_path: Path) -> None:
    _run(models, tmp_path)
    _run(models, tmp_path, name="b", iterations=1)  # same config: its iteration 0 is a's (shared artifacts)
    store = ArtifactStore(tmp_path)
    it0 = _ckpt(tmp_path, "a", 0)
    assert _ckpt(tmp_path, "b", 0) == it0
    store.retire(store.lookup("score", RunLineage(tmp_path, "a").get(1, "score").ref.key))
    r = runner.invoke(app, ["gc", "--keep-last", "1", "--keep", "a:1", "--root", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert RunLineage(tmp_path, "a").info()["keep_checkpoints"] == [1]
    assert store.pruned(it0) == {}  # run b's latest: kept whole
    assert store.pruned(_ckpt(tmp_path, "a", 1)) == {OPTIMIZER: "optimizer state of a kept checkpoint that is no "
                                                                "run's latest"}
    assert not [f for f in (tmp_path / "retired").rglob("*") if f.is_file()]  # the retired score went
    bad = runner.invoke(app, ["gc", "--keep", "nope:1", "--root", str(tmp_path)])
    assert bad.exit_code == 2 and "--keep 'nope:1'" in bad.output


def test_a_crash_halfway_leaves_a_consistent_store(models, tmp_path: Path, monkeypatch) -> None:
    _run(models, tmp_path)
    store = ArtifactStore(tmp_path)
    todo = gc.plan(store, 1, "update", (OPTIMIZER,))
    assert len(todo) == 2
    real = store.prune
    calls = []

    def prune_then_die(ref, paths, why):
        calls.append(ref)
        if len(calls) == 2:  # the record of the second is written, then the process "dies" mid-deletion
            from storage.hashing import canonical_json
            from storage.layout import atomic_write

            atomic_write(store.layout.pruned_record(ref.stage, ref.key), canonical_json({p: why for p in paths}))
            (store.path_of(ref) / paths[0]).unlink()
            raise KeyboardInterrupt
        return real(ref, paths, why)

    monkeypatch.setattr(store, "prune", prune_then_die)
    with pytest.raises(KeyboardInterrupt):
        gc.execute(store, todo)
    assert runner.invoke(app, ["verify", "--root", str(tmp_path)]).exit_code == 0
    monkeypatch.undo()
    assert runner.invoke(app, ["gc", "--keep-last", "1", "--root", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["verify", "--root", str(tmp_path)]).exit_code == 0
    again = _run(models, tmp_path)  # recomputes the two pruned checkpoints, in order
    assert [it.stages["update"].cached for it in again.iterations] == [False, False, True]


def test_gc_waits_for_live_runs_and_runs_wait_for_gc(models, tmp_path: Path) -> None:
    _run(models, tmp_path, iterations=2)
    code = ("import sys, time\nfrom storage.lineage import run_lock\n"
            "with run_lock(sys.argv[1], ['a']):\n    print('held', flush=True)\n    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(tmp_path)
        r = runner.invoke(app, ["gc", "--keep-last", "1", "--root", str(tmp_path)])
        assert r.exit_code == 2 and "run(s) a are running" in r.output, r.output
        assert _tree(tmp_path) == before
        assert runner.invoke(app, ["gc", "--dry-run", "--keep-last", "1", "--root", str(tmp_path)]).exit_code == 0
    finally:
        holder.kill()
        holder.wait()
    with gc.exclusive(tmp_path):
        before = _tree(tmp_path)
        with pytest.raises(ConfigError, match="opd gc is running"):
            _run(models, tmp_path, iterations=2)
        assert _tree(tmp_path) == before  # the refused run wrote nothing


def test_gc_reclaims_the_temps_of_dead_writers_only(tmp_path: Path) -> None:
    """A killed writer's temp directory (an artifact's, a model import's) goes; a live writer's, another host's and
    one of an unknown shape stay; the published artifact they sit beside is untouched."""
    from storage.layout import HOST, TMP_PREFIX
    from tests.helpers import updates_table

    store = ArtifactStore(tmp_path)
    ref = store.put_table("update", "ab" * 32, "updates", updates_table(2))
    RunLineage(tmp_path, "a").record(0, "update", ref)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sdir = store.layout.stage_dir("update")
    temps = {
        "artifact": sdir / f"{TMP_PREFIX}{'cd' * 32}-{HOST}-{dead.pid}-aaaa1111",
        "import": tmp_path / f"{TMP_PREFIX}import-{HOST}-{dead.pid}-bbbb2222",
        "staged model": tmp_path / "models" / f"{TMP_PREFIX}smollm2-135m-instruct-{HOST}-{dead.pid}-cccc3333",
        "live": sdir / f"{TMP_PREFIX}{'ef' * 32}-{HOST}-{os.getppid()}-eeee5555",  # pytest's parent runs
        "other host": sdir / f"{TMP_PREFIX}{'cd' * 32}-elsewhere-{dead.pid}-dddd4444",
        "unknown shape": tmp_path / f"{TMP_PREFIX}import-x1y2z3",
    }
    for d in temps.values():
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(b"\0" * 1000)
    r = runner.invoke(app, ["gc", "--dry-run", "--root", str(tmp_path)])
    assert r.exit_code == 0 and r.output.count("temp of a dead writer") == 3, r.output
    assert all(d.exists() for d in temps.values())
    r = runner.invoke(app, ["gc", "--root", str(tmp_path)])
    assert r.exit_code == 0, r.output
    gone = {k for k, d in temps.items() if not d.exists()}
    assert gone == {"artifact", "import", "staged model"}, r.output
    store.verify(ref)
