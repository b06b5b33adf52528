"""Entry point: `python -m bench [NAME] [ARGS...]`. NAME defaults to every benchmark, with defaults, except those of
ON_REQUEST (run by name only)."""

from __future__ import annotations

import os
import sys

# Spinning OpenMP threads make torch several times slower on a shared 2-core CPU (docs/testbed.md); set before any
# benchmark imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BENCHES = {
    "storage": "bench.storage",
    "stages": "bench.stages",
    "testbed": "bench.testbed",
    "orchestration": "bench.orchestration",
    "teacher_styles": "bench.teacher_styles",
    "trl": "bench.trl_peer",
    "economics": "bench.economics",
    "detectors": "bench.detectors",
    "pilot": "bench.pilot",
    "rerun": "bench.rerun",
    "real_shape": "bench.real_shape",
    "scaling": "bench.scaling",
    "real_recipe": "bench.real_recipe",
    "real_experiment": "bench.real_experiment",
}
#: Left out of a run of every benchmark: the real recipe needs the imported real model (`make real`) and takes
#: minutes per iteration; real_experiment reads the runs of its pre-registered experiment (docs/results.md).
ON_REQUEST = {"real_recipe", "real_experiment"}


def main(argv: list[str]) -> int:
    import importlib

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks:", ", ".join(BENCHES))
        return 0
    names = [argv[0]] if argv and argv[0] in BENCHES else [n for n in BENCHES if n not in ON_REQUEST]
    rest = argv[1:] if argv and argv[0] in BENCHES else argv
    for name in names:
        importlib.import_module(BENCHES[name]).main(rest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
