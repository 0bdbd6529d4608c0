"""The package's import graph has no cycle (imports inside functions included), and importing
the oracle does not load the compiled extension."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import datta_kernels

PKG = pathlib.Path(datta_kernels.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    # compiled modules (datta_kernels._C): nodes without imports of their own
    compiled = {_module_name(p.with_name(p.name.split(".")[0] + ".py")) for p in PKG.rglob("*.so")}
    graph: dict[str, set[str]] = {m: set() for m in (*files, *compiled)}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            if isinstance(node, ast.ImportFrom):
                # `from pkg import a, b`: each submodule, and pkg itself for a name that is not one
                subs = [t for t in targets[:-1] if t in graph]
                graph[mod].update(subs)
                if len(subs) < len(targets) - 1 and targets[-1] in graph:
                    graph[mod].add(targets[-1])
            else:
                graph[mod].update(t for t in targets if t in graph)
    for mod in graph:
        graph[mod].discard(mod)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_graph_is_read():
    g = _graph()
    assert "datta_kernels.nn" in g["datta_kernels.surgery"]
    assert "datta_kernels.reference" in g["datta_kernels.functional"]
    assert "datta_kernels.presets" in g["datta_kernels.reference"]
    # a lazy import inside a function is an edge too
    assert "datta_kernels.reference" in g["datta_kernels.backends.base"]


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_oracle_imports_without_the_extension():
    code = ("import sys, datta_kernels.reference as r, datta_kernels.presets; "
            "print(any(m.endswith('._C') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # importing a submodule runs the package __init__ (which loads the ops): the oracle's own
    # imports must not need more than presets
    g = _graph()
    assert g["datta_kernels.reference"] <= {"datta_kernels.presets"}
    assert g["datta_kernels.presets"] == set()
