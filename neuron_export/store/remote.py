"""A component cache shared between hosts at any fsspec URL: s3://bucket/prefix (s3fs; endpoint, region and
credentials the standard AWS way, AWS_ENDPOINT_URL included), file:///mnt/shared/... (NFS), hf://... (a Hub repo).

Layout under the URL, one folder per cache key:

    <key>/<upload id>/model.neuron    the files, uploaded first under a name no reader looks at
    <key>/record.json                 the completion marker: the component record and the upload id, written last

A reader accepts an entry only when its marker exists, is signed by a key it trusts (remote_trust.py; the
signature covers the key, the component, its input shapes and every file's name, size and sha256), names the
key, component and shapes it is fetched for, and every file streams in with the recorded size and sha256
(remote_io.py: never a byte past the size). Nothing is loaded, validated or stored before that. So an upload
killed at any moment leaves nothing a reader uses; an unsigned or untrusted entry is skipped (one warning) and
built here; a bad one is reported, removed when the remote allows it, and rebuilt. The marker is written under a
temporary name and moved into place, so it is never seen half-written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel

from neuron_export.errors import ExportError, RemoteCacheError
from neuron_export.files import ARTIFACT_NAME
from neuron_export.manifest import ComponentRecord
from neuron_export.signing import public_text, sign, verifies
from neuron_export.store.cache import CacheEntry, ComponentCache
from neuron_export.store.remote_io import BadEntry as _Bad
from neuron_export.store.remote_io import is_local, read_marker, stream
from neuron_export.store.remote_trust import Trust

MARKER_NAME = "record.json"
MARKER_FORMAT = 1
KEY_PATTERN = re.compile(r"[0-9a-f]{64}")
SHA256_PATTERN = KEY_PATTERN
ORPHAN_SECONDS = 24 * 3600  # an upload without a marker this old was killed; younger ones may still be running
LOCAL_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


class RemoteMarker(BaseModel):
    """What `<key>/record.json` holds: the upload folder its files are in, and their record."""

    format: int = MARKER_FORMAT
    upload: str
    uploaded_from: str = ""
    record: ComponentRecord
    signed_by: str | None = None  # the uploader's public key (ed25519:...); None: unsigned
    signature: str | None = None  # over signing.signed_message(key, record)


@dataclass(frozen=True)
class Wanted:
    """What an export fetches a key for: the record must name this component and these inputs."""

    component: str
    inputs: tuple[tuple[str, tuple[int, ...], str], ...]


def display_url(url: str) -> str:
    """The URL without any user:password part, for messages and the manifest."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    return urlunsplit(parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else "")))


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
    """Whether an OSError is the local disk's: naming a path in the local cache, or (naming none) no space or
    read-only. An error naming a path of a file:// remote is the remote's."""
    names = [Path(os.path.abspath(n)) for n in (error.filename, error.filename2) if isinstance(n, (str, Path))]
    if names:
        return any(name.is_relative_to(os.path.abspath(root)) for name in names)
    return error.errno in LOCAL_WRITE_ERRORS


class _Untrusted(Exception):
    """A remote entry no trusted key signed: skipped, never removed (it may be someone else's to use)."""


