"""TorchScript tracing on the CPU: the same files as the Neuron backend, for hosts without the SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuron_export import compiler
from neuron_export.build.backends.request import CompileRequest

COMPILER_TYPE = "torchscript-cpu"  # an honest marker: these files run on CPU, not on a NeuronCore


def compiler_version() -> str:
    return compiler.compiler_version("cpu")


def compile(wrapper: Any, example_inputs: list[Any], request: CompileRequest) -> Any:
    import torch

    # strict=False lets the VAE halves return the dicts the runtime expects.
    traced = torch.jit.trace(wrapper, tuple(example_inputs), strict=False, check_trace=False)
    for parameter in traced.parameters():  # like a compiled NEFF: outputs never need autograd (optimum's ControlNet
        parameter.requires_grad_(False)  # __call__ runs without torch.no_grad and turns them into numpy)
    return traced


def load(path: Path) -> Any:
    import torch

    return torch.jit.load(str(path), map_location="cpu")


def validation_skip_reason() -> str | None:
    return None
