"""TEST DOUBLE of `neuronx_distributed.parallel_layers.utils` (written by us): the names the layers use."""

from __future__ import annotations

from typing import Any


def divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def set_tensor_model_parallel_attributes(
    tensor: Any, is_parallel: bool, dim: int, stride: int = 1, num_partitions: int = 1, rank_ordering: Any = None
) -> None:
    """Mark a parameter as split (the attributes ModelBuilder's checkpoint sharding reads, as the real ones)."""
    tensor.tensor_model_parallel = is_parallel
    tensor.partition_dim = dim
    tensor.partition_stride = stride
    tensor.num_partitions = num_partitions
    tensor.rank_ordering = rank_ordering
