"""TEST DOUBLE of `neuronx_distributed.trace` (written by us): ModelBuilder records (model_builder.py);
the older parallel_model_trace path is not available."""

from typing import Any

from neuronx_distributed.trace import hlo_utils, model_builder  # noqa: F401


def parallel_model_trace(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("TEST DOUBLE: neuronx_distributed.trace.parallel_model_trace (tensor parallelism)")


def parallel_model_save(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("TEST DOUBLE: neuronx_distributed.trace.parallel_model_save (tensor parallelism)")


def parallel_model_load(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("TEST DOUBLE: neuronx_distributed.trace.parallel_model_load (tensor parallelism)")
