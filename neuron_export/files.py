"""The file names an export is made of, and where the component cache lives: defined once for every writer and
reader (importing this imports nothing of ours, so the CLI's quick rerun can use it)."""

import os
import re
from pathlib import Path

ARTIFACT_NAME = "model.neuron"  # each component's TorchScript module, the name optimum-neuron loads
COMPONENT_CONFIG = "config.json"  # each component's config with the `neuron` object
MANIFEST_NAME = "manifest.json"  # neuron-export's record of the export

CACHE_ENV = "NEURON_EXPORT_CACHE"

# A sharded role's weights, outside its module, named as neuronx-distributed names them: one file per rank of
# tensor parallelism in the component's `weights/` folder (kept flat in a cache entry).
WEIGHTS_FOLDER = "weights"
SHARD_PATTERN = re.compile(r"tp(\d+)_sharded_checkpoint\.safetensors")


def shard_name(rank: int) -> str:
    return f"tp{rank}_sharded_checkpoint.safetensors"


def shard_files(folder: Path) -> list[Path]:
    """The tp{rank} shards in a folder, in rank order (tp10 after tp9)."""
    found = [
        (int(match.group(1)), path)
        for path in folder.glob("tp*_sharded_checkpoint.safetensors")
        if (match := SHARD_PATTERN.fullmatch(path.name))
    ]
    return [path for _, path in sorted(found)]


def component_shards(artifact: Path) -> list[Path]:
    """The shards beside a component's artifact: flat (a cache entry) or in its `weights/` folder (an export)."""
    return shard_files(artifact.parent) or shard_files(artifact.parent / WEIGHTS_FOLDER)


def default_cache_dir() -> Path:
    """$NEURON_EXPORT_CACHE, else the user's cache folder's neuron-export/."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neuron-export"
