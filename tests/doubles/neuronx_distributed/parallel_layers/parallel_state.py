"""TEST DOUBLE of `neuronx_distributed.parallel_layers.parallel_state` (written by us): tensor parallelism with
ranks as threads of one process.

Each thread has its own state (tensor parallel size and rank; uninitialized: size 1, rank 0, as the real module's
fallback). `ranks.run(tp, fn)` (neuronx_distributed/parallel_layers/ranks.py, double only) starts one thread per
rank sharing one `ThreadGroup`, whose all-reduce and all-gather really combine the ranks' tensors (a barrier,
then each rank reads every rank's tensor, in rank order). The real module's names and signatures:
initialize_model_parallel, destroy_model_parallel, model_parallel_is_initialized, get_tensor_model_parallel_size
/ _rank / _group, set_tensor_model_parallel_size / _rank.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_state = threading.local()


class ThreadGroup:
    """A process group whose members are threads: size(), rank(), all_reduce and all_gather over its ranks."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._barrier = threading.Barrier(size)
        self._slots: list[Any] = [None] * size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return get_tensor_model_parallel_rank()

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        if self._size == 1:
            return [tensor]
        rank = self.rank()
        self._slots[rank] = tensor
        self._barrier.wait()
        gathered = list(self._slots)
        self._barrier.wait()  # nobody writes the next exchange before every rank has read this one
        return gathered

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        gathered = self._exchange(tensor)
        total = gathered[0].clone()
        for other in gathered[1:]:
            total = total + other
        return total

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self._exchange(tensor), dim=dim)


class _SingleGroup(ThreadGroup):
    def __init__(self) -> None:
        super().__init__(1)


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    group: ThreadGroup | None = None,
    **kwargs: Any,
) -> None:
    """This thread's tensor parallelism (rank 0 unless set_tensor_model_parallel_rank says otherwise); `group`
    (double only) is the group shared with the other ranks' threads."""
    if pipeline_model_parallel_size != 1 or expert_model_parallel_size != 1:
        raise NotImplementedError("TEST DOUBLE: only tensor parallelism")
    _state.size = int(tensor_model_parallel_size)
    _state.rank = 0
    _state.group = group if group is not None else ThreadGroup(_state.size)


def destroy_model_parallel() -> None:
    for name in ("size", "rank", "group"):
        if hasattr(_state, name):
            delattr(_state, name)


def model_parallel_is_initialized() -> bool:
    return hasattr(_state, "size")


def get_tensor_model_parallel_size() -> int:
    return int(getattr(_state, "size", 1))


def get_tensor_model_parallel_rank() -> int:
    return int(getattr(_state, "rank", 0))


def set_tensor_model_parallel_size(world_size: int) -> None:
    _state.size = int(world_size)


def set_tensor_model_parallel_rank(rank: int) -> None:
    _state.rank = int(rank)


def get_tensor_model_parallel_group(as_list: bool = False) -> ThreadGroup:
    group = getattr(_state, "group", None)
    return group if group is not None else _SingleGroup()


def initialize_speculative_draft_group(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError("TEST DOUBLE: neuronx_distributed speculative draft groups")
