"""A component cache shared between hosts at any fsspec URL: s3://bucket/prefix (s3fs; endpoint, region and
credentials the standard AWS way, AWS_ENDPOINT_URL included), file:///mnt/shared/... (NFS), hf://... (a Hub repo).

Layout under the URL, one folder per cache key:

    <key>/<upload id>/model.neuron    the files, uploaded first under a name no reader looks at
    <key>/record.json                 the completion marker: the component record and the upload id, written last

A reader accepts an entry only when its marker exists and every file it names has the recorded size and
sha256, so an upload killed at any moment leaves nothing a reader uses; a bad entry is reported, removed and
rebuilt. The marker is written under a temporary name and moved into place, so it is never seen half-written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

from neuron_export.errors import ExportError, RemoteCacheError
from neuron_export.exporter.cache import CacheEntry, ComponentCache
from neuron_export.exporter.storage import writing
from neuron_export.manifest import HASH_CHUNK, ComponentRecord, sha256_file

MARKER_NAME = "record.json"
MARKER_FORMAT = 1
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
ORPHAN_SECONDS = 24 * 3600  # an upload without a marker this old was killed; younger ones may still be running
LOCAL_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class RemoteMarker(BaseModel):
    """What `<key>/record.json` holds: the upload folder its files are in, and their record."""

    format: int = MARKER_FORMAT
    upload: str
    uploaded_from: str = ""
    record: ComponentRecord


def display_url(url: str) -> str:
    """The URL without any user:password part, for messages and the manifest."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def storage_options(protocol: str) -> dict[str, Any]:
    """Per-protocol options. S3: short connect timeout and few retries, unless the user set AWS's own
    (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE), so an unreachable store is noticed in seconds, not minutes."""
    options: dict[str, Any] = {"skip_instance_cache": True}  # an endpoint changed in the environment must count
    if protocol in ("s3", "s3a"):
        config: dict[str, Any] = {"connect_timeout": 10}
        if not os.environ.get("AWS_MAX_ATTEMPTS") and not os.environ.get("AWS_RETRY_MODE"):
            config["retries"] = {"max_attempts": 2, "mode": "standard"}
        options["config_kwargs"] = config
        options["use_listings_cache"] = False
    return options


def _warn_on_stderr(message: str) -> None:
    print(f"neuron-export: warning: {message}", file=sys.stderr, flush=True)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text[:200]


def _local(error: OSError, root: Path) -> bool:
    """Whether an OSError is the local disk's: no space or read-only, or naming a path in the local cache."""
    if error.errno in LOCAL_WRITE_ERRORS:
        return True
    names = [Path(os.path.abspath(n)) for n in (error.filename, error.filename2) if isinstance(n, (str, Path))]
    return any(name.is_relative_to(os.path.abspath(root)) for name in names)


class _Bad(Exception):
    """A remote entry that exists but must not be used (its marker or a file does not match)."""


