"""Golden figures of the pipeline on the committed testbed models: what a refactor must not change.

`measure(case)` runs one case with the plain driver (no Prefect) into a fresh root and returns, per recorded
(iteration, stage): the content hash of the artifact (every file's sha256 and every table's rows: the bytes
the stage produced, independent of the cache key it was stored under) and the manifest's `meta`; the
`updates` table of every update (losses, KL, gradient norms); and the accuracies.

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
and accuracy unchanged). Regenerate only for an intended change, and say what changed in the commit:

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
    """What the exact figures depend on besides the code: torch's version and the CPU kernels it picks."""
    import torch

    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def content_hash(store, ref) -> str:
    from storage.hashing import sha256_json

    m = store.manifest(ref)
    return sha256_json({"files": [[f["path"], f["sha256"]] for f in m["files"]], "tables": m["tables"]})


def measure(case: str, root: Path) -> dict:
    from opd_tasks.config import load_config
    from opd_tasks.pipeline import run_plain
    from storage.lineage import RunLineage
    from storage.store import ArtifactStore

    cfg = load_config(None, [*SIZE, *CASES[case], f"root={root}", f"name={case}"])
    out = run_plain(cfg, log=lambda m: None, progress=False)
    store = ArtifactStore(root)
    artifacts, updates = {}, {}
    for e in RunLineage(store.layout, case).entries():
        artifacts[f"it{e.iteration}.{e.stage}"] = {"content": content_hash(store, e.ref),
                                                   "meta": store.manifest(e.ref)["meta"]}
        if e.stage == "update":
            updates[str(e.iteration)] = store.read_table(e.ref, "updates").to_pylist()
    return {"artifacts": artifacts, "updates": updates, "baseline": out.baseline_accuracy,
            "accuracy": [r.accuracy for r in out.iterations]}


def main(argv: list[str]) -> None:
    import tests.conftest  # noqa: F401 - the test session's environment (HF_HUB_OFFLINE, ...), as the test sees it

    if argv != ["--write"]:
        sys.exit("usage: python -m tests.golden --write   (regenerates tests/golden/testbed.json)")
    with tempfile.TemporaryDirectory() as tmp:
        cases = {c: measure(c, Path(tmp) / c) for c in CASES}
    GOLDEN.write_text(json.dumps({"platform": platform(), "size": SIZE, "cases": cases}, indent=1, sort_keys=True)
                      + "\n")
    print(f"wrote {GOLDEN}")

