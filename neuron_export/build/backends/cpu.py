"""TorchScript tracing on the CPU: the same files as the Neuron backend, for hosts without the SDK.

A sharded role (the T5 encoders, the Flux transformer) is written as ModelBuilder writes it: a module without
weights, whose `nxd_model` is given them from `weights/tp{rank}_sharded_checkpoint.safetensors` by
`nxd_model.initialize` (neuron_export/runtime/nxd.py, the CPU stand-in of neuronx-distributed's runtime). The
shards hold the weights as traced (LoRA fused, --torch-dtype applied) under the traced wrapper's names, as the
Neuron backend's do; on the CPU they are not split: every rank's holds the whole state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuron_export import compiler
from neuron_export.build.backends.request import CompileRequest
from neuron_export.errors import BuildError
from neuron_export.files import WEIGHTS_FOLDER, shard_name

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


def compile_sharded(wrapper: Any, example_inputs: list[Any], request: CompileRequest) -> tuple[Any, dict[str, Any]]:
    """The sharded role's artifact (no weights inside) and the state dict its shards hold; the shards are written
    afterwards by write_shards, as on the Neuron backend."""
    from neuron_export.runtime import nxd

    return nxd.build(wrapper, example_inputs, request.tensor_parallel_size)


def write_shards(state: dict[str, Any], request: CompileRequest, directory: Path) -> list[str]:
    """One shard per rank, written flat into `directory` (a cache entry keeps them flat); returns their paths
    inside the component folder (`weights/tp0_sharded_checkpoint.safetensors`, ...), in rank order."""
    from safetensors.torch import save_file

    ranks = request.tensor_parallel_size
    if ranks < 1:
        raise BuildError(f"{request.component} needs at least one rank of tensor parallelism, not {ranks}.")
    for rank in range(ranks):
        # one metadata key: safetensors writes a map's keys in a per-process order, and shards must be reproducible
        save_file(state, str(directory / shard_name(rank)), metadata={"format": "pt"})
    return [f"{WEIGHTS_FOLDER}/{shard_name(rank)}" for rank in range(ranks)]


def load(path: Path) -> Any:
    """The artifact, a sharded one given its shards (beside it, as in a cache entry, or in weights/)."""
    import torch

    from neuron_export.runtime import nxd

    return nxd.initialize(torch.jit.load(str(path), map_location="cpu"), path)


def validation_skip_reason() -> str | None:
    return None
