"""TEST DOUBLE of AWS's `neuronx_distributed` (written by us).

optimum-neuron 0.4.5's exporter imports it at module top (optimum/exporters/neuron/convert.py, model_configs.py,
model_wrappers.py, config.py) and traces its NxD components (the diffusion T5 encoders, the Flux transformer)
with `trace.model_builder.ModelBuilder`: that one records every call and writes the files the real one writes
(trace/model_builder.py). The rest is import-only: parallel_model_trace and friends fail loudly.
"""

from neuronx_distributed import parallel_layers, trace  # noqa: F401

__version__ = "0.0.0+test.double"
