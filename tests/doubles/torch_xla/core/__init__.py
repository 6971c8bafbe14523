"""TEST DOUBLE of `torch_xla.core` (written by us)."""

from torch_xla.core import xla_model  # noqa: F401
