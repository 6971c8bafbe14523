"""Choosing a backend: `auto` resolved against the installed SDK, and the module that compiles for each."""

from __future__ import annotations

from types import ModuleType

from neuron_export.backends import cpu, neuron
from neuron_export.errors import ExportError

INSTALL_HINT = (
    "install it on an inf2/trn1 host with pip install 'neuron-export[neuron]' from AWS's Neuron package "
    "repository, or pass --backend cpu to trace with TorchScript on this machine"
)


def neuron_sdk_error() -> str | None:
    """None when torch_neuronx imports; otherwise why not (PyPI's placeholder package raises on import)."""
    try:
        import torch_neuronx  # noqa: F401
    except Exception as exc:  # the placeholder raises ImportError("WRONG PACKAGE ..."); others may raise more
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return None


def resolve_backend(requested: str) -> str:
    """'auto' becomes 'neuron' when the SDK imports; a missing SDK is an error, never a silent CPU build."""
    if requested == "cpu":
        return "cpu"
    problem = neuron_sdk_error()
    if problem is None:
        return "neuron"
    flag = "--backend neuron" if requested == "neuron" else "--backend auto"
    raise ExportError(f"{flag} needs the AWS Neuron SDK, but torch_neuronx does not import ({problem}); {INSTALL_HINT}.")


def get_backend(name: str) -> ModuleType:
    return {"cpu": cpu, "neuron": neuron}[name]
