"""`neuron-export cache ls | du | prune | verify [--remote]`, `cache push | pull` and `cache keygen`: look after the
component cache and the shared remote cache, and make the key pair that signs its entries (registered by cli/main.py)."""

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from neuron_export.cli.options import (
    Json,
    RemoteCacheAllowUnsigned,
    RemoteCacheSigningKey,
    RemoteCacheTrustedKey,
    RemoteCacheUrl,
)
from neuron_export.errors import ExitCode, ExportError

if TYPE_CHECKING:
    from neuron_export.manifest import ComponentRecord
    from neuron_export.store.cache import ComponentCache
    from neuron_export.store.remote import RemoteCache

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

cache_app = typer.Typer(
    help="Inspect, clean and share the component cache (--remote: the shared remote cache).", no_args_is_help=True
)
CacheDir = typer.Option(
    None, "--cache-dir", help="Component cache [default: $NEURON_EXPORT_CACHE or ~/.cache/neuron-export]."
)
Remote = typer.Option(
    False,
    "--remote",
    help="Act on the remote cache (--remote-cache URL or $NEURON_EXPORT_REMOTE_CACHE), not the local one.",
)


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m' -> seconds."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in DURATION_UNITS or not number.replace(".", "", 1).isdigit():
        raise ExportError(f"--older-than {text!r} is not a duration; write it like 30d, 12h or 90m.")
    return float(number) * DURATION_UNITS[unit]


def _cache(cache_dir: Path | None) -> "ComponentCache":
    from neuron_export.files import default_cache_dir
    from neuron_export.store.cache import ComponentCache

    return ComponentCache(cache_dir or default_cache_dir())


def _remote(
    url: str | None,
    command: str,
    signing_key: Path | None = None,
    trusted: list[str] | None = None,
    allow_unsigned: bool = False,
) -> "RemoteCache":
    """The remote cache a command names, with whom it trusts; it must be reachable (these commands have nothing
    else to do)."""
    import os

    from neuron_export.planning.config import REMOTE_ENV, check_remote_url
    from neuron_export.store.remote import RemoteCache
    from neuron_export.store.remote_trust import resolve_trust

    where = "--remote-cache"
    if not url and os.environ.get(REMOTE_ENV):
        url, where = os.environ[REMOTE_ENV], REMOTE_ENV
    if not url:
        raise ExportError(f"cache {command} needs a remote cache; pass --remote-cache URL or set {REMOTE_ENV}.")
    try:
        check_remote_url(url, where)
        trust = resolve_trust(signing_key, trusted or [], allow_unsigned)
    except ValueError as exc:
        raise ExportError(f"{exc}.") from None
    remote = RemoteCache(url, required=True, trust=trust)
    remote.check()
    return remote


def _shapes(record: "ComponentRecord") -> str:
    return " ".join(f"{t.name}{tuple(t.shape)}" for t in record.inputs)


def _local_only(remote_cache: str | None, cache: "ComponentCache") -> None:
    """--remote-cache names the remote; only --remote acts on it. Say which cache this command acts on."""
    if remote_cache:
        print(
            f"neuron-export: note: acting on the local cache {cache.root}; add --remote to act on {remote_cache}.",
            file=sys.stderr,
            flush=True,
        )


ModelFilter = typer.Option(
    None, "--model", help="Only entries built from a model whose hub id or path contains this text."
)


@cache_app.command("ls")
def ls_command(
    cache_dir: Path | None = CacheDir,
    remote: bool = Remote,
    remote_cache: RemoteCacheUrl = None,
    model: str | None = ModelFilter,
    json_output: Json = False,
) -> None:
    """One line per cached component: key, component, backend, size, last use (--remote: upload time), model, shapes."""
    import time

    from neuron_export.cli.render import Sink
    from neuron_export.format import human_bytes

    rows = []
    if remote:
        shared = _remote(remote_cache, "ls --remote")
        for key in shared.keys():
            record = shared.record(key)
            if record is not None:
                rows.append((key, record, shared.size(key), "uploaded", shared.uploaded_at(key)))
    else:
        cache = _cache(cache_dir)
        _local_only(remote_cache, cache)
        rows = [
            (entry.key, entry.record, cache.size(entry), "used", cache.last_used(entry)) for entry in cache.entries()
        ]
    if model is not None:
        rows = [row for row in rows if model.lower() in (row[1].model or "").lower()]
    sink = Sink(json_output)
    sink.result(
        [
            {
                "key": key,
                "component": record.name,
                "model": record.model,
                "backend": record.backend,
                "size_bytes": size,
                when: time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(stamp)),
                "inputs": [t.model_dump() for t in record.inputs],
            }
            for key, record, size, when, stamp in rows
        ]
    )
    if sink.json_mode:
        return
    for key, record, size, when, stamp in rows:
        print(
            f"{key[:12]}  {record.name:<14} {record.backend:<6} {human_bytes(size):>10}  "
            f"{when} {time.strftime('%Y-%m-%d %H:%M', time.localtime(stamp))}  {record.model or '-'}  {_shapes(record)}"
        )


