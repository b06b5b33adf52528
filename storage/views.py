"""DuckDB views over every artifact, joined with run lineage (DESIGN.md sections 1.4 and 3).

`connect(root)` returns a DuckDB connection with:
- `lineage(run, iteration, stage, sha256, uri, cached, seconds, recorded_at, compute_seconds)`: one row per
  pointer (`compute_seconds`: what computing the artifact cost, kept across cached reruns);
- `artifacts(stage, key, sha256, schema_name, rows, bytes, uri)`: every published artifact;
- one view per table in storage/schemas.py (`prompts`, `rollouts`, `teacher_scores`, `tokens`, `probes`,
  `updates`, `old_logprobs`, `evals`), with the columns `run`, `iteration`, `stage` first and then the table's
  own columns, so that queries can say `WHERE run = 'x' AND iteration = 3`. An artifact shared by two runs appears once
  per run. Tables that no run has yet are empty views with the right columns.

The views read exactly the part files each manifest lists (never a glob), after checking each manifest
against the lineage's sha256 and, by default, each of those files' sha256 against its manifest (only the table
files: a checkpoint's weights beside them are not read, so not hashed): files already hashed and
unchanged since (size, mtime, inode) are taken from the root's ledger (storage/ledger.py) instead of hashed
again; `verify=False` checks sizes only (`opd sql --no-verify`). An artifact whose manifest is not the one the
store recorded is left out of `artifacts` (with a warning); a run that points at it fails with its name.

The connection is read-only towards the outside: DuckDB may open only the part files the views read (external
access off, `allowed_paths` those files, no extension auto-install or auto-load, the configuration locked), and
`read_only_query` runs one SELECT (or EXPLAIN) statement: `COPY ... TO`, `ATTACH`, `INSTALL`, `read_csv` of a
system file and the like fail with a specific error. Exports go through `opd sql --output`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb

from storage.errors import ArtifactError, ConfigError
from storage.lineage import check_runs, list_runs
from storage.schemas import SCHEMAS
from storage.store import ArtifactStore

log = logging.getLogger(__name__)

#: The statement types `read_only_query` runs (DESCRIBE, SHOW, SUMMARIZE and FROM-first queries are SELECTs).
READ_ONLY_STATEMENTS = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def connect(root: str | Path | None = None, runs: list[str] | None = None, verify: bool = True,
            tables: set[str] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the views over the root's runs (all, or `runs`); see the module
    docstring for what is verified and what the connection may not do. `tables`: only these table views read
    their files (and so are verified); the others are empty (a damaged file fails only the queries that read
    its table: `query_tables`)."""
    store = ArtifactStore(root)
    check_runs(store.layout, runs or [])
    ledger = store.ledger if verify else None
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    con.execute(
        "CREATE TABLE lineage(run VARCHAR, iteration INTEGER, stage VARCHAR, sha256 VARCHAR, uri VARCHAR, "
        "cached BOOLEAN, seconds DOUBLE, recorded_at DOUBLE, compute_seconds DOUBLE)"
    )
    con.execute(
        "CREATE TABLE artifacts(stage VARCHAR, key VARCHAR, sha256 VARCHAR, schema_name VARCHAR, "
        "rows BIGINT, bytes BIGINT, uri VARCHAR)"
    )
    arts = [(r.stage, r.key, r.sha256, r.schema_name, r.rows, r.bytes, r.uri)
            for r in store.iter_artifacts(on_bad=lambda msg: log.warning("left out of `artifacts`: %s", msg))]
    if arts:
        con.executemany("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?)", arts)

    parts: dict[str, list[str]] = {name: [] for name in SCHEMAS}
    manifests: dict[str, dict] = {}
    allowed: set[str] = set()
    rows = []
    for run in list_runs(store.layout):
        if runs is not None and run.run not in runs:
            continue
        for e in run.entries():
            rows.append((e.run, e.iteration, e.stage, e.ref.sha256, e.ref.uri, e.cached, e.seconds, e.recorded_at,
                         e.compute_seconds))
            base = store.path_of(e.ref)
            m = manifests.get(e.ref.sha256)
            if m is None:  # check the table files the views read (not a checkpoint's weights beside them)
                m = store.manifest(e.ref)
                wanted = SCHEMAS.keys() & m["tables"].keys() & (tables if tables is not None else SCHEMAS.keys())
                read = [f for f in m["files"] if f["path"].split("/", 1)[0] in wanted]
                if verify:
                    store.verify(e.ref, files=[f["path"] for f in read], ledger=ledger)
                else:
                    for f in read:
                        p = base / f["path"]
                        if not p.is_file() or p.stat().st_size != f["bytes"]:
                            raise ArtifactError(f"artifact {e.ref.stage}/{e.ref.key}: file {p} is missing or "
                                                "truncated")
                manifests[e.ref.sha256] = m
            for table in m["tables"]:
                if table not in SCHEMAS or (tables is not None and table not in tables):
                    continue
                files = [str(base / f["path"]) for f in m["files"] if f["path"].startswith(table + "/")]
                allowed.update(files)
                if files:
                    flist = "[" + ", ".join(_q(f) for f in files) + "]"
                    parts[table].append(
                        f"SELECT {_q(e.run)} AS run, {e.iteration}::INTEGER AS iteration, {_q(e.stage)} AS stage, * "
                        f"FROM read_parquet({flist})"
                    )
    if rows:
        con.executemany("INSERT INTO lineage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    for name, schema in SCHEMAS.items():
        if parts[name]:
            con.execute(f"CREATE VIEW {name} AS " + "\nUNION ALL BY NAME\n".join(parts[name]))
        else:
            con.register(f"_empty_{name}", schema.arrow.empty_table())
            con.execute(
                f"CREATE VIEW {name} AS SELECT NULL::VARCHAR AS run, NULL::INTEGER AS iteration, "
                f"NULL::VARCHAR AS stage, * FROM _empty_{name} WHERE false"
            )
    if ledger is not None:
        ledger.close()
    # From here on DuckDB may open only the part files above, and nothing can change that.
    con.execute("SET allowed_paths = [" + ", ".join(_q(f) for f in sorted(allowed)) + "]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def query_tables(sql: str) -> set[str] | None:
    """The view names `sql` reads (lower case), or None when DuckDB cannot tell (then every view is built)."""
    try:
        return {t.lower() for t in duckdb.get_table_names(sql)}
    except duckdb.Error:
        return None


def read_only_query(con: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation:
    """Run `sql`, one read-only statement (SELECT, WITH ... SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN), on `con`.

    Anything else (COPY, ATTACH, INSTALL, CREATE, SET, PRAGMA, several statements) is refused with a ConfigError
    naming it; write results with `opd sql --output FILE` instead of COPY."""
    statements = duckdb.extract_statements(sql)
    if len(statements) != 1:
        raise ConfigError(f"opd sql runs one statement, got {len(statements)}; run them one at a time")
    kind = statements[0].type
    if kind not in READ_ONLY_STATEMENTS:
        raise ConfigError(f"opd sql runs read-only queries (SELECT, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN); this is a "
                          f"{kind.name} statement. To save a result, use --output FILE --format csv|json|parquet")
    return con.sql(sql)
