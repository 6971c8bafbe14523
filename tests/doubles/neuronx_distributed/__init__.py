"""TEST DOUBLE of AWS's `neuronx_distributed` (written by us): import-only placeholders.

optimum-neuron 0.4.5's exporter imports it at module top (optimum/exporters/neuron/convert.py,
model_configs.py, model_wrappers.py, config.py). Diffusion exports at tensor_parallel_size 1 never call it;
anything that does call it fails loudly.
"""

from neuronx_distributed import parallel_layers, trace  # noqa: F401

__version__ = "0.0.0+test.double"
