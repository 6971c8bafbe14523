"""Bounded reads from a remote cache: a file is streamed with its recorded size as a hard limit (never a byte
written past it), record.json is read up to a cap, and on a file:// remote no symbolic link is followed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from neuron_export.manifest import HASH_CHUNK

MAX_MARKER_BYTES = 4 * 2**20  # a record.json is a few KiB; anything near this is not one of ours
NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)


class BadEntry(Exception):
    """A remote entry that exists but must not be used (its marker or a file does not match)."""


def is_local(fs: Any) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocols))


@contextlib.contextmanager
def open_file(fs: Any, root: str, path: str) -> Iterator[BinaryIO]:
    """A remote file opened for reading; on a local (file://) remote, a symlink anywhere below the root is refused."""
    if not is_local(fs):
        with fs.open(path, "rb", block_size=HASH_CHUNK) as handle:
            yield handle
        return
    relative = path[len(root) :].strip("/").split("/")
    current = root
    for part in relative:
        current = f"{current}/{part}"
        if os.path.islink(current):
            raise BadEntry(f"{'/'.join(relative)} is a symbolic link, which is never followed")
    try:
        descriptor = os.open(path, os.O_RDONLY | NO_FOLLOW)
    except OSError as error:
        if error.errno == errno.ELOOP:  # the last part became a symlink after the check
            raise BadEntry(f"{'/'.join(relative)} is a symbolic link, which is never followed") from None
        raise
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise BadEntry(f"{'/'.join(relative)} is not a regular file")
        yield handle


def read_marker(fs: Any, root: str, path: str) -> bytes:
    """record.json's bytes, read up to MAX_MARKER_BYTES (FileNotFoundError when absent)."""
    with open_file(fs, root, path) as handle:
        data = handle.read(MAX_MARKER_BYTES + 1)
    if len(data) > MAX_MARKER_BYTES:
        raise BadEntry(f"its record.json is larger than {MAX_MARKER_BYTES // 2**20} MiB")
    return data


def stream(fs: Any, root: str, path: str, size: int, target: Path | None) -> str:
    """The file's sha256, reading at most `size` + 1 bytes: a longer file is refused before the byte past its
    recorded size is written (to `target`, created here and never through a link), a shorter one after."""
    name = path.rsplit("/", 1)[-1]
    digest, done = hashlib.sha256(), 0
    with contextlib.ExitStack() as stack:
        out = None
        if target is not None:
            descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NO_FOLLOW, 0o644)
            out = stack.enter_context(os.fdopen(descriptor, "wb"))
        handle = stack.enter_context(open_file(fs, root, path))
        while chunk := handle.read(min(HASH_CHUNK, size + 1 - done)):
            if done + len(chunk) > size:
                raise BadEntry(f"{name} is larger than its recorded {size} bytes")
            if out is not None:
                out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
    if done != size:
        raise BadEntry(f"{name} has {done} bytes, its record says {size}")
    return digest.hexdigest()
