"""TEST DOUBLE of `neuronx_distributed.trace.model_builder` (written by us): classes to import and
isinstance-check against; building a model with them is not available."""

from typing import Any


class BaseModelInstance:
    """Placeholder: optimum checks `isinstance(model, BaseModelInstance)`; diffusion models never are."""

    def __init__(self, module_cls: Any = None, input_output_aliases: Any = None) -> None:
        self.module_cls = module_cls
        self.input_output_aliases = input_output_aliases


class ModelBuilder:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("TEST DOUBLE: neuronx_distributed ModelBuilder (tensor parallelism)")