class RemoteCache:
    """Read-through and write-back to a shared cache. Unreachable: one warning, then every call answers
    'absent' (the export builds locally), unless `required`, when a RemoteCacheError is raised instead."""

    warned: set[str] = set()  # URLs already reported (unreachable, holding untrusted entries) by this process

    def __init__(self, url: str, required: bool = False, trust: Trust = Trust()) -> None:
        self.url = display_url(url)
        self.required = required
        self.trust = trust
        self._trusted: frozenset[str] | None = None
        self.warn: Callable[[str], None] = _warn_on_stderr
        self.available = True
        self._raw_url = url
        self._fs: Any = None
        self.root = ""

    # -- connection -----------------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, made on first use (making one may already fail: inside `guarded` then)."""
        if self._fs is None:
            import fsspec

            protocol = fsspec.core.split_protocol(self._raw_url)[0] or "file"
            self._fs, root = fsspec.core.url_to_fs(self._raw_url, **storage_options(protocol))
            self.root = root.rstrip("/")
        return self._fs

    def path(self, *parts: str) -> str:
        """A path under the URL, as the filesystem spells it."""
        return "/".join([self.root if self.fs is not None else "", *parts])

    def _unreachable(self, error: BaseException, doing: str) -> None:
        """The one place a failing remote is handled: an error when required, else one warning and off."""
        if self.required:
            raise RemoteCacheError(
                f"The remote cache {self.url} cannot be used ({doing}: {_short(error)}); check the URL, the network "
                "and the credentials, or drop --remote-cache-required to build locally."
            ) from None
        if self.available and self.url not in RemoteCache.warned:  # once per process: a shape matrix warns once
            RemoteCache.warned.add(self.url)
            self.warn(
                f"the remote cache {self.url} cannot be used ({doing}: {_short(error)}); building locally without it."
            )
        self.available = False

    @contextlib.contextmanager
    def guarded(self, doing: str) -> Iterator[None]:
        """Any failure of the remote inside becomes `_unreachable` (an error when required, else one warning)."""
        try:
            yield
        except (ExportError, KeyboardInterrupt):
            raise
        except Exception as error:
            self._unreachable(error, doing)

    def check(self) -> bool:
        """Whether the remote answers (one lookup); an error when required and it does not. Required, and this
        host uploads: a small probe is also written and removed, so an unwritable remote fails before any build."""
        if not self.available:
            return False
        with self.guarded("connecting"):
            self.fs.exists(self.path(MARKER_NAME))
        if self.available and self.required and self.trust.can_upload:
            with self.guarded("writing a probe"):
                probe = self.path(f".neuron-export-probe-{uuid.uuid4().hex[:12]}")
                if is_local(self.fs):  # a new shared directory is made by the first upload, as uploads do
                    self.fs.makedirs(self.root, exist_ok=True)
                self.fs.pipe_file(probe, b"")
                self.fs.rm(probe)
        return self.available

    def _warn_once(self, topic: str, message: str) -> None:
        if f"{topic} {self.url}" not in RemoteCache.warned:
            RemoteCache.warned.add(f"{topic} {self.url}")
            self.warn(message)

    # -- reading --------------------------------------------------------------------------------------

    def marker(self, key: str) -> RemoteMarker | None:
        """The entry's marker, None when absent; _Bad when it is not ours or not valid."""
        if not KEY_PATTERN.fullmatch(key):
            return None
        try:
            raw = read_marker(self.fs, self.root, self.path(key, MARKER_NAME))
        except FileNotFoundError:
            return None
        try:
            marker = RemoteMarker.model_validate_json(raw)
        except ValueError:
            raise _Bad("its record.json is not a valid record") from None
        if (
            marker.format != MARKER_FORMAT
            or not re.fullmatch(r"[0-9a-z-]+", marker.upload)
            or marker.record.cache_key != key
        ):
            raise _Bad("its record.json does not describe this key")
        names = [Path(file.path).name for file in marker.record.files]
        if not names:
            raise _Bad("its record.json lists no files")
        if (
            ARTIFACT_NAME not in names
            or len(set(names)) != len(names)
            or any(file.size < 0 or not SHA256_PATTERN.fullmatch(file.sha256) for file in marker.record.files)
        ):
            raise _Bad(f"its record.json does not list one {ARTIFACT_NAME} and distinct files with sizes and sha256")
        return marker

    def _checked(self, key: str, wanted: Wanted | None) -> RemoteMarker | None:
        """The marker, once its signature is checked against the trusted keys (_Untrusted otherwise) and it names
        what it is fetched for (_Bad otherwise); None when absent."""
        marker = self.marker(key)
        if marker is None:
            return None
        if self._trusted is None:
            self._trusted = self.trust.trusted_keys()
        if marker.signed_by is None or marker.signature is None:
            if not self.trust.allow_unsigned:
                raise _Untrusted(f"{marker.record.name} entry {key[:12]} is unsigned")
        elif marker.signed_by not in self._trusted:
            if not self.trust.allow_unsigned:
                raise _Untrusted(f"{marker.record.name} entry {key[:12]} is signed by {marker.signed_by}")
        elif not verifies(marker.signed_by, marker.signature, key, marker.record):
            raise _Bad(f"its signature by {marker.signed_by} does not match its record")
        if wanted is not None:
            inputs = tuple((t.name, tuple(t.shape), t.dtype) for t in marker.record.inputs)
            if marker.record.name != wanted.component or inputs != wanted.inputs:
                raise _Bad(
                    f"its record is for {marker.record.name}, not {wanted.component}"
                    if marker.record.name != wanted.component
                    else f"its record's inputs are not the {wanted.component} inputs this key is fetched for"
                )
        return marker

    def _skip_untrusted(self, why: str) -> None:
        self._warn_once(
            "untrusted",
            f"the remote cache {self.url} holds entries no trusted key signed ({why}); they are "
            "skipped and built here: pass --remote-cache-trusted-key with their signer's public key, or "
            "--remote-cache-allow-unsigned for a private bucket.",
        )

    def has(self, key: str) -> bool:
        """Whether a completed entry exists (its files are not checked: for plans, which must stay quick)."""
        if not self.available:
            return False
        with self.guarded(f"looking up {key[:12]}"):
            return self.fs.exists(self.path(key, MARKER_NAME))
        return False

    def record(self, key: str) -> ComponentRecord | None:
        """The entry's component record (files not checked), None when absent or bad."""
        marker = None
        with self.guarded(f"reading {key[:12]}"):
            try:
                marker = self.marker(key)
            except _Bad:
                pass
        return marker.record if marker else None

    def has_trusted(self, key: str) -> bool:
        """Whether an entry a trusted key signed exists (its record read and checked; its files not)."""
        if not self.available:
            return False
        with self.guarded(f"looking up {key[:12]}"):
            try:
                return self._checked(key, None) is not None
            except (_Bad, _Untrusted):
                return False
        return False

    def download(self, key: str, cache: ComponentCache, wanted: Wanted | None = None) -> CacheEntry | None:
        """The entry stored in the local cache, its signature checked before any file is fetched and every file
        hash-checked as it streams in; None when absent or untrusted (skipped). A bad entry is reported,
        removed from the remote when it allows (so it is rebuilt and replaced) and never used."""
        if not self.available:
            return None
        build_dir: Path | None = None
        try:
            marker = self._checked(key, wanted)
            if marker is None:
                return None
            build_dir = cache.new_build_dir(key)
            for file in marker.record.files:
                name = Path(file.path).name
                try:
                    digest = stream(
                        self.fs, self.root, self.path(key, marker.upload, name), file.size, build_dir / name
                    )
                except FileNotFoundError:
                    raise _Bad(f"{name} is missing") from None
                if digest != file.sha256:
                    raise _Bad(f"{name} does not match its recorded sha256")
            by = "signer" if marker.signature is not None and marker.signed_by in (self._trusted or ()) else "uploader"
            signed = by == "signer"
            record = marker.record.model_copy(
                update={
                    "origin": "downloaded",
                    "remote": self.url,
                    "cache_key": key,
                    "signed_by": marker.signed_by if signed else None,
                    "signature": marker.signature if signed else None,
                    "validation": marker.record.validation.model_copy(update={"by": by}),
                }
            )
            entry = cache.store(key, build_dir, record)
            build_dir = None
            return entry
        except _Untrusted as untrusted:
            self._skip_untrusted(str(untrusted))
            return None
        except _Bad as bad:
            self._reject(key, str(bad))
            return None
        except (ExportError, KeyboardInterrupt):
            raise
        except Exception as error:
            if isinstance(error, OSError) and _local(error, cache.root):
                raise  # the local cache is full or not writable: the caller's storage handling names the path
            self._unreachable(error, f"downloading {key[:12]}")
            return None
        finally:
            if build_dir is not None:
                shutil.rmtree(build_dir, ignore_errors=True)

    def _reject(self, key: str, problem: str) -> None:
        """One warning line; removing the entry may fail (a read-only remote): then it is only skipped."""
        try:
            self.delete(key)
            outcome = "and is removed so it is rebuilt and replaced"
        except Exception as error:
            outcome = f"and could not be removed there ({_short(error)}): it is built here; remove it from {self.url}"
        self.warn(f"the remote cache entry {key[:12]} in {self.url} is bad ({problem}); it is not used, {outcome}.")

    # -- writing --------------------------------------------------------------------------------------

    def upload(self, key: str, entry: CacheEntry) -> None:
        """Upload an entry, signed, unless the remote has one a trusted key signed (an untrusted or bad one is
        replaced): files under a fresh upload folder, the marker last. Without a signing key nothing is
        uploaded, unless unsigned entries are allowed."""
        if not self.available or not self.trust.can_upload:  # a host without a signing key only reads
            return
        if not self.has_trusted(key) and self.available:
            self._upload(key, entry)

    def _upload(self, key: str, entry: CacheEntry) -> None:
        upload = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:12]}"
        record = entry.record.model_copy(
            update={"origin": None, "remote": None, "cache_key": key, "signed_by": None, "signature": None}
        )
        private = self.trust.private_key()
        marker = RemoteMarker(
            upload=upload,
            uploaded_from=socket.gethostname(),
            record=record,
            signed_by=public_text(private) if private is not None else None,
            signature=sign(private, key, record) if private is not None else None,
        )
        with self.guarded(f"uploading {key[:12]}"):
            self.fs.makedirs(self.path(key, upload), exist_ok=True)  # local and NFS; nothing on object stores
            for file in entry.record.files:
                name = Path(file.path).name
                self.fs.put_file(str(entry.directory / name), self.path(key, upload, name))
            temporary = self.path(key, f".{MARKER_NAME}.{upload}")
            self.fs.pipe_file(temporary, marker.model_dump_json(indent=2).encode())
            self.fs.mv(temporary, self.path(key, MARKER_NAME))

    def delete(self, key: str) -> None:
        """The marker first (readers stop accepting the entry at once), then its files."""
        if not KEY_PATTERN.fullmatch(key):
            return
        try:
            self.fs.rm(self.path(key, MARKER_NAME))
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(self.path(key), recursive=True)
        except FileNotFoundError:
            pass

    # -- listing (cache ls / du / verify / prune --remote) --------------------------------------------

    def keys(self) -> list[str]:
        """Every key with a completed entry (a marker)."""
        found: list[str] = []
        with self.guarded("listing"):
            found = self.fs.glob(self.path("*", MARKER_NAME))
        return sorted(key for key in (p.rstrip("/").split("/")[-2] for p in found) if KEY_PATTERN.fullmatch(key))

    def size(self, key: str) -> int:
        """Bytes the entry's files take (from its record)."""
        record = self.record(key)
        return sum(f.size for f in record.files) if record else 0

    def uploaded_at(self, key: str) -> float:
        """When the entry was completed (its marker's time), in seconds since the epoch (0 when unknown)."""
        with self.guarded(f"reading {key[:12]}"):
            return self.fs.modified(self.path(key, MARKER_NAME)).timestamp()
        return 0.0
