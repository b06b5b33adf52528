"""DuckDB views over every artifact, joined with run lineage (DESIGN.md sections 1.4 and 3).

`connect(root)` returns a DuckDB connection with:
- `lineage(run, iteration, stage, sha256, uri, cached, seconds, recorded_at)`: one row per pointer;
- `artifacts(stage, key, sha256, schema_name, rows, bytes, uri)`: every published artifact;
- one view per table in storage/schemas.py (`prompts`, `rollouts`, `teacher_scores`, `tokens`, `probes`,
  `updates`, `evals`), with the columns `run`, `iteration`, `stage` first and then the table's own columns,
  so that queries can say `WHERE run = 'x' AND iteration = 3`. An artifact shared by two runs appears once
  per run. Tables that no run has yet are empty views with the right columns.

The views read exactly the part files each manifest lists (never a glob), after checking each manifest
against the lineage's sha256 and each file's size; `verify_files=True` also re-hashes every file
(`opd sql --verify`; `opd verify` checks everything).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from storage.errors import ArtifactError
from storage.lineage import list_runs
from storage.schemas import SCHEMAS
from storage.store import ArtifactStore


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def connect(
    root: str | Path | None = None,
    runs: list[str] | None = None,
    verify_files: bool = False,
    database: str = ":memory:",
) -> duckdb.DuckDBPyConnection:
    store = ArtifactStore(root)
    con = duckdb.connect(database)
    con.execute(
        "CREATE TABLE lineage(run VARCHAR, iteration INTEGER, stage VARCHAR, sha256 VARCHAR, uri VARCHAR, "
        "cached BOOLEAN, seconds DOUBLE, recorded_at DOUBLE)"
    )
    con.execute(
        "CREATE TABLE artifacts(stage VARCHAR, key VARCHAR, sha256 VARCHAR, schema_name VARCHAR, "
        "rows BIGINT, bytes BIGINT, uri VARCHAR)"
    )
    arts = [(r.stage, r.key, r.sha256, r.schema_name, r.rows, r.bytes, r.uri) for r in store.iter_artifacts()]
    if arts:
        con.executemany("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?)", arts)

    parts: dict[str, list[str]] = {name: [] for name in SCHEMAS}
    manifests: dict[str, dict] = {}
    rows = []
    for run in list_runs(store.layout):
        if runs is not None and run.run not in runs:
            continue
        for e in run.entries():
            rows.append((e.run, e.iteration, e.stage, e.ref.sha256, e.ref.uri, e.cached, e.seconds, e.recorded_at))
            m = manifests.get(e.ref.sha256)
            if m is None:
                m = store.verify(e.ref) if verify_files else store.manifest(e.ref)
                if not verify_files:
                    for f in m["files"]:
                        p = Path(e.ref.uri) / f["path"]
                        if not p.is_file() or p.stat().st_size != f["bytes"]:
                            raise ArtifactError(f"artifact {e.ref.stage}/{e.ref.key}: file {p} is missing or truncated")
                manifests[e.ref.sha256] = m
            for table in m["tables"]:
                if table not in SCHEMAS:
                    continue
                files = [str(Path(e.ref.uri) / f["path"]) for f in m["files"] if f["path"].startswith(table + "/")]
                if files:
                    flist = "[" + ", ".join(_q(f) for f in files) + "]"
                    parts[table].append(
                        f"SELECT {_q(e.run)} AS run, {e.iteration}::INTEGER AS iteration, {_q(e.stage)} AS stage, * "
                        f"FROM read_parquet({flist})"
                    )
    if rows:
        con.executemany("INSERT INTO lineage VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    for name, schema in SCHEMAS.items():
        if parts[name]:
            con.execute(f"CREATE VIEW {name} AS " + "\nUNION ALL BY NAME\n".join(parts[name]))
        else:
            con.register(f"_empty_{name}", schema.arrow.empty_table())
            con.execute(
                f"CREATE VIEW {name} AS SELECT NULL::VARCHAR AS run, NULL::INTEGER AS iteration, "
                f"NULL::VARCHAR AS stage, * FROM _empty_{name} WHERE false"
            )
    return con
