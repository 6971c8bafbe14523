"""neuron-export: compile Stable Diffusion pipelines for AWS Inferentia2 / Trainium."""

__version__ = "0.1.0"
