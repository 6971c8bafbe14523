"""`make install`: neuron-export (editable, with its test and dev extras) into the environment this Python runs, keeping
what that environment already has.

- torch: kept when installed (the Neuron SDK's venv pins it; torch-neuronx is built against it). Only where no
  torch is installed is the CPU build 2.13.0 installed, first and pinned (resolved on its own, pip would take
  the CUDA build, GBs).
- The Neuron SDK (torch-neuronx, neuronx-cc, neuronx-distributed, optimum-neuron): never installed, upgraded or
  removed; with it, every package it requires stays at its installed version.
So pip either installs our package beside them, or stops and says which of our requirements conflicts.
Standard library only: it runs before anything of ours is installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CPU_TORCH = "torch==2.13.0"
SDK = ("torch-neuronx", "neuronx-cc", "neuronx-distributed", "optimum-neuron")


def version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirement_name(requirement: str) -> str:
    """The distribution a requirement line names ("torch (==2.8.*)", "numpy>=1.24; extra == 'x'" -> torch, numpy)."""
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0]


def kept(installed: dict[str, str]) -> list[str]:
    """Constraints pinning what must not move: torch, and with the SDK its packages and what they require."""
    names = ["torch"]
    for package in SDK:
        if package in installed:
            names.append(package)
            extras_free = [r for r in metadata.requires(package) or [] if "extra ==" not in r]
            names += [requirement_name(r) for r in extras_free]
    pins = {}
    for name in names:
        found = version(name)
        if found is not None:
            pins[name.lower()] = f"{name}=={found}"
    return sorted(pins.values())


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--quiet", *args]
    if subprocess.run(command, check=False).returncode != 0:
        sys.exit(f"make install: `{' '.join(command[2:])}` failed (see above).")


def main() -> None:
    installed = {name: found for name in SDK if (found := version(name)) is not None}
    torch = version("torch")
    if installed:
        sdk = ", ".join(f"{name} {found}" for name, found in installed.items())
        if torch is None:
            sys.exit(
                f"make install: the Neuron SDK is installed ({sdk}) but torch is not; reinstall the SDK's torch "
                "(AWS's Neuron setup guide) first, since neuron-export never chooses torch for the SDK."
            )
        print(f"make install: keeping the Neuron SDK ({sdk}) and its torch {torch}.")
    elif torch is not None:
        print(f"make install: keeping the installed torch {torch}.")
    else:
        print(f"make install: no torch here; installing the CPU build ({CPU_TORCH}).")
        pip(CPU_TORCH)
    with tempfile.NamedTemporaryFile("w", prefix="neuron-export-keep-", suffix=".txt") as constraints:
        constraints.write("\n".join(kept(installed)) + "\n")
        constraints.flush()
        pip("--constraint", constraints.name, "-e", f"{REPO}[test,dev]")


if __name__ == "__main__":
    main()
