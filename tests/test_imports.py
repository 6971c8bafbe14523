"""The package's import graph has no cycle (imports inside functions count), and deploy/ and runtime/ never
import exporter/. Parsed with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "neuron_export"


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name (a package by its own name)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_names(path: Path, name: str, is_package: bool) -> set[str]:
    """Every module name an import statement anywhere in the file names, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it makes Python run: each one it names and, since Python
    runs a package's __init__ before any of its modules, that module's parent packages. The top package is
    left out as a parent (it is the API, imported first by everything); naming it explicitly still counts."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        named = {m for m in imported_names(path, name, path.name == "__init__.py") if m in modules}
        parents = {".".join(m.split(".")[:i]) for m in named for i in range(2, len(m.split(".")))}
        parents -= {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}  # already running
        graph[name] = (named | parents) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph(PACKAGE)) is None


def test_the_checker_finds_a_planted_cycle(tmp_path):
    package = tmp_path / "planted"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from planted.sub import b\n")  # inside a function
    (package / "sub" / "__init__.py").write_text("from planted.sub.c import value\n")
    (package / "sub" / "b.py").write_text("")
    (package / "sub" / "c.py").write_text("from planted import a\nvalue = 1\n")
    cycle = find_cycle(import_graph(package))
    assert cycle is not None and set(cycle) == {"planted.a", "planted.sub", "planted.sub.c"}, cycle


@pytest.mark.parametrize("room", ["deploy", "runtime"])
def test_finished_exports_are_read_without_the_exporter(room):
    graph = import_graph(PACKAGE)
    reached, todo = set(), [name for name in graph if name.startswith(f"neuron_export.{room}")]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(graph.get(name, ()))
    assert not [name for name in reached if name.startswith("neuron_export.exporter")]


def test_importing_the_api_does_not_import_torch():
    code = "import neuron_export, sys; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_module_is_longer_than_400_lines():
    long = {str(path.relative_to(PACKAGE)): lines for path in PACKAGE.rglob("*.py")
            if (lines := len(path.read_text().splitlines())) > 400}
    assert not long
