"""Golden figures of the pipeline on the committed testbed models: what a refactor must not change.

`measure(case)` runs one case with the plain driver (no Prefect) into a fresh root and returns, per recorded
(iteration, stage): the content hash of the artifact (every file's sha256 and every table's rows: the bytes
the stage produced, independent of the cache key it was stored under), the manifest's `meta` and, per table, its
rows, a hash of its discrete columns (token ids, text, flags, regimes: `table_figures`) and the mean of each float
column; the `updates` table of every update (losses, KL, gradient norms); and the accuracies.

Two checks use them (tests/integration/test_golden.py):
- **exact**, where the platform matches the recording's (`platform()`: torch's version and the CPU kernel family):
  every byte, loss and meta value equal;
- **tolerant**, everywhere: the same artifacts at the same iterations, every table's rows and discrete columns
  equal, and every float (losses, gradient norms, meta, float-column means) within `RTOL` relative plus `ATOL`
  absolute (`tolerant_mismatches`); sha256 values in meta (an update's `parent`) are left to the exact check. The
  tolerances were set by running the cases under torch's other CPU kernel families on the recording machine
  (`ATEN_CPU_CAPABILITY=default` and `avx2` against the AVX512 recording): every discrete column and accuracy was
  equal, per-step losses and gradient norms moved at most 2.4e-6 relative, and the largest change of any figure
  used 3% of its tolerance (a gate's teacher re-score difference, 5.7e-6 -> 2.6e-6).

`testbed.json` holds these figures. They were recorded before the one-loop refactor (issue 15), which reproduced
them (commit f3dcb5e). Regenerated since, each time for an intended change named in its commit: checkpoints whose
tokenizer files are the student's bytes (update contents and keys); then the testbed's fork/filler roles, the
faithful probe as the probe's default and the early-stop rate in evaluations (issue 16: analysis contents, the
probe cases' training, evaluation meta; every other loss and accuracy unchanged); then the trainer's recomputed old
log-probs and the gates' batched re-scores (issue 19: update contents, the later iterations' rollouts and analyses;
losses and gate figures moved in the last float32 bits, e.g. teacher_repeat_diff 0 -> 6e-6, every gate passes as
before, every accuracy unchanged); then the prompts stage's version 2 (issue 21's session: it had excluded rows
without an answer since issue 18 under version 1; every key changes, so the three `parent` checkpoint hashes of
iteration 1 changed, and nothing else); then the analysis stage's version 8 (issue 21, sharded analysis: the
analyze keys change, so the two iteration-1 `parent` hashes changed, and a quantile delta is now the quantile of
the stored float32 D_t, so the four quantile cases' meta `delta` moved in the 8th digit; every table's bytes, loss
and accuracy unchanged); then the per-table figures of the tolerant check (issue 28: added beside every recorded
figure, which stayed as it was); then the high-loss floor and the no-signal rule (issue 33: new config fields, so
every analyze and update key changed and with them the iteration-1 `parent` hashes; the analysis meta gained
`below_floor`, 0 in every case: the floor removed no token here; every table's bytes, loss and accuracy
unchanged); then the `updates` table's `pg_loss` column renamed `distill_loss` (issue 29: it holds the loss of every
loss type; the update artifacts' bytes, the update keys (stage version 6) and so the iteration-1 `parent` hashes
changed; every value, every other artifact, loss and accuracy unchanged); then the teacher's context and the
reverse-KL evaluation (issue 30: the prompts table gains `teacher_prompt_token_ids` and the rollouts table carries
it, null without a context; the evals table gains `rkl` and `truncated` and the evaluation meta `rkl_per_token`,
`rkl_per_sequence` and `truncated`; a `teacher_eval` artifact at iteration 0, the teacher's own evaluation for the
headroom gate; every key and so the iteration-1 `parent` hashes changed; every token, loss and accuracy
unchanged); then the evals table's version 3 (issue 30, prompt-only data: `correct` may be null; the bytes of
every evaluation artifact changed, its rows, meta and every other artifact did not). Regenerate only for an
intended change,
and say what changed in the commit:

    python -m tests.golden --write
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "testbed.json"

#: Small sizes: the whole set runs in about 15 s on 2 cores.
SIZE = ["data.prompts_per_iteration=8", "rollout.samples_per_prompt=4", "data.eval_size=20", "iterations=2",
        "analysis.batch_size=64", "seed=0"]
_QUANTILE = ["analysis.delta_mode=quantile", "analysis.delta=0.5", "iterations=1"]
CASES: dict[str, list[str]] = {
    "opd": ["method=opd"],
    "opd_suppress": ["method=opd_suppress"],
    "topd": ["method=topd"],
    "topd-probe-xent": ["method=topd", "analysis.detector=probe", *_QUANTILE],
    "topd-probe-ot": ["method=topd", "analysis.detector=probe", "analysis.distance=ot", *_QUANTILE],
    "topd-window": ["method=topd", "analysis.detector=window", *_QUANTILE],
    "topd-swap-quantile": ["method=topd", *_QUANTILE],
}


def platform() -> dict:
    """What the exact figures depend on besides the code: torch's version, the CPU kernels it picks, the CPU itself
    and torch's thread count. Two machines that both report AVX512 can still differ in the last bits (another CPU
    model or feature set, measured: every figure moved by about 1e-7 between two such VMs), so the CPU's name and
    a digest of its feature flags are part of it."""
    import hashlib

    import torch

    model, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif name.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": f"{model}, flags {hashlib.sha256(flags.encode()).hexdigest()[:12]}",
            "threads": torch.get_num_threads()}


#: The tolerant check's float tolerance: |got - want| <= ATOL + RTOL * |want| (module docstring).
RTOL, ATOL = 1e-3, 1e-4


def content_hash(store, ref) -> str:
    from storage.hashing import sha256_json

    m = store.manifest(ref)
    return sha256_json({"files": [[f["path"], f["sha256"]] for f in m["files"]], "tables": m["tables"]})


def _is_float(t) -> bool:
    import pyarrow as pa

    while pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_floating(t)


def table_figures(table) -> dict:
    """A table's rows, the sha256 of its discrete (non-float) columns and the mean of each float column (over every
    element of a list column; None when it has none)."""
    import pyarrow.compute as pc

    from storage.hashing import sha256_json

    floats = [c for c in table.column_names if _is_float(table.schema.field(c).type)]
    discrete = [c for c in table.column_names if c not in floats]
    means = {}
    for c in floats:
        col = table.column(c)
        while hasattr(col.type, "value_type"):
            col = pc.list_flatten(col)
        means[c] = pc.mean(col).as_py()
    return {"rows": table.num_rows, "discrete": sha256_json(table.select(discrete).to_pylist()),
            "float_means": means}


def measure(case: str, root: Path) -> dict:
    from opd_tasks.config_files import load_config
    from opd_tasks.pipeline import run_plain
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    cfg = load_config(None, [*SIZE, *CASES[case], f"root={root}", f"name={case}"])
    out = run_plain(cfg, log=lambda m: None, progress=False)
    store = ArtifactStore(root)
    artifacts, updates = {}, {}
    for e in RunLineage(store.layout, case).entries():
        m = store.manifest(e.ref)
        artifacts[f"it{e.iteration}.{e.stage}"] = {
            "content": content_hash(store, e.ref), "meta": m["meta"],
            "tables": {t: table_figures(store.read_table(e.ref, t)) for t in m["tables"]}}
        if e.stage == "update":
            updates[str(e.iteration)] = store.read_table(e.ref, "updates").to_pylist()
    return {"artifacts": artifacts, "updates": updates, "baseline": out.baseline_accuracy,
            "accuracy": [r.accuracy for r in out.iterations]}


def _close(got, want) -> bool:
    return abs(got - want) <= ATOL + RTOL * abs(want)


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _compare(got, want, where: str, out: list[str]) -> None:
    """Append to `out` each place where `got` differs from `want`: floats beyond the tolerance, anything else at all."""
    if isinstance(want, bool) or isinstance(got, bool) or want is None or got is None:
        if got != want:
            out.append(f"{where}: {got!r}, recorded {want!r}")
    elif isinstance(want, float) or isinstance(got, float):
        if not (isinstance(got, int | float) and isinstance(want, int | float) and _close(got, want)):
            out.append(f"{where}: {got!r}, recorded {want!r} (tolerance {ATOL} + {RTOL} x |recorded|)")
    elif isinstance(want, dict) and isinstance(got, dict):
        if sorted(got) != sorted(want):
            out.append(f"{where}: keys {sorted(got)}, recorded {sorted(want)}")
        for k in sorted(set(got) & set(want)):
            _compare(got[k], want[k], f"{where}.{k}", out)
    elif isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            out.append(f"{where}: {len(got)} items, recorded {len(want)}")
        for i, (g, w) in enumerate(zip(got, want, strict=False)):
            _compare(g, w, f"{where}[{i}]", out)
    elif got != want:
        out.append(f"{where}: {got!r}, recorded {want!r}")


def _no_hashes(meta: dict) -> dict:
    """`meta` without its sha256 values (an update's `parent`: the hash of the checkpoint it started from, whose
    weights are floats; the exact check compares it)."""
    return {k: v for k, v in meta.items() if not _is_sha256(v)}


def tolerant_mismatches(got: dict, want: dict) -> list[str]:
    """What the tolerant check finds different between a measurement and the recorded one (module docstring); empty
    when they agree. Artifact bytes (`content`) are not compared: that is the exact check's job."""
    out: list[str] = []
    _compare(got["baseline"], want["baseline"], "baseline accuracy", out)
    _compare(got["accuracy"], want["accuracy"], "accuracy", out)
    _compare(got["updates"], want["updates"], "updates", out)
    if sorted(got["artifacts"]) != sorted(want["artifacts"]):
        out.append(f"artifacts: {sorted(got['artifacts'])}, recorded {sorted(want['artifacts'])}")
    for label in sorted(set(got["artifacts"]) & set(want["artifacts"])):
        g, w = got["artifacts"][label], want["artifacts"][label]
        _compare(_no_hashes(g["meta"]), _no_hashes(w["meta"]), f"{label}.meta", out)
        _compare(g["tables"], w["tables"], f"{label}.tables", out)
    return out


def main(argv: list[str]) -> None:
    import tests.conftest  # noqa: F401 - the test session's environment (HF_HUB_OFFLINE, ...), as the test sees it

    if argv != ["--write"]:
        sys.exit("usage: python -m tests.golden --write   (regenerates tests/golden/testbed.json)")
    with tempfile.TemporaryDirectory() as tmp:
        cases = {c: measure(c, Path(tmp) / c) for c in CASES}
    GOLDEN.write_text(json.dumps({"platform": platform(), "size": SIZE, "cases": cases}, indent=1, sort_keys=True)
                      + "\n")
    print(f"wrote {GOLDEN}")

