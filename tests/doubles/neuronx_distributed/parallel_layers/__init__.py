"""TEST DOUBLE of `neuronx_distributed.parallel_layers` (written by us): parallel_state with ranks as threads,
the layers (ColumnParallelLinear, RowParallelLinear, ParallelEmbedding) computing on the CPU with each rank's
slice of the weights, and the collectives they use (mappings.py)."""

from neuronx_distributed.parallel_layers import layers, mappings, parallel_state, utils  # noqa: F401
