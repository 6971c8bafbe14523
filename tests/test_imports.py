"""What the import-linter contracts (pyproject.toml, tests/test_import_contracts.py) cannot say: importing the
API stays light, and a subpackage's __init__ holds only its docstring (importing any module of a package runs
its __init__, an import the contracts would not see)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "neuron_export"


def test_importing_the_api_does_not_import_torch():
    code = "import neuron_export, sys; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_subpackage_init_files_hold_only_a_docstring():
    inits = [path for path in PACKAGE.rglob("__init__.py") if path.parent != PACKAGE]
    assert inits
    for path in inits:
        body = ast.parse(path.read_text()).body
        assert len(body) <= 1 and all(
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body
        ), f"{path.relative_to(PACKAGE)} holds more than a docstring"


def test_every_module_is_named_in_the_readme_architecture_tree():
    readme = (PACKAGE.parent / "README.md").read_text()
    tree = readme.split("\n## Architecture\n", 1)[1].split("```", 2)[1]
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py" or path.parent == PACKAGE:
            assert path.name in tree, f"{path.relative_to(PACKAGE)} is not in the README's Architecture tree"
