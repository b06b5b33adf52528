"""Bad inputs (issue 18, item 7 and part of item 8): each is a specific, non-retried error naming the file or key
and what to do, never a traceback from deep in a library or a retry of a permanent error.

Models are copies of the committed testbed student, damaged; datasets are small files written here."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from opd_tasks.config import ConfigError, ModelRef
from opd_tasks.config_files import load_config
from opd_tasks.data import MAX_LINE_BYTES, datasets_cache_dir, load_prompts
from opd_tasks.errors import DataError, ModelError
from opd_tasks.models import TESTBED_ASSETS, ModelSpec, load_model, load_tokenizer, spec_of
from opd_tasks.testbed.tokenizer import build_tokenizer
from storage.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def student(tmp_path: Path) -> Path:
    """A copy of the testbed student, ours to damage."""
    return Path(shutil.copytree(TESTBED_ASSETS / "student", tmp_path / "student"))


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _model_error(ref: ModelRef, *patterns: str, load: bool = False) -> ModelError:
    """The ModelError of spec_of (what a run does first), and of loading when `load`; each message matches."""
    calls = [spec_of] + ([load_model] if load else [])
    for call in calls:
        with pytest.raises(ModelError) as info:
            call(ref)
        for p in patterns:
            assert p in str(info.value), (call.__name__, str(info.value))
    assert not info.value.retryable
    return info.value


# ------------------------------------------------------------------------------------------------- models


def test_model_dir_without_config_json(student: Path) -> None:
    (student / "config.json").unlink()
    _model_error(ModelRef(path=str(student)), str(student), "has no config.json")


def test_truncated_safetensors(student: Path) -> None:
    weights = student / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _model_error(ModelRef(path=str(student)), str(weights), "truncated or corrupt", load=True)


def test_corrupt_safetensors_header(student: Path) -> None:
    (student / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    _model_error(ModelRef(path=str(student)), str(student / "model.safetensors"), load=True)


@pytest.mark.parametrize(("content", "what"), [(b"\xff\xfe{}", "is not UTF-8"), (b'{"version": ', "is not valid JSON")])
def test_tokenizer_file_not_utf8_or_not_json(student: Path, content: bytes, what: str) -> None:
    bad = student / "tokenizer.json"
    bad.write_bytes(content)
    _model_error(ModelRef(path=str(student)), str(bad), what)
    with pytest.raises(ModelError, match=f"{bad}.*{what}"):
        load_tokenizer(ModelRef(path=str(student)))


def test_config_json_not_json(student: Path) -> None:
    (student / "config.json").write_text('{"model_type": ')
    _model_error(ModelRef(path=str(student)), str(student / "config.json"), "is not valid JSON", load=True)


def test_missing_shard_of_an_index(student: Path) -> None:
    index = student / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    _model_error(ModelRef(path=str(student)), str(index), "model-00002-of-00002.safetensors")


def test_model_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    _model_error(ModelRef(path=str(tmp_path / "weights.bin")), "is a file", "must be a model directory")


@pytest.mark.parametrize("path", ["student", "./student", "models/v1/student", "~/no-such-model-dir-xyz"])
def test_missing_relative_model_path_is_never_a_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       path: str) -> None:
    """A path that is not `org/name` and not a directory names the absolute path looked at; the hub is not asked."""
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError(f"{path!r} was sent to the hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    where = str(Path(path).expanduser().absolute())
    _model_error(ModelRef(path=path), f"model directory {where} does not exist", "models.*.path")


def test_org_name_is_a_hub_id_and_its_failure_names_the_local_path(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`mymodels/student` with no such directory is tried on the hub (offline in tests: HF_HUB_OFFLINE=1); the error
    says both what was looked at locally and that the hub did not have it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _model_error(ModelRef(path="mymodels/student"), f"not a local directory (looked at {tmp_path}/mymodels/student)",
                 "and not fetchable from the hub")


def test_relative_model_dir_that_exists_is_local(student: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(student.parent)
    assert spec_of(ModelRef(path="student")).sha256 == spec_of(ModelRef(path=str(student))).sha256


def test_a_model_with_its_own_code_needs_trust_remote_code(student: Path) -> None:
    """A config.json or tokenizer_config.json with an auto_map is refused with the flag off, naming the flag, before
    transformers can load the files as a built-in class; with the flag on it resolves, and its key differs from the
    same files' without it (a cache hit made without the code is not served to a run with it)."""
    from opd_tasks.config import RolloutConfig
    from opd_tasks.stages.inputs import RolloutInputs
    from storage.keys import cache_key
    from storage.refs import ArtifactRef

    clean = spec_of(ModelRef(path=str(student)))
    for name in ("config.json", "tokenizer_config.json"):
        f = student / name
        original = f.read_text()
        f.write_text(json.dumps({**json.loads(original), "auto_map": {"AutoModelForCausalLM": "mine.Model"}}))
        _model_error(ModelRef(path=str(student)), str(f), "set trust_remote_code: true", load=True)
        with pytest.raises(ModelError, match="trust_remote_code"):
            load_tokenizer(ModelRef(path=str(student)))
        trusted = spec_of(ModelRef(path=str(student), trust_remote_code=True))
        assert trusted.trust_remote_code and trusted.key_hash != trusted.sha256
        f.write_text(original)
    assert clean.key_hash == clean.sha256  # off: the key is the files' hash, as before
    prompts = ArtifactRef(uri="artifacts/prompts/x", stage="prompts", key="b" * 64, sha256="c" * 64, rows=1,
                          bytes=1, schema_name="prompts", schema_version=1)
    keys = {flag: cache_key("rollout", 1, *RolloutInputs(
        student=clean.model_copy(update={"trust_remote_code": flag}), prompts=prompts, rollout=RolloutConfig(),
        checker="gsm8k", seed=0).key_parts()) for flag in (False, True)}
    assert keys[False] != keys[True]


