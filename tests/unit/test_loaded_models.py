"""Models and tokenizers loaded once per process (opd_tasks/backends/loaded.py): the cache's keys, its capacity and
eviction, what it hands out, and that a run with it writes the same artifacts as a run without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd_tasks.backends import loaded
from opd_tasks.backends.loaded import LoadedModels
from opd_tasks.config_files import load_config
from opd_tasks.errors import ConfigError
from opd_tasks.models import ModelSpec
from storage.hashing import sha256_tree
from tests.helpers import tiny_model_dir

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def specs(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, ModelSpec]:
    base = tmp_path_factory.mktemp("models")
    s, _ = tiny_model_dir(base / "student", seed=0, hidden=32)
    t, _ = tiny_model_dir(base / "teacher", seed=1, hidden=48)
    return (ModelSpec(path=str(s), sha256=sha256_tree(s)), ModelSpec(path=str(t), sha256=sha256_tree(t)))


def test_a_model_is_loaded_once_and_handed_out_for_inference(specs) -> None:
    cache, (student, _) = LoadedModels(), specs
    first = cache.model(student, CPU)
    assert cache.model(student, CPU) is first and (cache.loads, cache.hits) == (1, 1)
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    # Same files elsewhere: the same model (the key is the content, not the path).
    assert cache.model(student.model_copy(update={"path": "/elsewhere"}), CPU) is first
    # Another dtype is another model.
    half = cache.model(student.model_copy(update={"dtype": "bfloat16"}), CPU)
    assert half is not first and next(half.parameters()).dtype == torch.bfloat16 and cache.loads == 2


def test_least_recently_used_is_dropped_and_zero_keeps_nothing(specs, monkeypatch) -> None:
    student, teacher = specs
    monkeypatch.setenv("OPD_MODELS_IN_MEMORY", "1")
    cache = LoadedModels()
    cache.model(student, CPU)
    cache.model(teacher, CPU)  # drops the student
    cache.model(teacher, CPU)
    cache.model(student, CPU)
    assert (cache.loads, cache.hits) == (3, 1)
    monkeypatch.setenv("OPD_MODELS_IN_MEMORY", "0")
    cache = LoadedModels()
    assert cache.model(student, CPU) is not cache.model(student, CPU) and cache.loads == 2
    cache.release()


@pytest.mark.parametrize("raw", ["two", "-1", "1.5"])
def test_a_bad_capacity_names_the_variable(monkeypatch, raw: str) -> None:
    monkeypatch.setenv("OPD_MODELS_IN_MEMORY", raw)
    with pytest.raises(ConfigError, match=rf"OPD_MODELS_IN_MEMORY='{raw}': expected a whole number"):
        loaded.capacity()


def test_tokenizers_are_kept_by_content(specs) -> None:
    cache, (student, teacher) = LoadedModels(), specs
    tok = cache.tokenizer(student)
    assert cache.tokenizer(student) is tok and cache.tokenizer(teacher) is not tok
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


def _run(specs, root: Path, monkeypatch, keep: str) -> tuple[dict, LoadedModels]:
    from opd_tasks.pipeline import run_plain

    monkeypatch.setenv("OPD_MODELS_IN_MEMORY", keep)
    cache = LoadedModels()
    monkeypatch.setattr(loaded, "LOADED", cache)
    s, t = specs
    cfg = load_config(None, [f"models.student.path={s.path}", f"models.teacher.path={t.path}", f"root={root}",
                             "iterations=2", "data.prompts_per_iteration=4", "rollout.samples_per_prompt=2",
                             "rollout.max_new_tokens=6", "evaluation.max_new_tokens=6", "data.eval_size=6",
                             "method=topd", "gates.max_truncated=null", "gates.min_topk_coverage=null",
                             "gates.min_headroom=null"])
    out = run_plain(cfg, log=lambda m: None, progress=False).summary()
    return {(it["iteration"], r["stage"]): r["sha256"] for it in out["iterations"] for r in it["stages"]}, cache


def test_a_run_loads_each_model_once_and_writes_what_an_uncached_run_writes(specs, tmp_path, monkeypatch) -> None:
    cached, cache = _run(specs, tmp_path / "cached", monkeypatch, "2")
    uncached, no_cache = _run(specs, tmp_path / "uncached", monkeypatch, "0")
    assert cached == uncached  # byte-identical artifacts, stage by stage
    # Four models for inference in two iterations (the teacher, S0, S1 and S2): with the cache each is loaded once;
    # without it, once per stage that reads it.
    assert (cache.loads, no_cache.loads) == (4, 4 + cache.hits) and cache.hits >= 6, (cache.loads, cache.hits)
