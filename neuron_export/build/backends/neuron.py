"""torch_neuronx.trace with explicit neuronx-cc flags per component role and model architecture, and
neuronx-distributed's ModelBuilder for the sharded roles (the T5 encoders, the Flux transformer): weights kept
out of the NEFF, in `weights/tp{rank}_sharded_checkpoint.safetensors` shards written by
ModelBuilder.shard_checkpoint, each rank's slice of the parallel layers above tensor parallelism 1.

The flags come from neuron_export/compiler.py and the role registry (neuron_export/roles/registry.py), never from a model's path or class name (the
reference exporter's substring matching silently drops them for local paths).

ModelBuilder is called as optimum-neuron 0.4.5 calls it (optimum/exporters/neuron/convert.py get_builder,
trace_neuronx, shard_weights): the same construction arguments, one model added under the key `BaseModelInstance`
with the role's fixed compiler string as one string and the example inputs as one bucket, traced without
initializing weights, then sharded into a folder named `weights/`, with LOCAL_WORLD_SIZE=tp while a
tensor-parallel component traces. What differs is ours: the callable that builds the module (at tp 1 our traced
wrapper, the same module the CPU backend traces; above, the role's module made of neuronx-distributed's parallel
layers, roles/parallel.py) and the checkpoint loader (that module's weights, so a fused LoRA and --torch-dtype
are in the shards, where the reference re-reads the source files from disk).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neuron_export import compiler
from neuron_export.build.backends.request import CompileRequest
from neuron_export.errors import BuildError
from neuron_export.files import WEIGHTS_FOLDER, shard_name

COMPILER_TYPE = "neuronx-cc"

# Set while tracing diffusion models: fused softmax in attention, the custom SiLU kernel, and no torchdynamo
# (it does not work with torch_neuronx tracing).
COMPILE_ENVIRONMENT = {"NEURON_FUSE_SOFTMAX": "1", "NEURON_CUSTOM_SILU": "1", "TORCHDYNAMO_DISABLE": "1"}
# The Neuron driver registers a character-device major of this name once a device is present.
DEVICES_FILE = Path("/proc/devices")


def compiler_version() -> str:
    return compiler.compiler_version("neuron")


@contextlib.contextmanager
def compile_environment(local_world_size: int | None = None) -> Iterator[None]:
    """The reference's compile environment; a ModelBuilder trace of a role that says so also gets
    LOCAL_WORLD_SIZE (as optimum-neuron sets it for the Flux transformer, not for its T5)."""
    environment = dict(COMPILE_ENVIRONMENT)
    if local_world_size is not None:
        environment["LOCAL_WORLD_SIZE"] = str(local_world_size)
    saved = {key: os.environ.get(key) for key in environment}
    os.environ.update(environment)
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


def _model_builder(component: str) -> tuple[Any, Any]:
    """neuronx-distributed's ModelBuilder and BaseModelInstance, imported only when a sharded role is built."""
    problem = compiler.neuronx_distributed_error()
    if problem is not None:
        raise BuildError(
            f"--backend neuron traces {component} with neuronx-distributed's ModelBuilder, but neuronx_distributed "
            f"does not import ({problem}); {compiler.NXD_INSTALL_HINT}."
        )
    from neuronx_distributed.trace.model_builder import BaseModelInstance, ModelBuilder

    return ModelBuilder, BaseModelInstance


def parallel_module(wrapper: Any, tensor_parallel_size: int) -> Any:
    """What ModelBuilder's BaseModelInstance builds on each rank. At tp 1 a parallel layer is the plain layer,
    so it is the wrapper as traced on the CPU backend; above 1 it is the role's module made of
    neuronx-distributed's parallel layers (the wrapper's parallel_module: roles/t5.py, roles/flux.py), built
    while ModelBuilder's parallel_state says the rank count and rank."""
    if tensor_parallel_size == 1:
        return wrapper
    build = getattr(wrapper, "parallel_module", None)
    if build is None:
        raise BuildError(f"{type(wrapper).__name__} has no tensor-parallel module (its role cannot be split).")
    return build()


