"""The `neuron-export` commands: thin Typer layers over the Python API; the entry point is cli/main.py."""
