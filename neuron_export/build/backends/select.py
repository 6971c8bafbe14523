"""The module that compiles for each backend (the backend itself is resolved at planning: neuron_export/compiler.py)."""

from __future__ import annotations

from types import ModuleType

from neuron_export.build.backends import cpu, neuron


def get_backend(name: str) -> ModuleType:
    return {"cpu": cpu, "neuron": neuron}[name]
