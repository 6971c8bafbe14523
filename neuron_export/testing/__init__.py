"""The tiny example pipelines (tests, demo, conformance): `python -m neuron_export.testing.examples NAME DIR`."""
