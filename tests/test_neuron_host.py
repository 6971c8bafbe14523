"""`make install` in the Neuron SDK's own virtualenv keeps its torch: checked in a fresh venv holding stand-in
`torch` 2.8.0 and `torch-neuronx` 2.8.0.2.10 (which requires torch==2.8.*, as AWS's does), built here as wheels.

The venv sees this machine's packages (--system-site-packages: diffusers, transformers, ... are there already,
so the install is quick), and the stand-in torch in it shadows the machine's torch 2.13."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TORCH = '__version__ = "2.8.0"\n'
# Like AWS's: built against one torch, it refuses any other on import.
TORCH_NEURONX = """\
import torch

if not torch.__version__.startswith("2.8."):
    raise ImportError(f"torch-neuronx 2.8.0.2.10 was built for torch 2.8, not {torch.__version__}")
__version__ = "2.8.0.2.10"
"""


def wheel(folder: Path, name: str, version: str, module: str, source: str, requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel holding one package `module` whose __init__ is `source`."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    metadata = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", *(f"Requires-Dist: {r}\n" for r in requires)]
    )
    files = {
        f"{module}/__init__.py": source,
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n"
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name_in_wheel, text in files.items():
            archive.writestr(name_in_wheel, text)
    return path


def run(*args: object, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=env or os.environ.copy(),
    )


def test_make_install_in_a_neuron_sdk_venv_keeps_its_torch(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    stand_ins = [
        wheel(wheels, "torch", "2.8.0", "torch", TORCH),
        wheel(wheels, "torch-neuronx", "2.8.0.2.10", "torch_neuronx", TORCH_NEURONX, ("torch==2.8.*",)),
    ]
    venv = tmp_path / "sdk-venv"
    assert run(sys.executable, "-m", "venv", "--system-site-packages", venv).returncode == 0
    python = venv / "bin" / "python"
    installed = run(python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", *stand_ins)
    assert installed.returncode == 0, installed.stderr
    check = (
        "import torch, torch_neuronx; from importlib.metadata import version; "
        "print(torch.__version__, version('torch'), torch_neuronx.__version__)"
    )
    assert run(python, "-c", check).stdout.split() == ["2.8.0", "2.8.0", "2.8.0.2.10"]  # the SDK venv, as a host has it

    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"  # activated, as the README says
    make = run("make", "install", f"PYTHON={python}", env=env)
    assert make.returncode == 0, make.stdout[-2000:] + make.stderr[-3000:]
    after = run(python, "-c", check)
    assert after.returncode == 0, after.stderr  # torch_neuronx still imports
    assert after.stdout.split() == ["2.8.0", "2.8.0", "2.8.0.2.10"]
    assert "keeping the Neuron SDK (torch-neuronx 2.8.0.2.10) and its torch 2.8.0" in make.stdout
    cli = run(venv / "bin" / "neuron-export", "--help", env=env)
    assert cli.returncode == 0 and "sd-xl" in cli.stdout, cli.stderr
    assert run(python, "-c", "import neuron_export; print(neuron_export.__file__)").stdout.startswith(str(REPO))