class RemoteCache:
    """Read-through and write-back to a shared cache. Unreachable: one warning, then every call answers
    'absent' (the export builds locally), unless `required`, when a RemoteCacheError is raised instead."""

    warned: set[str] = set()  # URLs already reported unreachable by this process

    def __init__(self, url: str, required: bool = False) -> None:
        self.url = display_url(url)
        self.required = required
        self.warn: Callable[[str], None] = _warn_on_stderr
        self.available = True
        self._raw_url = url
        self._fs: Any = None
        self._root = ""

    # -- connection -----------------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, made on first use (making one may already fail: inside `guarded` then)."""
        if self._fs is None:
            import fsspec

            protocol = fsspec.core.split_protocol(self._raw_url)[0] or "file"
            self._fs, root = fsspec.core.url_to_fs(self._raw_url, **storage_options(protocol))
            self._root = root.rstrip("/")
        return self._fs

    def _path(self, *parts: str) -> str:
        """A path under the URL, as the filesystem spells it."""
        return "/".join([self._root if self.fs is not None else "", *parts])

    def _unreachable(self, error: BaseException, doing: str) -> None:
        """The one place a failing remote is handled: an error when required, else one warning and off."""
        if self.required:
            raise RemoteCacheError(
                f"The remote cache {self.url} cannot be used ({doing}: {_short(error)}); check the URL, the network "
                "and the credentials, or drop --remote-cache-required to build locally.") from None
        if self.available and self.url not in RemoteCache.warned:  # once per process: a shape matrix warns once
            RemoteCache.warned.add(self.url)
            self.warn(f"the remote cache {self.url} cannot be used ({doing}: {_short(error)}); "
                      "building locally without it.")
        self.available = False

    @contextlib.contextmanager
    def guarded(self, doing: str) -> Iterator[None]:
        """Any failure of the remote inside becomes `_unreachable` (an error when required, else one warning)."""
        try:
            yield
        except (ExportError, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001  (any failure of any filesystem means: not usable)
            self._unreachable(error, doing)

    def check(self) -> bool:
        """Whether the remote answers (one listing); an error when required and it does not."""
        if not self.available:
            return False
        with self.guarded("connecting"):
            self.fs.exists(self._path(MARKER_NAME))
        return self.available

    # -- reading --------------------------------------------------------------------------------------

    def _marker(self, key: str) -> RemoteMarker | None:
        """The entry's marker, None when absent; _Bad when it is not ours or not valid."""
        if not KEY_PATTERN.fullmatch(key):
            return None
        try:
            raw = self.fs.cat_file(self._path(key, MARKER_NAME))
        except FileNotFoundError:
            return None
        try:
            marker = RemoteMarker.model_validate_json(raw)
        except ValueError:
            raise _Bad("its record.json is not a valid record") from None
        if marker.format != MARKER_FORMAT or not re.fullmatch(r"[0-9a-z-]+", marker.upload) or marker.record.cache_key not in ("", key):
            raise _Bad("its record.json does not describe this key")
        return marker

    def has(self, key: str) -> bool:
        """Whether a completed entry exists (its files are not checked: for plans, which must stay quick)."""
        if not self.available:
            return False
        with self.guarded(f"looking up {key[:12]}"):
            return self.fs.exists(self._path(key, MARKER_NAME))
        return False

    def record(self, key: str) -> ComponentRecord | None:
        """The entry's component record (files not checked), None when absent or bad."""
        marker = None
        with self.guarded(f"reading {key[:12]}"):
            try:
                marker = self._marker(key)
            except _Bad:
                pass
        return marker.record if marker else None

    def download(self, key: str, cache: ComponentCache) -> CacheEntry | None:
        """The entry stored in the local cache, every file hash-checked; None when absent. A bad entry is
        reported, removed from the remote (so it is rebuilt and replaced) and never used."""
        if not self.available:
            return None
        build_dir: Path | None = None
        try:
            marker = self._marker(key)
            if marker is None:
                return None
            build_dir = cache.new_build_dir(key)
            for file in marker.record.files:
                name = Path(file.path).name
                target = build_dir / name
                try:
                    self.fs.get_file(self._path(key, marker.upload, name), str(target))
                except FileNotFoundError:
                    raise _Bad(f"{name} is missing") from None
                if target.stat().st_size != file.size or sha256_file(target) != file.sha256:
                    raise _Bad(f"{name} does not match its recorded sha256")
            record = marker.record.model_copy(update={"origin": "downloaded", "remote": self.url, "cache_key": key})
            entry = cache.store(key, build_dir, record)
            build_dir = None
            return entry
        except _Bad as bad:
            self._reject(key, str(bad))
            return None
        except (ExportError, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001
            if isinstance(error, OSError) and _local(error, cache.root):
                raise  # the local cache is full or not writable: the caller's storage handling names the path
            self._unreachable(error, f"downloading {key[:12]}")
            return None
        finally:
            if build_dir is not None:
                shutil.rmtree(build_dir, ignore_errors=True)

    def _reject(self, key: str, problem: str) -> None:
        self.warn(f"the remote cache entry {key[:12]} in {self.url} is bad ({problem}); it is not used, "
                  "and is removed so it is rebuilt and replaced.")
        self.delete(key)

    # -- writing --------------------------------------------------------------------------------------

    def upload(self, key: str, entry: CacheEntry) -> None:
        """Upload an entry unless the remote has it: files under a fresh upload folder, the marker last."""
        if not self.has(key) and self.available:
            self._upload(key, entry)

    def _upload(self, key: str, entry: CacheEntry) -> None:
        upload = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}"
        record = entry.record.model_copy(update={"origin": None, "remote": None, "cache_key": key})
        marker = RemoteMarker(upload=upload, uploaded_from=socket.gethostname(), record=record)
        with self.guarded(f"uploading {key[:12]}"):
            self.fs.makedirs(self._path(key, upload), exist_ok=True)  # local and NFS; nothing on object stores
            for file in entry.record.files:
                name = Path(file.path).name
                self.fs.put_file(str(entry.directory / name), self._path(key, upload, name))
            temporary = self._path(key, f".{MARKER_NAME}.{upload}")
            self.fs.pipe_file(temporary, marker.model_dump_json(indent=2).encode())
            self.fs.mv(temporary, self._path(key, MARKER_NAME))

    def delete(self, key: str) -> None:
        """The marker first (readers stop accepting the entry at once), then its files."""
        if not KEY_PATTERN.fullmatch(key):
            return
        try:
            self.fs.rm(self._path(key, MARKER_NAME))
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(self._path(key), recursive=True)
        except FileNotFoundError:
            pass

    # -- listing (cache ls / du / verify / prune --remote) --------------------------------------------

    def keys(self) -> list[str]:
        """Every key with a completed entry (a marker)."""
        found: list[str] = []
        with self.guarded("listing"):
            found = self.fs.glob(self._path("*", MARKER_NAME))
        return sorted(key for key in (p.rstrip("/").split("/")[-2] for p in found) if KEY_PATTERN.fullmatch(key))

    def size(self, key: str) -> int:
        """Bytes the entry's files take (from its record)."""
        record = self.record(key)
        return sum(f.size for f in record.files) if record else 0

    def uploaded_at(self, key: str) -> float:
        """When the entry was completed (its marker's time), in seconds since the epoch (0 when unknown)."""
        with self.guarded(f"reading {key[:12]}"):
            return self.fs.modified(self._path(key, MARKER_NAME)).timestamp()
        return 0.0

    def _problem(self, key: str) -> str | None:
        try:
            marker = self._marker(key)
        except _Bad as bad:
            return str(bad)
        if marker is None:
            return "its record.json is missing"
        for file in marker.record.files:
            name = Path(file.path).name
            digest, size = hashlib.sha256(), 0
            try:
                with self.fs.open(self._path(key, marker.upload, name), "rb") as handle:
                    while chunk := handle.read(HASH_CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
            except FileNotFoundError:
                return f"{name} is missing"
            if size != file.size or digest.hexdigest() != file.sha256:
                return f"{name} does not match its recorded sha256"
        return None

    def verify(self) -> list[tuple[str, str]]:
        """Every entry hash-checked (read, not downloaded to disk); bad ones are removed and returned with the reason."""
        bad = []
        for key in self.keys():
            with self.guarded(f"checking {key[:12]}"):
                problem = self._problem(key)
                if problem is not None:
                    self.delete(key)
                    bad.append((key, problem))
        return bad

    def unused_for(self, older_than_seconds: float | None) -> list[str]:
        """Keys completed longer ago than that (every key for None): what `prune --remote` would remove."""
        now = time.time()
        return [key for key in self.keys()
                if older_than_seconds is None or now - self.uploaded_at(key) > older_than_seconds]

    def orphans(self) -> Iterator[str]:
        """Upload folders no marker names that are older than a day: uploads that were killed."""
        for folder in self.fs.glob(self._path("*", "*")):
            key, upload = folder.rstrip("/").split("/")[-2:]
            if not KEY_PATTERN.fullmatch(key) or upload == MARKER_NAME or upload.startswith("."):
                continue
            marker = None
            try:
                marker = self._marker(key)
            except _Bad:
                pass
            if marker is not None and marker.upload == upload:
                continue
            stamp = upload.split("-")[0]
            try:
                started = time.mktime(time.strptime(stamp, "%Y%m%d%H%M%S"))
            except ValueError:
                continue
            if time.time() - started > ORPHAN_SECONDS:
                yield folder

    def prune(self, older_than_seconds: float | None) -> list[str]:
        removed = self.unused_for(older_than_seconds)
        with self.guarded("removing"):
            for key in removed:
                self.delete(key)
            for folder in list(self.orphans()):
                self.fs.rm(folder, recursive=True)
        return removed


def push(cache: ComponentCache, remote: RemoteCache) -> list[CacheEntry]:
    """Seed the remote: every intact local entry it does not have yet is uploaded. Returns those uploaded."""
    uploaded = []
    for listed in list(cache.entries()):
        if remote.has(listed.key):
            continue
        entry = cache.lookup(listed.key)  # hash-checked: a bad local entry is never shared
        if entry is not None:
            remote.upload(entry.key, entry)
            uploaded.append(entry)
    return uploaded


def pull(cache: ComponentCache, remote: RemoteCache) -> list[CacheEntry]:
    """Seed the local cache: every remote entry it does not have is downloaded and hash-checked."""
    pulled = []
    for key in remote.keys():
        if cache.peek(key):
            continue
        with writing("the component cache", cache.root, remote.size(key), "--cache-dir"):
            entry = remote.download(key, cache)
        if entry is not None:
            pulled.append(entry)
    return pulled
