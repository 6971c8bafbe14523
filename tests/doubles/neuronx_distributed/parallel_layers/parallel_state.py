"""TEST DOUBLE of `neuronx_distributed.parallel_layers.parallel_state` (written by us): no model parallelism."""

from typing import Any


def model_parallel_is_initialized() -> bool:
    return False


def get_tensor_model_parallel_size() -> int:
    return 1


def get_tensor_model_parallel_rank() -> int:
    return 0


def initialize_speculative_draft_group(*args: Any, **kwargs: Any) -> None:
    raise NotImplementedError("TEST DOUBLE: neuronx_distributed speculative draft groups")