def test_from_checkpoint_keeps_trust_remote_code_and_dtype(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "root")
    with store.writer("update", "ab" * 32) as w:
        shutil.copytree(TESTBED_ASSETS / "student", w.path / "model")
        ref = w.commit()
    parent = ModelSpec(path="/x", sha256="0" * 64, trust_remote_code=True, dtype="bfloat16")
    spec = ModelSpec.from_checkpoint(store, ref, parent)
    assert (spec.trust_remote_code, spec.dtype, spec.checkpoint) == (True, "bfloat16", ref)
    assert (spec.dir / "config.json").is_file()
    plain = ModelSpec.from_checkpoint(store, ref)
    assert (plain.trust_remote_code, plain.dtype) == (False, "auto")


# ------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("override", ["analysis.delta=.inf", "analysis.high_loss_threshold=-.inf",
                                      "orchestration.retry_delay_seconds=inf", "update.weight_decay=.inf",
                                      "topd.bridge_weight=.nan", "update.learning_rate=nan",
                                      "gates.max_logprob_drift=.inf"])
def test_non_finite_floats_are_refused_naming_the_key(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}: Input should be a finite number"):
        load_config(None, [override])


def test_non_finite_float_in_a_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("analysis:\n  delta: .nan\n")
    with pytest.raises(ConfigError, match=rf"{f}[\s\S]*analysis[.]delta: Input should be a finite number"):
        load_config(f)


def test_config_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a directory, expected a YAML file"):
        load_config(tmp_path)


def test_config_file_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"config file {f} is not UTF-8 \\(byte 9"):
        load_config(f)


# --------------------------------------------------------------------------------------------------- data


def _ds(path: Path, **kw):
    from opd_tasks.config import DataConfig

    return DataConfig(source="dataset", path=str(path), eval_size=1, **kw)


@pytest.mark.parametrize(("name", "text"), [("d.jsonl", '{"question": "1+1?", "answer": "2"}\n'
                                                        '{"question": "caf\xe9 2+2?", "answer": "4"}\n'),
                                            ("d.csv", "question,answer\n1+1?,2\ncaf\xe9 2+2?,4\n")])
def test_dataset_not_utf8_names_file_offset_and_line(tok, tmp_path: Path, name: str, text: str) -> None:
    f = tmp_path / name
    f.write_bytes(text.encode("latin-1"))
    at, line = text.index("\xe9"), text[: text.index("\xe9")].count("\n") + 1
    with pytest.raises(DataError, match=f"{f} is not UTF-8: byte offset {at} \\(line {line}\\)"):
        load_prompts(_ds(f), tok, "train", None, seed=0)