@cache_app.command("rm")
def rm_command(
    keys: list[str] = typer.Argument(..., metavar="KEY...", help="Entry keys, or their start as `cache ls` prints it."),
    cache_dir: Path | None = CacheDir,
    remote: bool = Remote,
    remote_cache: RemoteCacheUrl = None,
) -> None:
    """Remove cached components by key (the next export that needs one builds it again)."""
    from neuron_export.format import human_bytes

    if remote:
        shared = _remote(remote_cache, "rm --remote")
        known, where = shared.keys(), shared.url
    else:
        cache = _cache(cache_dir)
        _local_only(remote_cache, cache)
        entries = {entry.key: entry for entry in cache.entries()}
        known, where = list(entries), str(cache.root)
    chosen = []
    for given in keys:  # every key resolved before anything is removed
        matches = [key for key in known if key.startswith(given.lower())]
        if len(matches) != 1:
            problem = "matches no entry" if not matches else f"matches {len(matches)} entries; give more of the key"
            raise ExportError(f"cache rm {given}: {problem} in {where} (`neuron-export cache ls` lists them).")
        chosen.append(matches[0])
    for key in dict.fromkeys(chosen):
        if remote:
            record = shared.record(key)
            shared.delete(key)
        else:
            record = entries[key].record
            cache.discard(entries[key].directory)
        size = sum(f.size for f in record.files) if record else 0
        print(f"removed {key[:12]}  {record.name if record else '?':<14} {human_bytes(size):>10}")


@cache_app.command("du")
def du_command(cache_dir: Path | None = CacheDir, remote: bool = Remote, remote_cache: RemoteCacheUrl = None) -> None:
    """Total size of the cache, per component role."""
    from neuron_export.format import human_bytes

    totals: dict[str, int] = {}
    if remote:
        shared = _remote(remote_cache, "du --remote")
        for key in shared.keys():
            record = shared.record(key)
            if record is not None:
                totals[record.name] = totals.get(record.name, 0) + sum(f.size for f in record.files)
        where = shared.url
    else:
        cache = _cache(cache_dir)
        _local_only(remote_cache, cache)
        for entry in cache.entries():
            totals[entry.record.name] = totals.get(entry.record.name, 0) + cache.size(entry)
        where = str(cache.root)
    for name, size in sorted(totals.items()):
        print(f"{name:<16}{human_bytes(size):>12}")
    print(f"{'total':<16}{human_bytes(sum(totals.values())):>12}  in {where}")


