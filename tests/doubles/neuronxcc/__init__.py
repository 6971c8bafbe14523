"""TEST DOUBLE of the `neuronxcc` compiler package (written by us): only its version.

Our manifest records it; optimum-neuron 0.4.5 parses it with packaging.version (its exporter refuses a
neuronx-cc older than 2.6), so it must be a valid PEP 440 version.
"""

__version__ = "2.99.0+test.double"
