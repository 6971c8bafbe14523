"""Writing to disk: a full disk or an unwritable place becomes one sentence naming the path and the space needed."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from neuron_export.errors import StorageError
from neuron_export.format import human_bytes

# The OSErrors a user fixes by freeing space or choosing another place; any other OSError is a bug to report.
REASONS = {
    errno.ENOSPC: "no space is left on its device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would be larger than this process may write",
    errno.EACCES: "it is not writable (permission denied)",
    errno.EPERM: "it is not writable (operation not permitted)",
    errno.EROFS: "it is on a read-only filesystem",
}
SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # fixed by freeing space; the others by another place
# Only writing fails with these; a permission error may come from reading a source, so it must name our path.
WRITE_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _ours(name: object, path: Path) -> bool:
    """Whether `name` is `path`, inside it, or inside a hidden `.NAME.*` sibling of it (staging)."""
    if not isinstance(name, (str, Path)):
        return False
    candidate, path = Path(os.path.abspath(name)), Path(os.path.abspath(path))
    if candidate.is_relative_to(path):
        return True
    if not candidate.is_relative_to(path.parent) or candidate == path.parent:
        return False
    return candidate.relative_to(path.parent).parts[0].startswith(f".{path.name}.")


def free_bytes(path: Path) -> int | None:
    """Space we may still use on the filesystem holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _sentence(what: str, path: Path, code: int, needed: int, option: str) -> StorageError:
    free = free_bytes(path)
    room = f"about {human_bytes(needed)} needed" + (f", {human_bytes(free)} free" if free is not None else "")
    fix = f"free space there or pass another {option}" if code in SPACE else f"pass a writable {option}"
    return StorageError(f"Cannot write {what} to {path}: {REASONS[code]} ({room}); {fix}.")


def storage_error(exc: OSError, what: str, path: Path, needed: int, option: str) -> StorageError | None:
    """The one-sentence error for a write of ours that failed for lack of space or permission, else None."""
    return _sentence(what, path, exc.errno, needed, option) if exc.errno in REASONS else None


@contextlib.contextmanager
def writing(what: str, path: Path, needed: int, option: str) -> Iterator[None]:
    """Turn a disk-full or not-writable OSError raised inside into a StorageError naming `path` and `needed`."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in REASONS or (
            exc.errno not in WRITE_ONLY and not any(_ours(name, path) for name in (exc.filename, exc.filename2))
        ):
            raise  # another error, or e.g. an unreadable source file: not a problem of the place we write to
        raise _sentence(what, path, exc.errno, needed, option) from None


def check_room(what: str, path: Path, needed: int, option: str) -> None:
    """Refuse before writing when `needed` bytes clearly do not fit (torch aborts the process on a full disk)."""
    free = free_bytes(path)
    if free is not None and free < needed:
        raise _sentence(what, path, errno.ENOSPC, needed, option)
