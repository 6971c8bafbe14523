"""TEST DOUBLE of the `neuronxcc` compiler package: only its version, for the manifest."""

__version__ = "2.99.0.test"
