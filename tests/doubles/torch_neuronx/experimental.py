"""TEST DOUBLE of `torch_neuronx.experimental` (written by us): core placement, recorded only."""

from __future__ import annotations

from typing import Any


def set_neuron_cores(trace: Any, start_nc: int = -1, nc_count: int = -1) -> None:
    """Pins a traced module to NeuronCores [start_nc, start_nc + nc_count); in place. Recorded only."""
    import torch_neuronx

    torch_neuronx._load_event("set_neuron_cores", trace, start_nc=start_nc, nc_count=nc_count)
