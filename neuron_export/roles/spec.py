"""What each exported component takes and returns: the contract the component modules describe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TensorSpec:
    """One positional input of a traced module."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"  # or "int64", "bfloat16", "float16" (a --torch-dtype export)
    high: int | None = None  # token ids are drawn from [0, high)
    timestep: bool = False  # drawn from the scheduler's range [0, 1000)


@dataclass(frozen=True)
class Shapes:
    """The static shapes an export is built for: what every role's describe() reads."""

    batch_size: int  # prompts per call
    images_per_prompt: int
    height: int
    width: int
    sequence_length: int | None = None  # text tokens (T5 encoders; None: the tokenizer's model_max_length)
    tensor_parallel_size: int = 1  # ranks a neuronx-distributed role is sharded over (Flux)

    @property
    def image_batch(self) -> int:
        """The batch every component after the text encoders runs at, as the pipelines call them."""
        return self.batch_size * self.images_per_prompt


@dataclass(frozen=True)
class ComponentSpec:
    """The contract of one exported component (see optimum-neuron-format.md)."""

    name: str
    model_type: str
    task: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    static_shapes: dict[str, int] = field(default_factory=dict)
    output_hidden_states: bool = False
    # what load() adds to the model (an IP-Adapter file, its scale)
    add_ons: dict[str, Any] = field(default_factory=dict)
    # what the traced module computes beyond its inputs (a T5's attention mask, from the padding id); in its key
    traced: dict[str, Any] = field(default_factory=dict)


def make_inputs(specs: tuple[TensorSpec, ...], seed: int) -> list[Any]:
    """Random example inputs in the contract's order; a different seed gives fresh inputs for validation."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in specs:
        if spec.dtype == "int64":
            tensors.append(torch.randint(0, spec.high or 2, spec.shape, generator=generator, dtype=torch.int64))
        elif spec.timestep:
            tensors.append((torch.rand(spec.shape, generator=generator) * 999.0).to(getattr(torch, spec.dtype)))
        else:
            tensors.append(torch.randn(spec.shape, generator=generator).to(getattr(torch, spec.dtype)))
    return tensors


def flatten(outputs: Any) -> list[Any]:
    """Every tensor of a nested tuple / list / dict output, in order."""
    if isinstance(outputs, dict):
        return [t for value in outputs.values() for t in flatten(value)]
    if isinstance(outputs, (tuple, list)):
        return [t for value in outputs for t in flatten(value)]
    return [outputs]
