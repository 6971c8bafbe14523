"""The tool version, on its own so every layer can record it without importing the package's API."""

__version__ = "0.1.0"
