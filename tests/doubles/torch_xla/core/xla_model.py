"""TEST DOUBLE of `torch_xla.core.xla_model` (written by us): a single CPU 'device', never an XLA one."""

from typing import Any


def xla_device(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("TEST DOUBLE: torch_xla has no device here")


def get_local_ordinal() -> int:
    return 0


def get_ordinal() -> int:
    return 0


def xrt_world_size() -> int:
    return 1


def mark_step(*args: Any, **kwargs: Any) -> None:
    return None