@cache_app.command("prune")
def prune_command(
    older_than: str | None = typer.Option(
        None, "--older-than", help="Remove entries unused (--remote: uploaded) this long ago, e.g. 30d."
    ),
    remove_all: bool = typer.Option(False, "--all", help="Remove every entry."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; delete nothing."),
    cache_dir: Path | None = CacheDir,
    remote: bool = Remote,
    remote_cache: RemoteCacheUrl = None,
) -> None:
    """Remove cached components: --all, or those unused --older-than a duration (--dry-run lists them first)."""
    from neuron_export.format import human_bytes

    if remove_all == (older_than is not None):  # deleting every build is never a default
        raise ExportError(
            "cache prune needs exactly one of --all or --older-than (e.g. --older-than 30d) to say what "
            "to remove; add --dry-run to list it without deleting."
        )
    seconds = parse_duration(older_than) if older_than else None
    linked: dict[str, int] = {}  # bytes an export still hard-links: removing the entry does not free them
    if remote:
        from neuron_export.store import remote_upkeep

        shared = _remote(remote_cache, "prune --remote")
        keys = remote_upkeep.unused_for(shared, seconds)
        listed = [(key, shared.record(key)) for key in keys]
        if not dry_run:
            remote_upkeep.prune(shared, seconds)
        found = [(key, record.name, sum(f.size for f in record.files)) for key, record in listed if record is not None]
        where = shared.url
    else:
        cache = _cache(cache_dir)
        _local_only(remote_cache, cache)
        linked = {e.key: cache.linked_bytes(e) for e in cache.unused_for(seconds)}
        entries = cache.unused_for(seconds) if dry_run else cache.prune(seconds)
        found = [(e.key, e.record.name, sum(f.size for f in e.record.files)) for e in entries]
        where = str(cache.root)
    verb = "would remove" if dry_run else "removed"
    for key, name, size in found:
        note = "  (still hard-linked by an export)" if linked.get(key) else ""
        print(f"{verb} {key[:12]}  {name:<14} {human_bytes(size):>10}{note}")
    total = sum(size for _, _, size in found)
    kept = sum(linked.get(key, 0) for key, _, _ in found)
    freed = (
        f"; {human_bytes(total - kept)} {'would be ' if dry_run else ''}freed, {human_bytes(kept)} stays in use by "
        "exports that hard-link it (freed when they are deleted)"
        if kept
        else ""
    )
    print(
        f"{verb} {len(found)} entries ({human_bytes(total)}) from {where}{freed}"
        + ("; nothing was deleted" if dry_run else "")
    )


@cache_app.command("verify")
def verify_command(
    cache_dir: Path | None = CacheDir, remote: bool = Remote, remote_cache: RemoteCacheUrl = None
) -> None:
    """Hash-check every entry; bad ones are removed (and rebuilt by the next export that needs them). Exits 3 if any was bad."""
    if remote:
        from neuron_export.store.remote_upkeep import verify

        shared = _remote(remote_cache, "verify --remote")
        count = len(shared.keys())
        bad = verify(shared)
    else:
        cache = _cache(cache_dir)
        _local_only(remote_cache, cache)
        count = sum(1 for _ in cache.entries())
        bad = [(entry.key, f"{entry.record.name}: {problem}") for entry, problem in cache.verify()]
    for key, problem in bad:
        print(f"removed {key[:12]} ({problem})")
    print(f"{count - len(bad)} of {count} entries intact")
    if bad:
        raise typer.Exit(ExitCode.INTEGRITY)


@cache_app.command("push")
def push_command(
    cache_dir: Path | None = CacheDir,
    remote_cache: RemoteCacheUrl = None,
    remote_cache_signing_key: RemoteCacheSigningKey = None,
    remote_cache_allow_unsigned: RemoteCacheAllowUnsigned = False,
) -> None:
    """Upload, signed, every intact local entry the remote cache has no trusted entry for (seeds it for other hosts)."""
    from neuron_export.format import human_bytes
    from neuron_export.store.remote_trust import SIGNING_KEY_ENV
    from neuron_export.store.remote_upkeep import push

    shared = _remote(remote_cache, "push", remote_cache_signing_key, None, remote_cache_allow_unsigned)
    if not shared.trust.can_upload:
        raise ExportError(
            f"cache push signs what it uploads; pass --remote-cache-signing-key FILE (or set "
            f"{SIGNING_KEY_ENV}), or --remote-cache-allow-unsigned for a private bucket."
        )
    pushed = push(_cache(cache_dir), shared)
    for entry in pushed:
        print(
            f"pushed {entry.key[:12]}  {entry.record.name:<14} {human_bytes(sum(f.size for f in entry.record.files)):>10}"
        )
    print(f"pushed {len(pushed)} entries to {shared.url}")


@cache_app.command("pull")
def pull_command(
    cache_dir: Path | None = CacheDir,
    remote_cache: RemoteCacheUrl = None,
    remote_cache_trusted_keys: RemoteCacheTrustedKey = None,
    remote_cache_allow_unsigned: RemoteCacheAllowUnsigned = False,
) -> None:
    """Download every remote entry the local cache does not have that a trusted key signed, each hash-checked."""
    from neuron_export.format import human_bytes
    from neuron_export.store.remote_upkeep import pull

    shared = _remote(remote_cache, "pull", None, remote_cache_trusted_keys, remote_cache_allow_unsigned)
    cache = _cache(cache_dir)
    pulled = pull(cache, shared)
    for entry in pulled:
        print(
            f"pulled {entry.key[:12]}  {entry.record.name:<14} {human_bytes(sum(f.size for f in entry.record.files)):>10}"
        )
    print(f"pulled {len(pulled)} entries from {shared.url} into {cache.root}")


@cache_app.command("keygen")
def keygen_command(
    key_file: Path = typer.Argument(
        ..., metavar="FILE", help="Where to write the private key (mode 0600); the public key goes to FILE.pub."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace existing key files (entries signed with the old key are then trusted by nobody who drops it).",
    ),
) -> None:
    """Make an Ed25519 key pair for signing remote cache entries; prints the public key to trust them with."""
    from neuron_export.signing import generate, write_private

    public_file = key_file.with_name(key_file.name + ".pub")
    for path in (key_file, public_file):
        if (path.exists() or path.is_symlink()) and not force:
            raise ExportError(
                f"cache keygen {key_file}: {path} already exists; pass --force to replace it, or choose another FILE."
            )
        if path.is_dir():
            raise ExportError(f"cache keygen {key_file}: {path} is a directory; choose a file name.")
    pem, public = generate()
    try:
        key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # e.g. ~/.config/neuron-export on a new host
        write_private(key_file, pem, replace=force)
        public_file.unlink(missing_ok=True)
        public_file.write_text(public + "\n")
    except OSError as error:
        raise ExportError(
            f"cache keygen {key_file}: cannot write it ({error.strerror or error}); choose a writable folder."
        ) from None
    print(public)
    print(
        f"private key: {key_file} (keep it secret: pass it as --remote-cache-signing-key); public key: {public_file} "
        "(pass it or the line above as --remote-cache-trusted-key)",
        file=sys.stderr,
    )


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
