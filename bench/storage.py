"""Storage benchmark: the artifact store vs raw pyarrow, side by side, and a DuckDB aggregate.

For each N: build a `tokens` table and a `teacher_scores` table (top-k lists, k=8) of N rows, then,
alternating store and raw within each repetition:
- write: `ArtifactStore` publish (schema check, Parquet, streamed sha256, manifest, fsync, atomic rename)
  vs `pyarrow.parquet.write_table` to a plain file;
- read: `ArtifactStore.read_table` (manifest + per-file hash verification, schema check) vs
  `pyarrow.parquet.read_table`, after `os.sync()` so that neither side's reads race the other's write-back,
  and after an untimed read that warms the allocator.
Reports rows/s (median over repetitions) and the store/raw time ratio. Then DuckDB over the views: the N
token rows spread over 2 runs x 5 iterations; the time to open the views with sizes checked only (`opd sql
--no-verify`), with every file hashed (a cold ledger) and with the ledger warm (a repeated query), side by side
in each repetition; and `GROUP BY run, iteration, regime`.

    python -m bench storage --rows 1000000 10000000 --reps 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from bench.common import median, peak_rss_mb, save
from storage.hashing import sha256_json
from storage.ledger import LEDGER_FILE
from storage.lineage import RunLineage
from storage.schemas import SCHEMAS, conform
from storage.store import ArtifactStore
from storage.views import connect

console = Console(width=170)


def make_tokens(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    slp = -rng.random(n, dtype=np.float32) * 3
    tlp = -rng.random(n, dtype=np.float32) * 3
    seq = np.arange(n) // 64
    return conform(
        pa.table(
            {
                "prompt_id": pa.array((seq // 4).astype(str)),
                "sample_id": (seq % 4).astype(np.int32),
                "pos": (np.arange(n) % 64).astype(np.int32),
                "token_id": rng.integers(0, 32000, n, dtype=np.int32),
                "student_logprob": slp,
                "teacher_logprob": tlp,
                "k1": slp - tlp,
                "rkl_topk": np.abs(slp - tlp),
                "student_entropy": rng.random(n, dtype=np.float32),
                "teacher_entropy": rng.random(n, dtype=np.float32),
                "teacher_rank": rng.integers(0, 8, n, dtype=np.int32),
                "high_loss": rng.random(n) < 0.2,
                "near_future_div": rng.random(n, dtype=np.float32),
                "regime": pa.array(np.array(["normal", "surface", "divergent"])[rng.integers(0, 3, n)]),
                "weight": np.ones(n, dtype=np.float32),
                "role": pa.array(np.array(["form", "reasoning", "answer"])[rng.integers(0, 3, n)]),
            }
        ),
        SCHEMAS["tokens"],
    )


def make_scores(n: int, k: int = 8, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    seq = np.arange(n) // 64
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int32))
    ids = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(0, 32000, n * k, dtype=np.int32)))
    lps = pa.ListArray.from_arrays(offsets, pa.array(-rng.random(n * k, dtype=np.float32) * 5))
    return conform(
        pa.table(
            {
                "prompt_id": pa.array((seq // 4).astype(str)),
                "sample_id": (seq % 4).astype(np.int32),
                "pos": (np.arange(n) % 64).astype(np.int32),
                "token_id": rng.integers(0, 32000, n, dtype=np.int32),
                "teacher_logprob": -rng.random(n, dtype=np.float32),
                "teacher_entropy": rng.random(n, dtype=np.float32),
                "topk_ids": ids,
                "topk_logprobs": lps,
            }
        ),
        SCHEMAS["teacher_scores"],
    )


def bench_table(name: str, table: pa.Table, reps: int, work: Path) -> dict:
    store = ArtifactStore(work / "store")
    w_store, w_raw, r_store, r_raw = [], [], [], []
    for rep in range(reps):
        key = sha256_json([name, table.num_rows, rep])
        raw_path = work / f"raw-{rep}.parquet"
        order = ["store", "raw"] if rep % 2 == 0 else ["raw", "store"]
        for side in order:
            t0 = time.perf_counter()
            if side == "store":
                ref = store.put_table("bench", key, name, table)
                w_store.append(time.perf_counter() - t0)
            else:
                pq.write_table(table, raw_path)
                w_raw.append(time.perf_counter() - t0)
        os.sync()  # no write-back of either side's fresh files during the reads
        # Untimed read first: the first large read of a process pays the allocator's page faults for the
        # result's memory; without this the side that reads first in a repetition is charged for it.
        del_me = pq.read_table(raw_path)
        del del_me
        for side in order:
            t0 = time.perf_counter()
            if side == "store":
                back = store.read_table(ref, name)
                r_store.append(time.perf_counter() - t0)
            else:
                back = pq.read_table(raw_path)
                r_raw.append(time.perf_counter() - t0)
            assert back.num_rows == table.num_rows
            del back
        shutil.rmtree(store.path_of(ref))
        raw_path.unlink()
    n = table.num_rows
    return {
        "table": name,
        "rows": n,
        "bytes": int(ref.bytes),
        "write_store_s": median(w_store),
        "write_raw_s": median(w_raw),
        "read_store_s": median(r_store),
        "read_raw_s": median(r_raw),
        "write_ratio": median(w_store) / median(w_raw),
        "read_ratio": median(r_store) / median(r_raw),
        "total_ratio": (median(w_store) + median(r_store)) / (median(w_raw) + median(r_raw)),
        "write_store_rows_s": n / median(w_store),
        "write_raw_rows_s": n / median(w_raw),
        "read_store_rows_s": n / median(r_store),
        "read_raw_rows_s": n / median(r_raw),
    }


def bench_duckdb(n: int, reps: int, work: Path) -> dict:
    root = work / "views"
    store = ArtifactStore(root)
    per = n // 10
    chunk = make_tokens(per, seed=7)
    i = 0
    for run in ("run-a", "run-b"):
        lin = RunLineage(root, run)
        for it in range(5):
            key = sha256_json(["duck", n, i])
            # Vary the data per artifact so each one is distinct content.
            t = chunk.set_column(chunk.column_names.index("pos"), "pos", pa.array(np.full(per, i, np.int32)))
            lin.record(it, "analyze", store.put_table("analyze", key, "tokens", t))
            i += 1
    query = (
        "SELECT run, iteration, regime, count(*) AS n, avg(k1) AS mean_k1, avg(weight) AS w "
        "FROM tokens GROUP BY run, iteration, regime"
    )
    times = []
    # Opening the views, side by side: sizes only (--no-verify), every file hashed (a cold ledger: first query
    # after the files were written or changed), and the ledger warm (a repeated query).
    connect_s: dict[str, list[float]] = {"no_verify": [], "verify_cold": [], "verify_warm": []}
    for _ in range(reps):
        for mode in connect_s:
            if mode == "verify_cold":
                (root / LEDGER_FILE).unlink(missing_ok=True)
            t0 = time.perf_counter()
            con = connect(root, verify=mode != "no_verify")
            connect_s[mode].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rows = con.sql(query).fetchall()
        times.append(time.perf_counter() - t0)
        assert len(rows) == 30 and sum(r[3] for r in rows) == per * 10
    data_bytes = sum(r.bytes for r in store.iter_artifacts())
    shutil.rmtree(root)
    return {"rows": per * 10, "query": query, "query_s": median(times), "connect_s": median(connect_s["verify_warm"]),
            "rows_per_s": per * 10 / median(times), "data_mb": data_bytes / 1e6,
            **{f"connect_{mode}_s": median(v) for mode, v in connect_s.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench storage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="Scratch dir (default: a temp dir).")
    args = ap.parse_args(argv)
    results: dict = {"tables": [], "duckdb": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        for n in args.rows:
            for name, make in (("tokens", make_tokens), ("teacher_scores", make_scores)):
                console.print(f"[bold]{name}[/]: {n:,} rows, {args.reps} reps ...")
                table = make(n)
                results["tables"].append(bench_table(name, table, args.reps, work))
                del table
            console.print(f"[bold]duckdb[/]: {n:,} token rows over 10 artifacts ...")
            results["duckdb"].append(bench_duckdb(n, args.reps, work))
    results["peak_rss_mb"] = peak_rss_mb()
    t = Table("table", "rows", "MB", "write store r/s", "write raw r/s", "read store r/s", "read raw r/s",
              "write x", "read x", "total x", title="artifact store vs raw pyarrow (median; x = store/raw time)")
    for r in results["tables"]:
        t.add_row(r["table"], f"{r['rows']:,}", f"{r['bytes'] / 1e6:.0f}", f"{r['write_store_rows_s']:,.0f}",
                  f"{r['write_raw_rows_s']:,.0f}", f"{r['read_store_rows_s']:,.0f}", f"{r['read_raw_rows_s']:,.0f}",
                  f"{r['write_ratio']:.2f}", f"{r['read_ratio']:.2f}", f"{r['total_ratio']:.2f}")
    console.print(t)
    d = Table("token rows", "MB", "open views: --no-verify s", "verify, cold ledger s", "verify, warm ledger s",
              "GROUP BY run, iteration, regime s", "rows/s", title="DuckDB (median)")
    for r in results["duckdb"]:
        d.add_row(f"{r['rows']:,}", f"{r['data_mb']:.0f}", f"{r['connect_no_verify_s']:.3f}",
                  f"{r['connect_verify_cold_s']:.3f}", f"{r['connect_verify_warm_s']:.3f}", f"{r['query_s']:.3f}",
                  f"{r['rows_per_s']:,.0f}")
    console.print(d)
    out = save("storage", results)
    console.print(f"results: {out}  (peak RSS {results['peak_rss_mb']:.0f} MB)")
    return results


if __name__ == "__main__":
    main()
