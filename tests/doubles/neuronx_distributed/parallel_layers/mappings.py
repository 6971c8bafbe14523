"""TEST DOUBLE of `neuronx_distributed.parallel_layers.mappings` (written by us): the collectives the layers use,
done by the thread group (parallel_state.py). Forward only."""

from __future__ import annotations

from typing import Any

import torch

from neuronx_distributed.parallel_layers import parallel_state


def _group(process_group: Any) -> Any:
    return process_group if process_group is not None else parallel_state.get_tensor_model_parallel_group()


def copy_to_tensor_model_parallel_region(input_: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    return input_


def reduce_from_tensor_model_parallel_region(input_: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    return _group(process_group).all_reduce(input_)


def gather_from_tensor_model_parallel_region(input_: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    return _group(process_group).all_gather(input_, dim=-1)


def scatter_to_tensor_model_parallel_region(input_: torch.Tensor, process_group: Any = None) -> torch.Tensor:
    group = _group(process_group)
    return input_.chunk(group.size(), dim=-1)[group.rank()].contiguous()
