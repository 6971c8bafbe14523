"""Saving a traced module so that the same cache key gives the same bytes on every host.

torch.jit.save writes, beside each code file, a `.debug_pkl` record: the source ranges of the traced Python
code, with the absolute path and the full text of every file involved (diffusers, transformers, torch and our
wrappers). Those paths differ between hosts, so two hosts building the same key wrote different artifacts.
The archive is rewritten without them by torch's own writer (same zip layout and record alignment); loading
never needs them (torch.jit.load treats them as optional; errors then cite the saved TorchScript code).
Everything else torch writes is already a function of the module: fixed zip timestamps, and a serialization
id derived from the records' checksums.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEBUG_SUFFIX = ".debug_pkl"
# Written by the writer itself at the end (from the records it wrote), so never copied.
SERIALIZATION_ID = ".data/serialization_id"


def host_specific(record: str) -> bool:
    return record.endswith(DEBUG_SUFFIX) or record == SERIALIZATION_ID


def save(module: Any, path: Path) -> None:
    """torch.jit.save(module, path), minus the records that depend on where the code is installed."""
    import torch

    raw = path.parent / f".{path.name}.unstripped" / path.name  # same file name: same archive prefix inside
    raw.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.jit.save(module, str(raw))
        rewrite(raw, path)
    finally:
        raw.unlink(missing_ok=True)
        raw.parent.rmdir()


def rewrite(source: Path, destination: Path) -> None:
    """Copy a TorchScript archive record by record (one record in memory at a time), leaving out host-specific ones."""
    import torch

    reader = torch._C.PyTorchFileReader(str(source))
    writer = torch._C.PyTorchFileWriter(str(destination))
    for record in reader.get_all_records():  # in the order torch wrote them
        if host_specific(record):
            continue
        data = reader.get_record(record)
        writer.write_record(record, data, len(data))
    writer.write_end_of_file()
