"""A content-addressed cache of built components, so nothing unchanged is compiled twice.

A component's key hashes everything that decides its bytes (weights, config, contract, shapes, compiler
args, backend, compiler and tool versions). Entries are written atomically (built in `tmp/`, renamed into
`components/`), hash-checked whenever they are read, and discarded when bad. Exports are assembled from
entries with hard links.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from neuron_export.files import ARTIFACT_NAME
from neuron_export.manifest import ComponentRecord, sha256_file

CACHE_ENV = "NEURON_EXPORT_CACHE"
RECORD_NAME = "record.json"
# Bump when a wrapper, an input spec, the traced contract or the saved bytes change, so old entries stop matching.
# 3: artifacts are saved without torch's host-specific debug records (backends/archive.py), and CPU
#    artifacts without autograd on their parameters.
# 4: keys hold only what decides the bytes (no architecture, LCM-ness or validation settings; configs without
#    their provenance keys); validation results are stored beside the artifact.
CONTRACT_VERSION = 4


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neuron-export"


class HashIndex:
    """Facts about weight files (sha256, header checked, tensor statistics), computed once per
    (path, size, mtime) and remembered in the cache dir, so an unchanged rerun opens no weight file."""

    def __init__(self, cache_dir: Path) -> None:
        self.path = cache_dir / "weight-hashes.json"
        try:
            self._known: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self._known = {}
        self._dirty = False

    def remember(self, file: Path, fact: str, compute: Callable[[], Any]) -> Any:
        stat = file.stat()
        key = str(file.resolve())
        known = self._known.get(key)
        if not known or known["size"] != stat.st_size or known["mtime_ns"] != stat.st_mtime_ns:
            known = self._known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if fact not in known:
            known[fact] = compute()
            self._dirty = True
        return known[fact]

    def sha256(self, file: Path) -> str:
        return _hub_blob_sha256(file) or self.remember(file, "sha256", lambda: sha256_file(file))

    def save(self) -> None:
        if not self._dirty:
            return
        temporary = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(json.dumps(self._known, indent=1, sort_keys=True))
            temporary.replace(self.path)
        except OSError:  # a full or read-only cache only costs re-hashing next time; builds report it themselves
            temporary.unlink(missing_ok=True)
            return
        self._dirty = False


def _hub_blob_sha256(file: Path) -> str | None:
    """A hub snapshot file links to blobs/<sha256> for LFS files: the hub's own hash, free of charge."""
    if not file.is_symlink():
        return None
    blob = Path(os.readlink(file)).name
    if len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
        return blob
    return None


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
    def __init__(self, root: Path) -> None:
        self.root = root
        self.components = root / "components"
        self.tmp = root / "tmp"

    def entry_dir(self, key: str) -> Path:
        return self.components / key[:2] / key

    def new_build_dir(self, key: str) -> Path:
        """A private directory a worker builds into; `store` renames it into place."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        directory = self.tmp / f"{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        return directory

    def remove_orphans(self) -> None:
        """Build directories of runs that were killed (their process is gone); finished work is never here."""
        if not self.tmp.is_dir():
            return
        for directory in self.tmp.iterdir():
            parts = directory.name.split("-")
            owner = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            if owner is None or not _alive(owner):
                shutil.rmtree(directory, ignore_errors=True)

    def store(self, key: str, build_dir: Path, record: ComponentRecord) -> CacheEntry:
        final = self.entry_dir(key)
        try:
            (build_dir / RECORD_NAME).write_text(record.model_dump_json(indent=2))
            final.parent.mkdir(parents=True, exist_ok=True)
        except BaseException:  # a full or read-only cache: no half-stored build is left in tmp/
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        try:
            build_dir.rename(final)
        except OSError:  # another run stored the same key first: theirs is as good as ours
            shutil.rmtree(build_dir, ignore_errors=True)
        return CacheEntry(key, final, record)

    def peek(self, key: str) -> bool:
        """Whether an entry exists (not checked: for plans, which must stay instant)."""
        return (self.entry_dir(key) / RECORD_NAME).is_file()

    def lookup(self, key: str) -> CacheEntry | None:
        """The entry for `key`, its files hash-checked; a bad entry is discarded and reported missing."""
        directory = self.entry_dir(key)
        entry = self._read(key, directory)
        if entry is None:
            return None
        if self._problem(entry) is not None:
            self.discard(directory)
            return None
        with contextlib.suppress(OSError):  # a read-only cache still serves its entries
            os.utime(directory / RECORD_NAME)  # last use, for `cache prune --older-than`
        return entry

    def _read(self, key: str, directory: Path) -> CacheEntry | None:
        try:
            record = ComponentRecord.model_validate_json((directory / RECORD_NAME).read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            self.discard(directory)
            return None
        return CacheEntry(key, directory, record)

    def _problem(self, entry: CacheEntry) -> str | None:
        for file in entry.record.files:
            path = entry.directory / Path(file.path).name
            if not path.is_file():
                return f"{path.name} is missing"
            if path.stat().st_size != file.size or sha256_file(path) != file.sha256:
                return f"{path.name} does not match its recorded sha256"
        return None

    def discard(self, directory: Path) -> None:
        trash = self.tmp / f"discard-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True, exist_ok=True)
        try:
            directory.rename(trash)  # out of sight at once, then deleted
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def entries(self) -> Iterator[CacheEntry]:
        if not self.components.is_dir():
            return
        for directory in sorted(self.components.glob("*/*")):
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
        return [entry for entry in self.entries()
                if older_than_seconds is None or now - self.last_used(entry) > older_than_seconds]

    def prune(self, older_than_seconds: float | None) -> list[CacheEntry]:
        removed = self.unused_for(older_than_seconds)
        for entry in removed:
            self.discard(entry.directory)
        self.remove_orphans()  # not all of tmp/: a running export's builds are there
        return removed


def link_or_copy(source: Path, destination: Path) -> None:
    """Hard link when the cache and the output share a filesystem; a copy otherwise."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)
