"""The Python API from every place a script runs: a file (no __main__ guard, as people write them), `python -c`,
a heredoc on stdin (a Makefile target's or CI step's shape), `python -m`, and a notebook cell; and a worker that
cannot start (an import failing in the fork server) reported as that failure, never as an interrupt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Unguarded on purpose: multiprocessing would run it again in each worker, exporting again there.
SCRIPT = """\
import neuron_export

result = neuron_export.export("sd", model={model!r}, backend="cpu", output="out", components="vae_decoder")
print("origins:", result.origins)
"""
# A notebook cell: IPython's shell (the one Jupyter's kernel runs) executes it in a __main__ without __file__.
IPYTHON_CELL = """\
from IPython.core.interactiveshell import InteractiveShell

InteractiveShell.instance().run_cell(open("cell.py").read()).raise_error()
"""
# The same without IPython: the cell's code in a fresh __main__ module that has no __file__, as a kernel's has.
BARE_CELL = """\
import sys, types

main = types.ModuleType("__main__")
sys.modules["__main__"] = main
exec(compile(open("cell.py").read(), "<cell>", "exec"), main.__dict__)
"""
TIMEOUT = 600  # a worker that re-ran an unguarded script waited for its own parent's lock: fail, do not hang


def run(
    args: list[str],
    cwd: Path,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def assert_exported(process: subprocess.CompletedProcess, cwd: Path) -> None:
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.strip().splitlines()[-1] == "origins: {'vae_decoder': 'built'}", process.stdout
    manifest = json.loads((cwd / "out" / "manifest.json").read_text())
    assert list(manifest["components"]) == ["vae_decoder"]


@pytest.mark.parametrize("shape", ["file", "-c", "heredoc", "-m"])
def test_the_api_runs_from_a_script(shape, tiny_model, tmp_path):
    code = SCRIPT.format(model=str(tiny_model("sd")))
    (tmp_path / "export_tiny.py").write_text(code)
    args = {
        "file": [sys.executable, "export_tiny.py"],
        "-c": [sys.executable, "-c", code],
        "heredoc": [sys.executable, "-"],
        "-m": [sys.executable, "-m", "export_tiny"],
    }[shape]
    process = run(args, tmp_path, stdin=code if shape == "heredoc" else None, env={"PYTHONPATH": str(tmp_path)})
    assert_exported(process, tmp_path)


@pytest.mark.parametrize("runner", ["ipython", "bare"])
def test_the_api_runs_from_a_notebook_cell(runner, tiny_model, tmp_path):
    if runner == "ipython":
        pytest.importorskip("IPython")
    (tmp_path / "cell.py").write_text(SCRIPT.format(model=str(tiny_model("sd"))))
    process = run([sys.executable, "-c", IPYTHON_CELL if runner == "ipython" else BARE_CELL], tmp_path)
    assert_exported(process, tmp_path)


@pytest.mark.parametrize(
    "error", ["ImportError", "OSError"]
)  # an OSError (a broken shared library) used to kill the fork server
def test_a_fork_server_that_cannot_import_torch_is_reported_as_that(error, tiny_model, tmp_path):
    planted = tmp_path / "planted" / "torch"
    planted.mkdir(parents=True)
    (planted / "__init__.py").write_text(f'raise {error}("libtorch_cpu.so: cannot open shared object file")\n')
    args = [
        sys.executable,
        "-m",
        "neuron_export",
        "sd",
        "-m",
        str(tiny_model("sd")),
        "--backend",
        "cpu",
        "-o",
        "out",
        "--components",
        "vae_decoder",
    ]
    env = {"PYTHONPATH": str(tmp_path / "planted")}  # the exporter itself never imports torch: only its workers do

    process = run(args, tmp_path, env=env)
    assert process.returncode == 1, process
    last = process.stderr.strip().splitlines()[-1]
    assert last == (
        f"neuron-export: error: The worker building vae_decoder could not start: importing torch failed "
        f"({error}: libtorch_cpu.so: cannot open shared object file); fix that installation "
        "(NEURON_EXPORT_DEBUG=1 shows the traceback); nothing was written."
    ), process.stderr
    assert "Traceback" not in process.stderr and "interrupted" not in process.stderr
    assert not (tmp_path / "out").exists()

    debug = run(args, tmp_path, env={**env, "NEURON_EXPORT_DEBUG": "1"})
    assert debug.returncode == 1
    assert "The worker's traceback:" in debug.stderr and str(planted / "__init__.py") in debug.stderr
