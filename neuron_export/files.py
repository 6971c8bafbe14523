"""The file names an export is made of, and where the component cache lives: defined once for every writer and
reader (importing this imports nothing of ours, so the CLI's quick rerun can use it)."""

import os
from pathlib import Path

ARTIFACT_NAME = "model.neuron"  # each component's TorchScript module, the name optimum-neuron loads
COMPONENT_CONFIG = "config.json"  # each component's config with the `neuron` object
MANIFEST_NAME = "manifest.json"  # neuron-export's record of the export

CACHE_ENV = "NEURON_EXPORT_CACHE"


def default_cache_dir() -> Path:
    """$NEURON_EXPORT_CACHE, else the user's cache folder's neuron-export/."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neuron-export"
