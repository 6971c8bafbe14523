"""Upkeep of a remote cache (`cache verify | prune --remote`, `cache push | pull`): every entry checked with
the reads remote_io.py bounds, killed uploads found and removed, the local cache seeded from it and back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from neuron_export.signing import verifies
from neuron_export.store.cache import CacheEntry, ComponentCache
from neuron_export.store.remote import KEY_PATTERN, MARKER_NAME, ORPHAN_SECONDS, RemoteCache
from neuron_export.store.remote_io import BadEntry, stream
from neuron_export.store.storage import writing


def _problem(remote: RemoteCache, key: str) -> str | None:
    """What is wrong with an entry (its files streamed, never past their recorded size), None when intact.
    A signature is checked against its own signer here: who is trusted is each reader's choice."""
    try:
        marker = remote.marker(key)
        if marker is None:
            return "its record.json is missing"
        if marker.signature is not None and not verifies(marker.signed_by or "", marker.signature, key, marker.record):
            return f"its signature by {marker.signed_by} does not match its record"
        for file in marker.record.files:
            name = Path(file.path).name
            try:
                if (
                    stream(remote.fs, remote.root, remote.path(key, marker.upload, name), file.size, None)
                    != file.sha256
                ):
                    return f"{name} does not match its recorded sha256"
            except FileNotFoundError:
                return f"{name} is missing"
    except BadEntry as bad:
        return str(bad)
    return None


def verify(remote: RemoteCache) -> list[tuple[str, str]]:
    """Every entry hash-checked (read, not downloaded to disk); bad ones are removed and returned with the reason."""
    bad = []
    for key in remote.keys():
        with remote.guarded(f"checking {key[:12]}"):
            problem = _problem(remote, key)
            if problem is not None:
                remote.delete(key)
                bad.append((key, problem))
    return bad


def unused_for(remote: RemoteCache, older_than_seconds: float | None) -> list[str]:
    """Keys completed longer ago than that (every key for None): what `prune --remote` would remove."""
    now = time.time()
    return [
        key for key in remote.keys() if older_than_seconds is None or now - remote.uploaded_at(key) > older_than_seconds
    ]


def orphans(remote: RemoteCache) -> Iterator[str]:
    """Upload folders no marker names that are older than a day: uploads that were killed."""
    for folder in remote.fs.glob(remote.path("*", "*")):
        key, upload = folder.rstrip("/").split("/")[-2:]
        if not KEY_PATTERN.fullmatch(key) or upload == MARKER_NAME or upload.startswith("."):
            continue
        marker = None
        try:
            marker = remote.marker(key)
        except BadEntry:
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


def prune(remote: RemoteCache, older_than_seconds: float | None) -> list[str]:
    removed = unused_for(remote, older_than_seconds)
    with remote.guarded("removing"):
        for key in removed:
            remote.delete(key)
        for folder in list(orphans(remote)):
            remote.fs.rm(folder, recursive=True)
    return removed


def push(cache: ComponentCache, remote: RemoteCache) -> list[CacheEntry]:
    """Seed the remote: every intact local entry it has no trusted entry for is uploaded, signed. Returns those uploaded."""
    uploaded = []
    for listed in list(cache.entries()):
        if remote.has_trusted(listed.key):  # an unsigned, untrusted or bad entry is replaced
            continue
        entry = cache.lookup(listed.key)  # hash-checked: a bad local entry is never shared
        if entry is not None:
            remote.upload(entry.key, entry)
            uploaded.append(entry)
    return uploaded


def pull(cache: ComponentCache, remote: RemoteCache) -> list[CacheEntry]:
    """Seed the local cache: every remote entry it does not have, a trusted key signed and whose files match is
    downloaded. Partial downloads of killed pulls and exports (our own temporary folders) are removed first."""
    cache.remove_orphans()
    pulled = []
    for key in remote.keys():
        if cache.peek(key):
            continue
        with writing("the component cache", cache.root, remote.size(key), "--cache-dir"):
            entry = remote.download(key, cache)
        if entry is not None:
            pulled.append(entry)
    return pulled
