"""What the running environment has that differs from the lock file: `python scripts/lock_drift.py requirements.lock`.

`make test-latest` prints this before it runs the suite on the newest releases pyproject.toml admits, so a failure
there comes with the list of upgrades that may explain it. Exit status 1 when anything differs."""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path) -> dict[str, str]:
    """{normalised name: version} of every pin in a pip requirements lock."""
    return {_norm(m[1]): m[2] for line in path.read_text().splitlines() if (m := _PIN.match(line))}


def installed() -> dict[str, str]:
    return {_norm(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.exit("usage: python scripts/lock_drift.py requirements.lock")
    want, have = locked(Path(argv[0])), installed()
    rows = [(name, want[name], have.get(name, "(not installed)")) for name in sorted(want)
            if have.get(name) != want[name]]
    rows += [(name, "(not in the lock)", have[name]) for name in sorted(set(have) - set(want))
             if name not in ("pip", "opd-pipeline", "torch") and not name.startswith(("nvidia-", "triton"))]
    if not rows:
        print(f"lock drift: none; this environment has exactly the versions of {argv[0]}")
        return 0
    print(f"lock drift: {len(rows)} package(s) differ from {argv[0]} (locked -> here):")
    for name, old, new in rows:
        print(f"  {name:<28} {old} -> {new}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
