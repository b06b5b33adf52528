"""The `opd` CLI over a real store: runs, sql in every format, verify, config show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from storage.lineage import RunLineage
from storage.store import ArtifactStore
from tests.helpers import tokens_table, updates_table

runner = CliRunner()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    store = ArtifactStore(tmp_path / "root")
    t = store.put_table("analyze", "a1" * 32, "tokens", tokens_table(200, seed=3))
    u = store.put_table("update", "b2" * 32, "updates", updates_table(3))
    lin = RunLineage(store.layout, "demo")
    lin.record(0, "analyze", t)
    lin.record(0, "update", u)
    lin.record(1, "update", u)
    return store.layout.root


def test_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("runs", "sql", "verify", "config"):
        assert cmd in out.stdout


def test_runs(root: Path) -> None:
    r = runner.invoke(app, ["runs", "--root", str(root)])
    assert r.exit_code == 0, r.output
    assert "demo" in r.output and "0..1 (2)" in r.output and "analyze, update" in r.output


def test_sql_table_csv_json_parquet(root: Path, tmp_path: Path) -> None:
    q = "SELECT run, iteration, count(*) AS n FROM updates GROUP BY ALL ORDER BY iteration"
    r = runner.invoke(app, ["sql", q, "--root", str(root)])
    assert r.exit_code == 0, r.output
    cells = [[c.strip() for c in line.replace("┃", "│").split("│")[1:-1]] for line in r.output.splitlines()
             if line.replace("┃", "│").count("│") == 4]  # the header row, then one row per result
    assert cells == [["run", "iteration", "n"], ["demo", "0", "3"], ["demo", "1", "3"]], r.output
    r = runner.invoke(app, ["sql", q, "--root", str(root), "--format", "csv"])
    assert r.stdout.splitlines() == ['"run","iteration","n"', '"demo",0,3', '"demo",1,3']
    r = runner.invoke(app, ["sql", q, "--root", str(root), "--format", "json"])
    assert json.loads(r.stdout) == [{"run": "demo", "iteration": 0, "n": 3}, {"run": "demo", "iteration": 1, "n": 3}]
    out = tmp_path / "out.parquet"
    r = runner.invoke(app, ["sql", q, "--root", str(root), "--format", "parquet", "--output", str(out)])
    assert r.exit_code == 0 and pq.read_table(out).to_pylist()[1] == {"run": "demo", "iteration": 1, "n": 3}
    r = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM tokens WHERE high_loss", "--root", str(root),
                            "--format", "json"])
    expected = sum(tokens_table(200, seed=3).column("high_loss").to_pylist())
    assert json.loads(r.stdout) == [{"n": expected}]


def test_sql_output_stays_outside_the_root_and_replaces_nothing_unasked(root: Path, tmp_path: Path) -> None:
    """--output: a path under the root (directly or through a link) is refused before the query runs, an existing
    file is kept unless --force, and a written file is the whole result."""
    q = "SELECT run, iteration FROM updates ORDER BY iteration, step"
    part = next((root / "artifacts" / "update" / ("b2" * 32) / "updates").glob("*.parquet"))
    record = root / "runs" / "demo" / "run.json"
    (tmp_path / "link").symlink_to(root / "runs" / "demo")
    for inside in (part, record, tmp_path / "link" / "run.json", root / "new.json"):
        before = inside.read_bytes() if inside.exists() else None
        r = runner.invoke(app, ["sql", q, "--root", str(root), "--format", "json", "--output", str(inside),
                                "--force"])
        assert r.exit_code == 2 and "inside the storage root" in r.output, r.output
        assert (inside.read_bytes() if inside.exists() else None) == before
    out = tmp_path / "result.json"
    out.write_text("kept")
    r = runner.invoke(app, ["sql", q, "--root", str(root), "--format", "json", "--output", str(out)])
    assert r.exit_code == 2 and "the file exists; pass --force" in r.output and out.read_text() == "kept"
    r = runner.invoke(app, ["sql", q, "--root", str(root), "--format", "json", "--output", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(out.read_text())) == 6 and "wrote 6 rows" in r.output
    r = runner.invoke(app, ["sql", q, "--root", str(root), "--output", str(tmp_path)])
    assert r.exit_code == 2 and "is a directory" in r.output


def test_a_damaged_run_record_is_one_clear_error(root: Path) -> None:
    """An edited run.json or lineage pointer names its file, in the commands that read it (gc; `opd run` and the
    report through `RunLineage`), and is not overwritten."""
    from storage.errors import ArtifactError

    record = root / "runs" / "demo" / "run.json"
    for damaged in (b"[1, 2]", b"{not json"):
        record.write_bytes(damaged)
        r = runner.invoke(app, ["gc", "--dry-run", "--root", str(root)])
        assert r.exit_code == 2 and "run.json: damaged run record" in r.output, r.output
        with pytest.raises(ArtifactError, match="run.json: damaged run record"):
            RunLineage(root, "demo").init(method="opd")  # what `opd run` does first
        assert record.read_bytes() == damaged
    record.write_text("{}")
    pointer = root / "runs" / "demo" / "lineage" / "it0000.update.json"
    pointer.write_text('{"run": "demo"}')
    r = runner.invoke(app, ["show", "demo", "--root", str(root)])
    assert r.exit_code == 2 and "it0000.update.json: damaged lineage pointer: KeyError" in r.output, r.output


def test_sql_errors_are_clear(root: Path) -> None:
    r = runner.invoke(app, ["sql", "SELEC nonsense", "--root", str(root)])
    assert r.exit_code == 2 and "SQL error" in r.output
    r = runner.invoke(app, ["sql", "SELECT 1", "--root", str(root), "--format", "xml"])
    assert r.exit_code == 2 and "--format must be" in r.output
    r = runner.invoke(app, ["sql", "SELECT 1", "--root", str(root), "--format", "parquet"])
    assert r.exit_code == 2 and "needs --output" in r.output


def test_verify_names_bad_file(root: Path) -> None:
    r = runner.invoke(app, ["verify", "--root", str(root)])
    assert r.exit_code == 0 and "2 of 2 artifacts OK" in r.output
    part = root / "artifacts" / "update" / ("b2" * 32) / "updates" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[50] ^= 1
    part.write_bytes(bytes(data))
    r = runner.invoke(app, ["verify", "demo", "--root", str(root)])
    assert r.exit_code == 1
    assert "part-00000.parquet is corrupted" in r.output and "1 of 2 artifacts OK" in r.output
    r = runner.invoke(app, ["verify", "nope", "--root", str(root)])
    assert r.exit_code == 2 and "no run named 'nope'" in r.output
    part.write_bytes(bytes(data[:50]) + bytes([data[50] ^ 1]) + bytes(data[51:]))  # repaired
    (part.parent / "extra.parquet").write_bytes(b"x")
    r = runner.invoke(app, ["verify", "demo", "--root", str(root)])
    assert r.exit_code == 1 and "file(s) its manifest does not list: updates/extra.parquet" in r.output, r.output


def test_config_show(tmp_path: Path) -> None:
    r = runner.invoke(app, ["config", "show", "--set", "rollout.temperature=0.7"])
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(r.stdout)["rollout"]["temperature"] == 0.7
    r = runner.invoke(app, ["config", "show", "--set", "rollout.tempurature=0.7"])
    assert r.exit_code == 2 and "rollout.tempurature: unknown key" in r.output


def test_show_lists_stages_and_one_stage_rows(root: Path) -> None:
    r = runner.invoke(app, ["show", "demo", "--root", str(root)])
    assert r.exit_code == 0, r.output
    assert r.output.count("update") >= 2 and "analyze" in r.output
    # these artifacts were written without provenance (as before manifests recorded it): said, not invented
    assert "computed with not recorded (made before manifests recorded it): 2 artifacts" in r.output
    r = runner.invoke(app, ["show", "demo", "-i", "0", "-s", "update", "--rows", "2", "--root", str(root)])
    assert r.exit_code == 0, r.output
    assert "updates: first 2 of 3 rows" in r.output
    r = runner.invoke(app, ["show", "nope", "--root", str(root)])
    assert r.exit_code == 2 and "no run named 'nope'" in r.output


def test_verify_without_a_run_names_artifacts_whose_directory_is_gone(root: Path) -> None:
    import shutil

    shutil.rmtree(root / "artifacts" / "analyze" / ("a1" * 32))
    r = runner.invoke(app, ["verify", "--root", str(root)])
    assert r.exit_code == 1
    assert f"artifact analyze/{'a1' * 32} is missing: its directory" in r.output and "1 of 2 artifacts OK" in r.output


def test_sql_refuses_writes_and_reads_outside_the_artifacts(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "stolen.csv"
    r = runner.invoke(app, ["sql", f"COPY (SELECT * FROM tokens) TO '{out}'", "--root", str(root)])
    assert r.exit_code == 2 and "COPY statement" in r.output and "--output" in r.output and not out.exists()
    r = runner.invoke(app, ["sql", "SELECT * FROM read_text('/etc/hostname')", "--root", str(root)])
    assert r.exit_code == 2 and "disabled by configuration" in r.output


def test_sql_verifies_by_default(root: Path) -> None:
    part = root / "artifacts" / "update" / ("b2" * 32) / "updates" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[50] ^= 1
    part.write_bytes(bytes(data))  # same size
    r = runner.invoke(app, ["sql", "SELECT sum(loss) FROM updates", "--root", str(root)])
    assert r.exit_code == 2 and "part-00000.parquet is corrupted" in r.output


def test_a_damaged_file_fails_only_the_queries_that_read_its_table(root: Path) -> None:
    """Issue 32, class 10: a corrupted tokens part names itself in a query of tokens, and leaves a query of updates
    (or of lineage) alone; a catalogue function that DuckDB refuses is an SQL error, not a traceback."""
    part = next((root / "artifacts" / "analyze" / ("a1" * 32) / "tokens").glob("*.parquet"))
    data = bytearray(part.read_bytes())
    data[50] ^= 1
    part.write_bytes(bytes(data))
    r = runner.invoke(app, ["sql", "SELECT count(*) AS n FROM updates", "--root", str(root), "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == [{"n": 6}], r.output
    r = runner.invoke(app, ["sql", "SELECT count(*) FROM lineage", "--root", str(root)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sql", "SELECT count(*) FROM Tokens", "--root", str(root)])
    assert r.exit_code == 2 and "part-00000.parquet is corrupted" in r.output, r.output
    r = runner.invoke(app, ["sql", "SELECT * FROM duckdb_secrets()", "--root", str(root)])
    assert r.exit_code == 2 and "SQL error: Permission Error" in r.output, r.output