def test_not_utf8_far_into_a_long_json_line(tok, tmp_path: Path) -> None:
    """A .json document may be one long line: it is read in pieces, the offset still exact."""
    body = b'[{"question": "' + b"1" * (MAX_LINE_BYTES + 100) + b'\xe9", "answer": "2"}]'
    (f := tmp_path / "d.json").write_bytes(body)
    with pytest.raises(DataError, match=f"byte offset {body.index(bytes([0xE9]))} \\(line 1\\)"):
        load_prompts(_ds(f), tok, "train", None, seed=0)


def test_huge_line_is_refused_before_loading(tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def no_load(*a, **k):
        raise AssertionError("datasets.load_dataset was called")

    monkeypatch.setattr(datasets, "load_dataset", no_load)
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "1+1?", "answer": "2"}\n' + json.dumps({"question": "x" * MAX_LINE_BYTES,
                                                                         "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=f"{f}: line 2 is longer than {MAX_LINE_BYTES} bytes"):
        load_prompts(_ds(f), tok, "train", None, seed=0)


def test_rows_without_reference_answer_are_excluded_and_counted(tok, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "d.jsonl"
    rows = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": None}, {"question": "3+3?"},
            {"question": "4+4?", "answer": "  "}, {"question": "5+5?", "answer": "10"}, {"question": "6+6?",
                                                                                        "answer": "12"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="opd_tasks.data"):
        train = load_prompts(_ds(f), tok, "train", None, seed=0)
        held_out = load_prompts(_ds(f), tok, "eval", None, seed=0)
    records = train + held_out
    assert len(records) == 3 and all(r.answer for r in records)
    assert "3 of 6 rows have no reference answer in column 'answer'" in caplog.text and "excluded" in caplog.text


def test_all_reference_answers_missing_is_refused(tok, tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "1+1?"}\n{"question": "2+2?", "answer": ""}\n')
    with pytest.raises(DataError, match=f"{f}: no row has a reference answer in column 'answer'.*refused"):
        load_prompts(_ds(f), tok, "train", None, seed=0)


# -------------------------------------------------------------------------------------------- caches


def test_datasets_cache_follows_the_user_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_DATASETS_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert datasets_cache_dir(tmp_path) == tmp_path / "cache" / "datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "mine"))
    assert datasets_cache_dir(tmp_path) is None


_PROMPTS_STAGE = """
import sys
from pathlib import Path
from opd_tasks.config import DataConfig, ModelRef
from opd_tasks.models import spec_of
from opd_tasks.stages import PROMPTS, PromptsInputs
from storage.store import ArtifactStore

data = DataConfig(source="dataset", path=sys.argv[1], eval_size=1)
inputs = PromptsInputs(data=data, tokenizer=spec_of(ModelRef(path="testbed:student")), split="train", n=2,
                       offset=0, max_context=None, seed=0)
store = ArtifactStore(Path(sys.argv[2]))
print(store.read_table(PROMPTS(store, inputs), "prompts").num_rows)
"""


def test_prompts_stage_caches_datasets_under_the_root_not_home(tmp_path: Path) -> None:
    """A fresh process (datasets reads its cache location at import) with HOME pointing at an empty dir."""
    home, root, f = tmp_path / "home", tmp_path / "root", tmp_path / "d.jsonl"
    home.mkdir()
    f.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HOME", "HF_DATASETS_CACHE", "XDG_CACHE_HOME")}
    out = subprocess.run([sys.executable, "-c", _PROMPTS_STAGE, str(f), str(root)], env={**env, "HOME": str(home)},
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "2"
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
    assert any((root / "cache" / "datasets").rglob("*.arrow"))


def test_remote_code_modules_are_cached_under_the_root(tmp_path: Path) -> None:
    """A fresh process: a run's opened_run points transformers' module cache (custom model code) into the root, and
    transformers, imported afterwards, uses it; a user's HF_MODULES_CACHE wins."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom opd_tasks.config_files import load_config\nfrom opd_tasks.pipeline import opened_run\n"
            "with opened_run(load_config(None, [f'root={sys.argv[1]}'])):\n    pass\n"
            "from transformers.utils import hub\nprint(hub.HF_MODULES_CACHE)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_MODULES_CACHE", "HF_HOME")}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "root")], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == str((tmp_path / "root" / "cache" / "modules").resolve())
    env["HF_MODULES_CACHE"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "root")], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "mine")
