"""A content-addressed cache of built components, so nothing unchanged is compiled twice.

A component's key hashes everything that decides its bytes (weights, config, contract, shapes, compiler
args, backend, compiler and tool versions). Entries are written atomically (built in `tmp/`, renamed into
`components/`), hash-checked whenever they are read, and discarded when bad. Exports are assembled from
entries with hard links.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuron_export.errors import ExportError
from neuron_export.files import ARTIFACT_NAME
from neuron_export.manifest import ComponentRecord, sha256_file

RECORD_NAME = "record.json"
MARKER_NAME = ".neuron-export-entry"  # in every entry we store: a folder under components/ without it is not ours
TMP_PREFIX = "neuron-export-"  # every folder we make in tmp/ starts so; anything else there is not ours
RECORD_LIMIT = 16 * 2**20  # a record.json larger than this is not one of ours
# Bump when a wrapper, an input spec, the traced contract or the saved bytes change, so old entries stop matching.
# 3: artifacts are saved without torch's host-specific debug records (build/backends/archive.py), and CPU
#    artifacts without autograd on their parameters.
# 4: keys hold only what decides the bytes (no architecture, LCM-ness or validation settings; configs without
#    their provenance keys); validation results are stored beside the artifact.
CONTRACT_VERSION = 4


class HashIndex:
    """Facts about weight files (sha256, header checked, tensor statistics), computed once per
    (path, size, mtime) and remembered in the cache dir, so an unchanged rerun opens no weight file."""

    def __init__(self, cache_dir: Path, hub_cache: Path | None = None) -> None:
        self.path = cache_dir / "weight-hashes.json"
        self.hub_cache = hub_cache  # the Hub cache whose blobs are named by their sha256 (None: the default one)
        try:
            self._known: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._known = {}
        self._dirty = False

    def remember(self, file: Path, fact: str, compute: Callable[[], Any]) -> Any:
        stat = file.stat()
        key = str(file.resolve())
        # ctime and inode too: a file rewritten with its old size and mtime put back is still hashed again.
        identity = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns,
            "inode": stat.st_ino,
        }
        known = self._known.get(key)
        if not known or any(known.get(name) != value for name, value in identity.items()):
            known = self._known[key] = dict(identity)
        if fact not in known:
            known[fact] = compute()
            self._dirty = True
        return known[fact]

    def sha256(self, file: Path) -> str:
        return _hub_blob_sha256(file, self.hub_cache) or self.remember(file, "sha256", lambda: sha256_file(file))

    def save(self) -> None:
        if not self._dirty:
            return
        temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(self._known, indent=1, sort_keys=True))
            temporary.replace(self.path)
        except OSError:  # a full or read-only cache only costs re-hashing next time; builds report it themselves
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            return
        self._dirty = False


def _hub_blob_sha256(file: Path, hub_cache: Path | None) -> str | None:
    """A Hub snapshot file links to blobs/<sha256> for LFS files: the Hub's own hash, free of charge, but only
    when the link really ends in that Hub cache's blobs/ folder (any other link is read and hashed)."""
    if not file.is_symlink():
        return None
    real = Path(os.path.realpath(file))
    name = real.name
    if len(name) != 64 or any(c not in "0123456789abcdef" for c in name) or real.parent.name != "blobs":
        return None
    if hub_cache is None:
        from huggingface_hub.constants import HF_HUB_CACHE

        hub_cache = Path(HF_HUB_CACHE)
    repository = real.parent.parent  # models--org--name, which holds blobs/ and snapshots/
    inside = repository.parent == Path(os.path.realpath(hub_cache.expanduser()))
    return name if inside and repository.name.startswith("models--") and real.is_file() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def component_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    key: str
    directory: Path
    record: ComponentRecord

    @property
    def artifact(self) -> Path:
        return self.directory / ARTIFACT_NAME


