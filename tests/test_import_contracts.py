"""The import-linter contracts in pyproject.toml (run by `make quality`) hold for the package, and they catch
what they are for: run against a copy of the package with one import planted, `lint-imports` fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]

# (module to plant in, the line planted, the contract it breaks); inside a function, where an import still counts
PLANTS = {
    "runtime imports planning": (
        "runtime/reading.py",
        "import neuron_export.planning.jobs",
        "deploy, runtime, store, roles and testing never plan or build",
    ),
    "the store imports the build": (
        "store/cache.py",
        "import neuron_export.build.worker",
        "deploy, runtime, store, roles and testing never plan or build",
    ),
    "planning imports torch": ("planning/source.py", "import torch", "Planning imports no torch"),
    "planning imports the build": ("planning/keys.py", "import neuron_export.build.parent", "The CLI is the top"),
    "a cycle": ("errors.py", "from neuron_export.cli import main", "No import cycle"),
}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the project's contracts, reading the package found first on PYTHONPATH=root."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [*LINT_IMPORTS, "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "neuron_export", tmp_path / "neuron_export", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_package_keeps_its_import_contracts(package_copy):
    done = lint_imports(package_copy)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("plant", PLANTS)
def test_a_planted_import_breaks_its_contract(package_copy, plant):
    module, line, contract = PLANTS[plant]
    path = package_copy / "neuron_export" / module
    path.write_text(path.read_text() + f"\n\ndef _planted() -> None:\n    {line}\n")
    done = lint_imports(package_copy)
    assert done.returncode != 0
    broken = [row for row in done.stdout.splitlines() if " BROKEN" in row]
    assert any(row.startswith(contract) for row in broken), done.stdout  # the copy was read: the worktree keeps them
