"""The value a backend compiles from: everything besides the module and its example inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CompileRequest:
    """How one component is compiled: what the backend needs besides the module and its example inputs."""

    component: str
    compiler_args: tuple[str, ...]
    inline_weights: bool
    cpu_backend: bool  # trace without a NeuronCore (a CPU-only compile host)
    after_trace: tuple[str, ...]  # torch_neuronx calls on the traced module before saving, in order
    workdir: Path
    tensor_parallel_size: int = 1  # ranks of a neuronx-distributed ModelBuilder component (sharded roles)
    local_world_size: int | None = None  # LOCAL_WORLD_SIZE while it traces (the role's local_world_size), or unset
