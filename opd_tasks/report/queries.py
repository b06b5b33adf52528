"""The report's data: the runs it covers and the SQL in `opd_tasks/report_sql/` over the storage views, plus what
the manifests hold (early-stop rates, provenance)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from opd_tasks.errors import ConfigError, DataError

SQL_DIR = Path(__file__).resolve().parent.parent / "report_sql"


QUERIES = ("accuracy", "problems", "regimes", "classifier", "forks", "costs", "kept", "examples")


METHOD_ORDER = ("opd", "opd_suppress", "topd")


def sql(name: str) -> str:
    """The text of report query `name` (a file in opd_tasks/report_sql/)."""
    if name not in QUERIES:
        raise ConfigError(f"unknown report query {name!r}; queries are {', '.join(QUERIES)}")
    return (SQL_DIR / f"{name}.sql").read_text()


@dataclass(frozen=True)
class RunInfo:
    run: str
    method: str  # what the report groups by: the run's arm label (an experiment's), else its method
    seed: int
    config: dict = field(default_factory=dict, compare=False, repr=False)


def select_runs(root: str | Path, patterns: list[str]) -> list[RunInfo]:
    """The runs named by `patterns` (exact names or shell patterns such as `exp-*`), with method and seed from
    their lineage. A pattern that matches no run is an error that lists the runs there are."""
    from storage.lineage import list_runs

    if not patterns:
        raise ConfigError("opd report: name at least one run (or a pattern such as 'exp-*')")
    runs = {r.run: r for r in list_runs(root)}
    chosen: list[str] = []
    for p in patterns:
        hits = sorted(n for n in runs if fnmatch.fnmatchcase(n, p))
        if not hits:
            known = ", ".join(sorted(runs)) or "none"
            raise ConfigError(f"opd report: no run matches {p!r} under {Path(root).resolve()} (runs: {known})")
        chosen += [h for h in hits if h not in chosen]
    out = []
    for name in chosen:
        info = runs[name].info()
        cfg = info.get("config") or {}
        method = info.get("arm") or info.get("method") or cfg.get("method")  # an experiment's arm label
        if method is None or "seed" not in cfg:
            raise DataError(f"run {name!r}: its run.json records no method/config (was it made by `opd run`?)")
        out.append(RunInfo(name, str(method), int(cfg["seed"]), cfg))
    check_poolable(out, {name: len({e.iteration for e in runs[name].entries() if e.stage == "update"})
                         for name in chosen})
    return out


#: Config keys in which the runs the report pools as seeds of one arm may differ: the seed, the names, where the
#: run wrote and how it was orchestrated (none of which changes a figure).
POOLED_MAY_DIFFER = ("seed", "name", "arm", "root", "remote", "orchestration", "fault")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_poolable(runs: list[RunInfo], iterations: dict[str, int]) -> None:
    """ConfigError unless the runs of each arm differ only in `POOLED_MAY_DIFFER` and in their seed, with one run
    per seed, and ran as many iterations: the report treats them as seeds of one experiment, so runs of other
    settings or lengths would be averaged as if they were (name the differing keys, and pick the runs by name)."""
    by_arm: dict[str, list[RunInfo]] = {}
    for r in runs:
        by_arm.setdefault(r.method, []).append(r)
    for arm, group in by_arm.items():
        seeds = [r.seed for r in group]
        if dup := sorted({s for s in seeds if seeds.count(s) > 1}):
            twins = [r.run for r in group if r.seed in dup]
            raise ConfigError(f"opd report: runs {', '.join(twins)} of arm {arm!r} share seed(s) {dup}; a seed is "
                              "counted once, so name one run per seed")
        lengths = {r.run: iterations.get(r.run, 0) for r in group}
        if len(set(lengths.values())) > 1:
            raise ConfigError(f"opd report: the runs of arm {arm!r} ran different numbers of iterations "
                              f"({', '.join(f'{k}: {v}' for k, v in sorted(lengths.items()))}); pool runs of one "
                              "length (finish the short ones with `opd run --resume`, or name the runs)")
        first = {k: v for k, v in _flat(group[0].config).items() if k.split(".")[0] not in POOLED_MAY_DIFFER}
        for r in group[1:]:
            other = {k: v for k, v in _flat(r.config).items() if k.split(".")[0] not in POOLED_MAY_DIFFER}
            if diff := sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k)):
                shown = "; ".join(f"{k}: {first.get(k)!r} vs {other.get(k)!r}" for k in diff[:5])
                raise ConfigError(f"opd report: runs {group[0].run} and {r.run} of arm {arm!r} differ in more than "
                                  f"the seed ({shown}{'; ...' if len(diff) > 5 else ''}), so they are not seeds of "
                                  "one experiment; name the runs to compare, or give them other arm labels")


def ordered_methods(names) -> list[str]:
    names = set(names)
    return [m for m in METHOD_ORDER if m in names] + sorted(names - set(METHOD_ORDER))


def query_rows(con, name: str, params: dict | None = None) -> list[dict]:
    rel = con.execute(sql(name), params or {})
    cols = [d[0] for d in rel.description]
    return [dict(zip(cols, r, strict=True)) for r in rel.fetchall()]


def collect(root: str | Path, runs: list[RunInfo]) -> dict[str, list[dict]]:
    """Run the report's queries over `runs`; returns {query name: rows}."""
    import pyarrow as pa

    from storage.views import connect

    con = connect(root, runs=[r.run for r in runs])
    con.register("_run_info", pa.table({"run": [r.run for r in runs], "method": [r.method for r in runs],
                                        "seed": pa.array([r.seed for r in runs], pa.int64())}))
    con.execute("CREATE TABLE run_info AS SELECT * FROM _run_info")
    from opd_tasks.topd.signals import TRUE_REGIME

    con.register("_role_regime", pa.table({"role": list(TRUE_REGIME), "regime": list(TRUE_REGIME.values())}))
    con.execute("CREATE TABLE role_regime AS SELECT * FROM _role_regime")
    data = {q: query_rows(con, q) for q in ("accuracy", "problems", "regimes", "classifier", "forks", "costs", "kept")}
    data["early_stops"] = _early_stops(root, runs)
    data["environments"] = _environments(root, runs)
    data["_con"] = con  # examples need the connection (and a tokenizer); see examples()
    return data


def _environments(root: str | Path, runs: list[RunInfo]) -> list[dict]:
    """What computed the runs' artifacts (their manifests' provenance): one row per distinct environment."""
    from opd_tasks.provenance import environments
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    store = ArtifactStore(root)
    refs = {e.ref.sha256: e.ref for r in runs for e in RunLineage(store.layout, r.run).entries()}
    return [{"computed_with": line, "artifacts": n}
            for line, n in environments(store.manifest(ref) for ref in refs.values())]


def _early_stops(root: str | Path, runs: list[RunInfo]) -> list[dict]:
    """Per run and step: the evaluation's early-stop rate (the testbed's premature stops; its manifest's
    `early_stop_rate`, opd_tasks/stages/evaluate.py), where the evaluation recorded one."""
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    store, out = ArtifactStore(root), []
    for r in runs:
        for e in RunLineage(store.layout, r.run).entries():
            if e.stage in ("baseline", "evaluate"):
                rate = store.manifest(e.ref)["meta"].get("early_stop_rate")
                if rate is not None:
                    out.append({"run": r.run, "method": r.method, "seed": r.seed, "rate": rate,
                                "step": 0 if e.stage == "baseline" else e.iteration + 1})
    return sorted(out, key=lambda x: (x["method"], x["seed"], x["step"]))
