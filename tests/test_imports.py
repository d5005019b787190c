"""The library's import graph has no circles, counting the imports inside functions too (they are still
dependencies; a deferred import only hides a circle), but not ``if TYPE_CHECKING:`` blocks (annotations only).
And the runtime layers never import the config loader: they receive plain config objects; the module paths of
before the package layout still import (``owlore.MOVED``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("owlore.optim", "owlore.layerwise", "owlore.parallel", "owlore.trainer")
"""Packages (and modules) that run inside training; they receive config objects and never load one."""


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "owlore").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    out = set()
    for n in ast.walk(tree):
        if id(n) in skip:
            continue
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0 and n.module.startswith("owlore"):
            for a in n.names:
                out.add(f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in known else n.module)
        elif isinstance(n, ast.Import):
            out |= {a.name for a in n.names if a.name.startswith("owlore")}
    return out & known


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, set(mods)) - {m} for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                out.append(sorted([v, *comp]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_runtime_never_imports_the_config_loader():
    graph = _graph()

    def reach(m: str, seen: set[str]) -> set[str]:
        for d in graph.get(m, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    runtime = [m for m in graph if m in RUNTIME or m.startswith(tuple(f"{p}." for p in RUNTIME))]
    assert len(runtime) > 15
    for m in runtime:
        assert "owlore.run.recipe" not in reach(m, set()), m


def test_the_old_module_paths_still_import_with_a_warning():
    import importlib
    import warnings

    import owlore

    for old, new in owlore.MOVED.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        assert not caught or f"{old} moved to {new}" in str(caught[0].message)  # warned once, on first import


def test_only_entry_point_modules_parse_arguments_or_print():
    """The library logs; argparse and print() belong to the ``python -m`` entry points (``__main__.py``) and the
    entry points' shared error path (``owlore/cli.py``)."""
    root = Path(__file__).resolve().parents[1] / "owlore"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "__main__.py" or path == root / "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(root)}:{node.lineno} print")
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if "argparse" in names:
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} argparse")
    assert offenders == []
