"""The road from the loop to a stage's compute (issue 29): four calls, one store lookup per stage call, and no
import circle inside opd_tasks/. docs/architecture.md draws the same path."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from opd_tasks.config_files import load_config
from opd_tasks.pipeline import run_plain
from storage.store import ArtifactStore

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.prompts_per_iteration=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=40",
         "evaluation.max_new_tokens=40", "data.eval_size=2", "iterations=1", "method=topd",
         "gates.min_headroom=null"]  # two eval prompts cannot show the teacher's headroom


def project_path_to_here() -> list[str]:
    """The project functions on the stack from `run_iteration` down to the caller of this function (frames of
    libraries, e.g. Prefect's engine, left out)."""
    names = [(f.function, Path(f.filename).resolve()) for f in inspect.stack()[2:]]
    names = [fn for fn, path in names if path.is_relative_to(REPO) and not {"tests", "site-packages"} & set(path.parts)]
    names.reverse()
    return names[names.index("run_iteration"):]


def test_from_run_iteration_to_a_stage_compute_is_four_calls(tmp_path: Path, monkeypatch) -> None:
    import opd_tasks.stages.gates as gates

    seen = []
    real = gates.gates

    def traced(ctx, x):
        seen.append(project_path_to_here())
        return real(ctx, x)

    monkeypatch.setattr(gates, "gates", traced)  # the table names the compute by path: resolved on each call
    run_plain(load_config(None, [*SMALL, f"root={tmp_path}"]), log=lambda m: None, progress=False)
    assert seen == [["run_iteration", "__call__", "run", "run_stage"]]  # then the compute itself: 4 calls


def test_one_store_lookup_per_stage_call(tmp_path: Path, monkeypatch) -> None:
    """Every stage call looks its artifact up exactly once (parts, in their own namespace, apart), on the first
    run, where every call misses, and on the rerun, where every call hits."""
    calls: list[tuple[str, str]] = []
    real = ArtifactStore.lookup

    def counting(self, stage, key):
        calls.append((stage, key))
        return real(self, stage, key)

    monkeypatch.setattr(ArtifactStore, "lookup", counting)
    cfg = load_config(None, [*SMALL, f"root={tmp_path}", "orchestration.shards=2"])
    for _ in range(2):
        calls.clear()
        out = run_plain(cfg, log=lambda m: None, progress=False)
        stage_calls = 2 + sum(len(it.stages) for it in out.iterations)  # the eval set and the baseline, then each
        whole = [c for c in calls if not c[0].endswith(".part")]
        assert len(whole) == len(set(whole)) == stage_calls, whole  # once each: every call has its own key


def _imports(path: Path, mods: dict[str, Path]) -> set[str]:
    """The opd_tasks modules `path` imports, at module level or inside functions (outside `if TYPE_CHECKING:`),
    with every parent package of each (importing `a.b.c` runs `a.b` first)."""
    me = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
            and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING" for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip or not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            assert not node.level, f"{path}: a relative import"
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in mods and target != me and not me.startswith(target + "."):
                    out.add(target)
    return out


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` (module -> the modules it imports), as a path that ends where it starts; None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (found := visit(n, [*path, n])):
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_circle_inside_opd_tasks() -> None:
    mods = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (REPO / "opd_tasks").rglob("*.py")}
    graph = {m: _imports(p, mods) for m, p in mods.items()}
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)
    assert not {m for m in graph["opd_tasks.config"] if m.startswith("opd_tasks.stages")}


def test_the_circle_check_finds_a_lazy_circle(tmp_path: Path, monkeypatch) -> None:
    """The check on known cases: a function-local import back into a module, or into a package whose module is
    imported, is a circle; a TYPE_CHECKING import is not."""
    pkg = tmp_path / "opd_tasks"
    (pkg / "p").mkdir(parents=True)
    files = {"a": "import opd_tasks.b\n", "b": "def f():\n    from opd_tasks.a import x\n",
             "p/__init__": "from opd_tasks.p.m import y\n", "p/m": "from opd_tasks.c import z\n",
             "c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from opd_tasks.a import x\n"
                  "def g():\n    from opd_tasks.p import y\n"}
    for name, text in files.items():
        (pkg / f"{name}.py").write_text(text)
    monkeypatch.setattr(__import__(__name__, fromlist=["REPO"]), "REPO", tmp_path)
    mods = {".".join(p.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__"): p
            for p in pkg.rglob("*.py")}
    graph = {m: _imports(p, mods) for m, p in mods.items()}
    assert graph["opd_tasks.c"] == {"opd_tasks.p"}  # not opd_tasks.a: TYPE_CHECKING
    assert find_circle({k: v for k, v in graph.items() if k in ("opd_tasks.a", "opd_tasks.b")}) == [
        "opd_tasks.a", "opd_tasks.b", "opd_tasks.a"]
    assert find_circle({k: v for k, v in graph.items() if k.startswith(("opd_tasks.p", "opd_tasks.c"))}) is not None
    assert find_circle({"x": {"y"}, "y": set()}) is None
