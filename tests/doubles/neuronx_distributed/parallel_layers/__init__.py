"""TEST DOUBLE of `neuronx_distributed.parallel_layers` (written by us): import-only."""

from neuronx_distributed.parallel_layers import parallel_state  # noqa: F401
