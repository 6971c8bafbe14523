"""TEST DOUBLE of AWS's `libneuronxla` (written by us): import-only placeholders for optimum-neuron's cache."""

from libneuronxla import neuron_cc_cache  # noqa: F401

__version__ = "0.0.0+test.double"