def checkpoint(wrapper: Any, tensor_parallel_size: int = 1) -> dict[str, Any]:
    """ModelBuilder's checkpoint loader: the module's own state dict (the weights as traced: LoRA fused, dtype
    cast), each tensor its own contiguous copy (tied ones included), named as the module ModelBuilder builds
    (parallel_module) names its parameters: above tp 1, the role's parallel_checkpoint (whole tensors; the
    builder cuts each parallel layer's for each rank)."""
    state = wrapper.parallel_checkpoint() if tensor_parallel_size > 1 else wrapper.state_dict()
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def no_process_groups() -> None:
    """ModelBuilder's init_custom_process_group_fn: no groups besides tensor parallelism (as the reference's,
    which only adds a speculative-decoding group, absent here)."""


def compile_sharded(wrapper: Any, example_inputs: list[Any], request: CompileRequest) -> tuple[Any, Any]:
    """Trace through ModelBuilder with the weights left out of the NEFF; returns (traced module, builder).
    The shards are written afterwards by write_shards."""
    model_builder, base_model_instance = _model_builder(request.component)
    tp = request.tensor_parallel_size
    request.workdir.mkdir(parents=True, exist_ok=True)
    builder = model_builder(
        router=None,
        tp_degree=tp,
        pp_degree=1,
        ep_degree=1,
        world_size=tp,
        start_rank_id=0,
        local_ranks_size=tp,
        checkpoint_loader=functools.partial(checkpoint, wrapper, tp),
        compiler_workdir=str(request.workdir),
        debug=False,
        num_cores_per_group=1,
        init_custom_process_group_fn=no_process_groups,
        logical_nc_config=1,
        weights_to_skip_layout_optimization=[],
    )
    builder.add(
        key="BaseModelInstance",  # the reference keys its one model by that class's name
        model_instance=base_model_instance(functools.partial(parallel_module, wrapper, tp), input_output_aliases={}),
        example_inputs=[tuple(example_inputs)],  # one bucket
        compiler_args=" ".join(request.compiler_args),  # ModelBuilder takes one string
        priority_model_idx=0,
    )
    with compile_environment(request.local_world_size):
        traced = builder.trace(initialize_model_weights=False)
    return traced, builder


def write_shards(builder: Any, request: CompileRequest, directory: Path) -> list[str]:
    """ModelBuilder.shard_checkpoint into a `weights/` folder of the work dir (as the reference serializes into
    its component's `weights/`), then each rank's shard moved flat into `directory` (a cache entry keeps them
    flat); returns their paths inside the component folder, in rank order. A missing or extra shard is an error."""
    staging = request.workdir / WEIGHTS_FOLDER
    shutil.rmtree(staging, ignore_errors=True)
    builder.shard_checkpoint(serialize_path=f"{staging}{os.sep}")
    written = sorted(path.name for path in staging.iterdir()) if staging.is_dir() else []
    expected = [shard_name(rank) for rank in range(request.tensor_parallel_size)]
    if sorted(written) != sorted(expected):
        raise BuildError(
            f"ModelBuilder.shard_checkpoint wrote {written or 'nothing'} for {request.component} where "
            f"{expected} were expected (one per rank of tensor parallelism {request.tensor_parallel_size})."
        )
    for name in expected:
        shutil.move(str(staging / name), str(directory / name))
    staging.rmdir()
    return [f"{WEIGHTS_FOLDER}/{name}" for name in expected]


def load(path: Path) -> Any:
    import torch
    import torch_neuronx  # noqa: F401  (registers the Neuron ops TorchScript needs to load)

    from neuron_export.runtime import nxd

    # a ModelBuilder artifact's weights are its shards, given once per rank
    return nxd.initialize(torch.jit.load(str(path)), path)


def validation_skip_reason() -> str | None:
    """Running a compiled NEFF needs a NeuronCore; compiling does not."""
    return None if device_present() else "skipped: no Neuron device"
