"""The files we read or copy from a model are hostile input: each must be a regular file inside the model
(or inside the Hub cache snapshot it came from, whose files link into that repository's blobs/), and a
safetensors header must describe tensors that fit the file. Anything else is refused naming the file."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from neuron_export.errors import ExportError

# Bytes per element of the safetensors dtypes; a dtype not listed here is only checked for sane offsets.
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 2**20


def model_roots(root: Path) -> tuple[Path, ...]:
    """Where files read for a model given as `root` may really be: inside it, and, for a Hub cache snapshot,
    in that repository's blobs/ folder."""
    real = Path(os.path.realpath(root))
    for folder in (real, *real.parents):
        if folder.parent.name == "snapshots":
            return real, folder.parent.parent / "blobs"
    return (real,)


def inside(path: Path, roots: tuple[Path, ...]) -> Path:
    """`path` itself, once it is known to lead inside `roots` and to be a regular file (or to be missing,
    which the caller reports in its own words)."""
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in roots):
        raise ExportError(
            f"{path} leads outside the model (to {real}); neuron-export reads only files inside "
            f"{roots[0]}, so copy the file into the model or remove the link."
        )
    if os.path.lexists(real) and not real.is_file():
        raise ExportError(
            f"{path} is not a regular file (it is a folder, device, pipe or socket); neuron-export reads "
            "only regular files from a model, so replace it with the file it should be."
        )
    return path


def files_inside(folder: Path, roots: tuple[Path, ...]) -> list[Path]:
    """Every file under `folder` (which is copied whole into an export), each checked with `inside`; linked
    sub-folders are followed only while they stay inside too."""
    found: list[Path] = []
    seen: set[Path] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        real = Path(os.path.realpath(current))
        if not any(real.is_relative_to(root) for root in roots):
            raise ExportError(
                f"{current} leads outside the model (to {real}); neuron-export copies only files inside "
                f"{roots[0]}, so copy them into the model or remove the link."
            )
        if real in seen:
            continue
        seen.add(real)
        for entry in sorted(current.iterdir()):
            if entry.is_dir():
                pending.append(entry)
            else:
                found.append(inside(entry, roots))
    return found


def read_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header, every tensor checked: a dtype, positive dims, offsets that fit the file
    and match the shape (whether the file holds them all is check_safetensors'). Reads the header only."""
    problem: str | None = None
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > min(size, MAX_HEADER_BYTES):
                raise ValueError("header size out of range")
            header = json.loads(handle.read(header_size))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, struct.error, ValueError, UnicodeDecodeError, RecursionError):
        raise ExportError(
            f"{path} is not a valid safetensors file (its header cannot be read); re-download it."
        ) from None
    if not isinstance(header.get("__metadata__", {}), dict):
        problem = "its __metadata__ is not a JSON object"
    for name, tensor in header.items():
        if name != "__metadata__":
            problem = problem or _tensor_problem(name, tensor)
    if problem is not None:
        raise ExportError(f"{path} is not a valid safetensors file ({problem}); re-download it.")
    return header


def _tensor_problem(name: str, tensor: Any) -> str | None:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("dtype"), str):
        return f"tensor {name} has no dtype"
    shape, offsets = tensor.get("shape"), tensor.get("data_offsets")
    if not isinstance(shape, list) or not all(type(dim) is int and dim > 0 for dim in shape):
        return f"tensor {name} has the shape {shape!r}; every dimension must be a positive whole number"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        return f"tensor {name} has the data offsets {offsets!r}, which are not a range of bytes"
    element = DTYPE_BYTES.get(tensor["dtype"])
    if element is not None and math.prod(shape) * element != offsets[1] - offsets[0]:
        return f"tensor {name}'s shape {shape} does not match its {offsets[1] - offsets[0]} bytes"
    return None
