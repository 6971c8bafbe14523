"""torch_neuronx.trace with explicit neuronx-cc flags per component role and model architecture.

The flags come from neuron_export/compiler.py and the role registry (neuron_export/roles/registry.py), never from a model's path or class name (the
reference exporter's substring matching silently drops them for local paths).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neuron_export import compiler
from neuron_export.build.backends.request import CompileRequest

COMPILER_TYPE = "neuronx-cc"

# Set while tracing diffusion models: fused softmax in attention, the custom SiLU kernel, and no torchdynamo
# (it does not work with torch_neuronx tracing).
COMPILE_ENVIRONMENT = {"NEURON_FUSE_SOFTMAX": "1", "NEURON_CUSTOM_SILU": "1", "TORCHDYNAMO_DISABLE": "1"}
# The Neuron driver registers a character-device major of this name once a device is present.
DEVICES_FILE = Path("/proc/devices")


def compiler_version() -> str:
    return compiler.compiler_version("neuron")


@contextlib.contextmanager
def compile_environment() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in COMPILE_ENVIRONMENT}
    os.environ.update(COMPILE_ENVIRONMENT)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def device_present() -> bool:
    """A NeuronCore is attached: the driver lists a `neuron` major in /proc/devices."""
    try:
        return any(line.split()[-1:] == ["neuron"] for line in DEVICES_FILE.read_text().splitlines())
    except OSError:
        return False


def compile(wrapper: Any, example_inputs: list[Any], request: CompileRequest) -> Any:
    import torch_neuronx

    request.workdir.mkdir(parents=True, exist_ok=True)
    with compile_environment():
        traced = torch_neuronx.trace(
            wrapper,
            tuple(example_inputs),
            compiler_args=list(request.compiler_args),
            input_output_aliases={},
            inline_weights_to_neff=request.inline_weights,
            cpu_backend=request.cpu_backend,
            compiler_workdir=str(request.workdir),
        )
    for call in request.after_trace:
        # dynamic_batch returns a new module; async_load and lazy_load mark the module in place.
        result = getattr(torch_neuronx, call)(traced)
        if call == "dynamic_batch":
            traced = result
    return traced


def load(path: Path) -> Any:
    import torch
    import torch_neuronx  # noqa: F401  (registers the Neuron ops TorchScript needs to load)

    return torch.jit.load(str(path))


def validation_skip_reason() -> str | None:
    """Running a compiled NEFF needs a NeuronCore; compiling does not."""
    return None if device_present() else "skipped: no Neuron device"
