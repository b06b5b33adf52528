"""Artifacts hash what determines them, not the versions of the libraries that wrote them (issue 28).

- A checkpoint keeps its student's `transformers_version` stamp, whatever transformers saves it: the same
  training under two installed versions publishes one sha256.
- A manifest's `provenance` (library versions, device) is recorded but not hashed.
- A cache hit made under another minor version of torch or transformers is reused with one warning naming both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import transformers.configuration_utils as config_utils
import transformers.generation.configuration_utils as generation_utils

import opd_tasks.stages.registry as registry
from opd_tasks.config import UpdateConfig
from opd_tasks.config_files import load_config
from opd_tasks.pipeline import LocalExecutor, StageRunner, eval_prompts_inputs, resolve_models
from opd_tasks.provenance import drift, library_versions, provenance
from opd_tasks.stages import PROMPTS, UPDATE, UpdateInputs
from opd_tasks.training.checkpoint import keep_source_version_stamps
from storage.hashing import sha256_bytes
from storage.layout import MANIFEST
from storage.lineage import RunLineage
from storage.store import ArtifactStore, manifest_sha256
from tests.helpers import scored_env


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    return scored_env(tmp_path_factory.mktemp("stamps"), prompts=4, samples=2, max_new_tokens=8, top_k=4)


def _train_under(env, root: Path, stamp: str, monkeypatch: pytest.MonkeyPatch, recorded: dict):
    """The update stage in a copy of the env's store, with transformers reporting version `stamp` to
    save_pretrained and `recorded` as the provenance the manifest records."""
    shutil.copytree(env["store"].root, root)
    store = ArtifactStore(root)
    monkeypatch.setattr(config_utils, "__version__", stamp)
    monkeypatch.setattr(generation_utils, "__version__", stamp)
    monkeypatch.setattr(registry, "provenance", lambda device: recorded)
    x = UpdateInputs(student=env["student"], rollouts=env["roll"], scores=env["scores"], analysis=None,
                     teacher=env["teacher"], update=UpdateConfig(micro_batch_size=4), bridge=None, seed=0)
    ref = UPDATE(store, x, progress=False)
    return store, ref


def test_the_same_training_under_two_transformers_versions_publishes_one_sha256(env, tmp_path, monkeypatch) -> None:
    student_stamp = json.loads((env["student"].dir / "config.json").read_text())["transformers_version"]
    a_prov = {"python": "3.11.7", "torch": "2.13.0", "transformers": "5.24.0", "device": "cpu (AVX512, 2 threads)"}
    b_prov = {**a_prov, "transformers": "5.25.0"}
    a_store, a = _train_under(env, tmp_path / "a", "5.24.0", monkeypatch, a_prov)
    b_store, b = _train_under(env, tmp_path / "b", "5.25.0", monkeypatch, b_prov)
    assert a.sha256 == b.sha256 and a.key == b.key
    for store, prov in ((a_store, a_prov), (b_store, b_prov)):
        model = store.checkpoint_dir(a) / "model"
        for name in ("config.json", "generation_config.json"):
            assert json.loads((model / name).read_text())["transformers_version"] == student_stamp
        assert store.manifest(a)["provenance"] == prov  # recorded as given, outside the hash
    # Without the normalisation the two saves differ exactly in that stamp: the test can fail.
    raw = tmp_path / "raw"
    monkeypatch.setattr(config_utils, "__version__", "5.99.0")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(env["student"].dir).save_pretrained(raw)
    assert json.loads((raw / "config.json").read_text())["transformers_version"] == "5.99.0"


def test_source_stamp_is_copied_or_dropped(tmp_path: Path) -> None:
    out, src = tmp_path / "out", tmp_path / "src"
    out.mkdir(), src.mkdir()
    written = {"a": 1, "transformers_version": "5.25.0", "z": [1, 2]}
    (out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    (src / "config.json").write_text(json.dumps({"transformers_version": "4.57.6"}))
    keep_source_version_stamps(out, src)  # src has no generation_config.json: its stamp is dropped
    assert (out / "config.json").read_text() == json.dumps({**written, "transformers_version": "4.57.6"}, indent=2,
                                                           sort_keys=True) + "\n"
    assert json.loads((out / "generation_config.json").read_text()) == {"a": 1, "z": [1, 2]}


def test_provenance_is_recorded_but_not_hashed(tmp_path: Path) -> None:

    store = ArtifactStore(tmp_path / "root")
    with store.writer("s", "a" * 64) as w:
        w.meta.update({"n": 1})
        w.provenance.update(provenance("cpu"))
        ref = w.commit()
    data = (store.path_of(ref) / MANIFEST).read_bytes()
    m = json.loads(data)
    assert m["provenance"]["torch"] == library_versions()["torch"] and m["provenance"]["device"].startswith("cpu (")
    assert ref.sha256 == manifest_sha256(data) != sha256_bytes(data)
    edited = dict(m, provenance={"torch": "0.0.1"})
    assert manifest_sha256(json.dumps(edited).encode()) == ref.sha256  # a label: editing it changes no hash
    assert manifest_sha256(json.dumps(dict(m, meta={"n": 2})).encode()) != ref.sha256  # the content does
    without = {k: v for k, v in m.items() if k != "provenance"}
    from storage.hashing import canonical_json

    assert manifest_sha256(canonical_json(without)) == sha256_bytes(canonical_json(without))  # old manifests keep
    assert store.lookup("s", "a" * 64) == ref  # their sha256, and a lookup still adopts this one


def test_drift_names_minor_versions_of_torch_and_transformers_only() -> None:
    here = library_versions()
    assert drift(None) == [] and drift({}) == []
    assert drift(dict(here)) == []
    patch = here["transformers"].split(".")
    same_minor = {**here, "transformers": ".".join([*patch[:2], "999"]), "pyarrow": "1.0.0"}
    assert drift(same_minor) == []  # a patch release and other libraries: no warning
    assert drift({**here, "torch": "2.1.0"}) == [("torch", "2.1.0", here["torch"])]


def test_a_cache_hit_from_another_minor_version_is_reused_with_one_warning(tmp_path, monkeypatch) -> None:
    cfg = load_config(None, [f"root={tmp_path / 'root'}", "name=r", "data.eval_size=4"])
    store = ArtifactStore(cfg.resolved_root())
    old = {**library_versions(), "torch": "2.12.1"}
    monkeypatch.setattr(registry, "provenance", lambda device: old)
    x = eval_prompts_inputs(cfg, resolve_models(cfg))
    made = PROMPTS(store, x)
    monkeypatch.undo()
    logs: list[str] = []
    runner = StageRunner(store, RunLineage(store.layout, "r"), cfg, LocalExecutor(), log=logs.append, progress=False)
    for it in range(2):
        assert runner(PROMPTS, x, iteration=it) == made and runner.records[-1].cached
    warnings = [m for m in logs if m.startswith("warning:")]
    assert len(warnings) == 1, logs
    assert "torch 2.12.1" in warnings[0] and f"torch {library_versions()['torch']}" in warnings[0]
    assert "--refresh prompts" in warnings[0]