class ComponentCache:
    """Entries live in `components/<key[:2]>/<key>/`, each with our marker; build and trash folders in `tmp/`
    carry our prefix. Anything else under the cache is not ours: never used, listed or deleted."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.components = root / "components"
        self.tmp = root / "tmp"
        self._held: list[int] = []  # open record.json files shared-locked for this cache's life: prune skips them
        weakref.finalize(self, _close_all, self._held)

    def entry_dir(self, key: str) -> Path:
        return self.components / key[:2] / key

    def new_build_dir(self, key: str) -> Path:
        """A private directory a worker builds into; `store` renames it into place."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        directory = self.tmp / f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        return directory

    def work_dir(self, key: str) -> Path:
        """A scratch directory named like a build directory, so remove_orphans keeps it while we live."""
        return self.tmp / f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-work"

    def remove_orphans(self) -> None:
        """Our build and trash directories of runs that were killed (their process is gone); anything in tmp/
        without our prefix is someone else's and stays."""
        if not self.tmp.is_dir():
            return
        for directory in self.tmp.iterdir():
            if not directory.name.startswith(TMP_PREFIX) or directory.is_symlink():
                continue
            parts = directory.name.removeprefix(TMP_PREFIX).split("-")
            owner = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            if owner is None or not _alive(owner):
                shutil.rmtree(directory, ignore_errors=True)

    def store(self, key: str, build_dir: Path, record: ComponentRecord) -> CacheEntry:
        final = self.entry_dir(key)
        try:
            (build_dir / RECORD_NAME).write_text(record.model_dump_json(indent=2))
            (build_dir / MARKER_NAME).write_text(
                "made by neuron-export: `neuron-export cache prune` may delete this entry\n"
            )
            final.parent.mkdir(parents=True, exist_ok=True)
        except BaseException:  # a full or read-only cache: no half-stored build is left in tmp/
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        try:
            build_dir.rename(final)
        except OSError:  # another run stored the same key first: theirs is as good as ours
            shutil.rmtree(build_dir, ignore_errors=True)
            if not self._hold(final):
                raise ExportError(
                    f"{final} is in the way of a cache entry and was not made by neuron-export; move it "
                    "away or pass another --cache-dir."
                ) from None
            entry = self._read(key, final)
            if entry is None:
                raise ExportError(
                    f"{final} is in the way of a cache entry and was not made by neuron-export; move it "
                    "away or pass another --cache-dir."
                ) from None
            return entry
        self._hold(final)
        return CacheEntry(key, final, record)

    def _hold(self, directory: Path) -> bool:
        """Share-lock the entry's record.json until this cache object goes away, so `prune` leaves it alone
        while an export assembles from it; False when the entry is not (or no longer) there."""
        path = directory / RECORD_NAME
        try:
            handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            with contextlib.suppress(OSError):  # a filesystem without locks still serves its entries
                fcntl.flock(handle, fcntl.LOCK_SH)
            if os.fstat(handle).st_ino != os.stat(path, follow_symlinks=False).st_ino:
                raise FileNotFoundError(path)  # pruned between the open and the lock
        except OSError:
            os.close(handle)
            return False
        self._held.append(handle)
        return True

    def peek(self, key: str) -> bool:
        """Whether an entry exists (not checked: for plans, which must stay instant)."""
        return (self.entry_dir(key) / RECORD_NAME).is_file()

    def lookup(self, key: str) -> CacheEntry | None:
        """The entry for `key`, its files hash-checked and held for this cache's life; a bad entry is discarded
        and reported missing."""
        directory = self.entry_dir(key)
        if not self._hold(directory):
            return None
        entry = self._read(key, directory)
        if entry is None:
            return None
        if self._problem(entry) is not None:
            self.discard(directory, held=True)
            return None
        with contextlib.suppress(OSError):  # a read-only cache still serves its entries
            os.utime(directory / RECORD_NAME)  # last use, for `cache prune --older-than`
        return entry

    def _read(self, key: str, directory: Path) -> CacheEntry | None:
        """The entry in `directory` when it is ours: our marker (or, from before markers, our record naming this
        key); a marked entry with a damaged record is discarded, anything else is left alone."""
        path = directory / RECORD_NAME
        if directory.is_symlink() or path.is_symlink() or not path.is_file() or path.stat().st_size > RECORD_LIMIT:
            return None
        marked = (directory / MARKER_NAME).is_file() and not (directory / MARKER_NAME).is_symlink()
        try:
            record = ComponentRecord.model_validate_json(path.read_bytes())
        except ValueError:
            if marked:
                self.discard(directory)
            return None
        except OSError:
            return None
        if not marked and (record.cache_key != key or directory != self.entry_dir(key)):
            return None
        return CacheEntry(key, directory, record)

    def _problem(self, entry: CacheEntry) -> str | None:
        for file in entry.record.files:
            path = entry.directory / Path(file.path).name
            if path.is_symlink() or not path.is_file():
                return f"{path.name} is missing"
            if path.stat().st_size != file.size or sha256_file(path) != file.sha256:
                return f"{path.name} does not match its recorded sha256"
        return None

    def discard(self, directory: Path, held: bool = False) -> bool:
        """Remove one of our entries unless an export holds it (`held`: only this cache does); False if kept."""
        record = directory / RECORD_NAME
        handle = None
        with contextlib.suppress(OSError):
            handle = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            if held:
                self._release(directory)
            if handle is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False  # an export is assembling from it
                except OSError:
                    pass
            trash = self.tmp / f"{TMP_PREFIX}discard-{uuid.uuid4().hex[:8]}"
            try:
                self.tmp.mkdir(parents=True, exist_ok=True)
                directory.rename(trash)  # out of sight at once, then deleted
            except OSError:
                return False
        finally:
            if handle is not None:
                os.close(handle)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _release(self, directory: Path) -> None:
        """Drop this cache's own holds on `directory` (it is about to discard the entry itself)."""
        with contextlib.suppress(OSError):
            inode = os.stat(directory / RECORD_NAME, follow_symlinks=False).st_ino
            for handle in [h for h in self._held if os.fstat(h).st_ino == inode]:
                self._held.remove(handle)
                os.close(handle)

    def entries(self) -> Iterator[CacheEntry]:
        if not self.components.is_dir():
            return
        for directory in sorted(self.components.glob("*/*")):
            name = directory.name
            if len(name) != 64 or any(c not in "0123456789abcdef" for c in name) or directory.parent.name != name[:2]:
                continue  # not named by one of our keys: not ours
            entry = self._read(directory.name, directory)
            if entry is not None:
                yield entry

    def last_used(self, entry: CacheEntry) -> float:
        return (entry.directory / RECORD_NAME).stat().st_mtime

    def size(self, entry: CacheEntry) -> int:
        return sum(p.stat().st_size for p in entry.directory.iterdir() if p.is_file())

    def linked_bytes(self, entry: CacheEntry) -> int:
        """Bytes of the entry's files that an export also hard-links: removing the entry frees none of them."""
        return sum(p.stat().st_size for p in entry.directory.iterdir() if p.is_file() and p.stat().st_nlink > 1)

    def verify(self) -> list[tuple[CacheEntry, str]]:
        """Every entry hash-checked; bad ones are discarded and returned with the reason."""
        bad = []
        for entry in list(self.entries()):
            problem = self._problem(entry)
            if problem is not None:
                self.discard(entry.directory)
                bad.append((entry, problem))
        return bad

    def unused_for(self, older_than_seconds: float | None) -> list[CacheEntry]:
        """Entries not used for that long (every entry for None): what `prune` would remove."""
        now = time.time()
        return [
            entry
            for entry in self.entries()
            if older_than_seconds is None or now - self.last_used(entry) > older_than_seconds
        ]

    def prune(self, older_than_seconds: float | None) -> list[CacheEntry]:
        """Remove unused entries, except those a running export holds; returns the ones removed."""
        removed = [entry for entry in self.unused_for(older_than_seconds) if self.discard(entry.directory)]
        self.remove_orphans()  # not all of tmp/: a running export's builds are there
        return removed


def _close_all(handles: list[int]) -> None:
    for handle in handles:
        with contextlib.suppress(OSError):
            os.close(handle)
    handles.clear()


def link_or_copy(source: Path, destination: Path) -> None:
    """Hard link when the cache and the output share a filesystem; a copy otherwise."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
