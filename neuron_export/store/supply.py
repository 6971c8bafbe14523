"""Where each component of an export comes from: the local cache, another export on this host, the remote
cache, or a build. Each cache key is built at most once per host: whoever holds its lock (one file lock per
key under `<cache>/locks/`) looks it up, downloads or builds it; the others wait, then take it from the
local cache. The kernel releases a lock when its holder dies, even by SIGKILL, so a crash never blocks the
others: the next one finds the entry missing and builds it itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from neuron_export.events import Stage
from neuron_export.manifest import ComponentRecord
from neuron_export.store.cache import CacheEntry, ComponentCache
from neuron_export.store.remote import RemoteCache, Wanted
from neuron_export.store.storage import writing

if TYPE_CHECKING:
    from neuron_export.planning.jobs import Job

# Where each component came from in this run (the `origin` --json reports per component).
BUILT, CACHED, DOWNLOADED = "built", "cached", "downloaded"
ORIGINS = (BUILT, CACHED, DOWNLOADED)

Notify = Callable[["Job", Stage, "ComponentRecord | None"], None]  # a job enters a stage (cached, waiting, ...)
Builder = Callable[[list["Job"]], dict[str, CacheEntry]]  # builds jobs and stores them in the cache


def key_lock(cache: ComponentCache, key: str) -> Any:
    """The per-host lock of one cache key, or None when the cache cannot hold lock files (read-only: it
    still serves its entries, and a build there fails on its own with the storage sentence)."""
    from filelock import FileLock

    directory = cache.root / "locks"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return FileLock(str(directory / f"{key}.lock"))


def _try(lock: Any) -> bool:
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    except OSError:  # a lock file we may not open: build unlocked rather than not at all
        return True
    return True


def supply(
    jobs: list[Job], cache: ComponentCache, remote: RemoteCache | None, notify: Notify, build: Builder
) -> tuple[dict[str, CacheEntry], dict[str, str]]:
    """Every job's cache entry and where it came from (one of ORIGINS). Built components are uploaded to
    `remote` after their locks are released, so exports waiting here go on while the upload runs."""
    entries: dict[str, CacheEntry] = {}
    origins: dict[str, str] = {}
    for job in jobs:
        entry = cache.lookup(job.cache_key)  # hash-checked; a bad entry is discarded and rebuilt
        if entry is not None:
            entries[job.component], origins[job.component] = entry, CACHED
            notify(job, Stage.CACHED, entry.record)
    missing = [job for job in jobs if job.component not in entries]
    announced: set[str] = set()
    held: dict[str, Any] = {}  # component -> its acquired lock (None: no lock could be made)
    try:
        while missing:
            for job in missing:
                if job.component not in held:
                    lock = key_lock(cache, job.cache_key)
                    if lock is None or _try(lock):
                        held[job.component] = lock
            waiting = [job for job in missing if job.component not in held]
            for job in waiting:
                if job.component not in announced:
                    announced.add(job.component)
                    notify(job, Stage.WAITING, None)
            if not held:  # everything left is being built by others: wait for one, holding nothing
                job = waiting[0]
                lock = key_lock(cache, job.cache_key)
                if lock is not None:
                    lock.acquire()
                held[job.component] = lock
            mine = [job for job in missing if job.component in held]
            to_build = []
            for job in mine:
                entry = cache.lookup(job.cache_key)  # finished by another export while we waited
                origin = CACHED
                if entry is None and remote is not None and remote.has(job.cache_key):
                    notify(job, Stage.DOWNLOADING, None)
                    with writing("the component cache", cache.root, job.weights.bytes, "--cache-dir"):
                        entry, origin = remote.download(job.cache_key, cache, wanted(job)), DOWNLOADED
                if entry is None:
                    to_build.append(job)
                    continue
                entries[job.component], origins[job.component] = entry, origin
                notify(job, Stage.DOWNLOADED if origin == DOWNLOADED else Stage.CACHED, entry.record)
            built = build(to_build) if to_build else {}
            for component, entry in built.items():
                entries[component], origins[component] = entry, BUILT
            _release(held)
            if remote is not None:
                for job in to_build:
                    if job.component in built and remote.available:
                        notify(job, Stage.UPLOADING, None)
                        remote.upload(job.cache_key, built[job.component])
            missing = [job for job in missing if job.component not in entries]
    finally:
        _release(held)
    return entries, origins


def wanted(job: Job) -> Wanted:
    """What a remote entry fetched for this job must say it is: this component, with these compiled inputs."""
    return Wanted(job.component, tuple((t.name, tuple(t.shape), t.dtype) for t in job.spec.inputs))


def _release(held: dict[str, Any]) -> None:
    for lock in held.values():
        if lock is not None and lock.is_locked:
            lock.release()
    held.clear()
