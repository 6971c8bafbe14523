"""`neuron-export cache ls | du | prune | verify`: look after the component cache (registered by cli.py)."""

from pathlib import Path
from typing import Optional

import typer

from neuron_export.errors import ExitCode, ExportError

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

cache_app = typer.Typer(help="Inspect and clean the component cache.", no_args_is_help=True)
CacheDir = typer.Option(None, "--cache-dir", help="Component cache [default: $NEURON_EXPORT_CACHE or ~/.cache/neuron-export].")


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m' -> seconds."""
    number, unit = text[:-1], text[-1:].lower()
    if unit not in DURATION_UNITS or not number.replace(".", "", 1).isdigit():
        raise ExportError(f"--older-than {text!r} is not a duration; write it like 30d, 12h or 90m.")
    return float(number) * DURATION_UNITS[unit]


def _cache(cache_dir: Optional[Path]):  # noqa: ANN202
    from neuron_export.exporter.cache import ComponentCache, default_cache_dir

    return ComponentCache(cache_dir or default_cache_dir())


@cache_app.command("ls")
def ls_command(cache_dir: Optional[Path] = CacheDir) -> None:
    """One line per cached component: key, component, shapes, backend, size, last use."""
    import time

    from neuron_export.format import human_bytes

    cache = _cache(cache_dir)
    for entry in cache.entries():
        record = entry.record
        shapes = " ".join(f"{t.name}{tuple(t.shape)}" for t in record.inputs)
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(cache.last_used(entry)))
        print(f"{entry.key[:12]}  {record.name:<14} {record.backend:<6} {human_bytes(cache.size(entry)):>10}  used {used}  {shapes}")


@cache_app.command("du")
def du_command(cache_dir: Optional[Path] = CacheDir) -> None:
    """Total size of the cache, per component role."""
    from neuron_export.format import human_bytes

    cache = _cache(cache_dir)
    totals: dict[str, int] = {}
    for entry in cache.entries():
        totals[entry.record.name] = totals.get(entry.record.name, 0) + cache.size(entry)
    for name, size in sorted(totals.items()):
        print(f"{name:<16}{human_bytes(size):>12}")
    print(f"{'total':<16}{human_bytes(sum(totals.values())):>12}  in {cache.root}")


@cache_app.command("prune")
def prune_command(
    older_than: Optional[str] = typer.Option(None, "--older-than", help="Remove entries unused for this long, e.g. 30d."),
    remove_all: bool = typer.Option(False, "--all", help="Remove every entry."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed; delete nothing."),
    cache_dir: Optional[Path] = CacheDir,
) -> None:
    """Remove cached components: --all, or those unused --older-than a duration (--dry-run lists them first)."""
    from neuron_export.format import human_bytes

    if remove_all == (older_than is not None):  # deleting every build is never a default
        raise ExportError("cache prune needs exactly one of --all or --older-than (e.g. --older-than 30d) to say what "
                        "to remove; add --dry-run to list it without deleting.")
    cache = _cache(cache_dir)
    seconds = parse_duration(older_than) if older_than else None
    entries = cache.unused_for(seconds) if dry_run else cache.prune(seconds)
    verb = "would remove" if dry_run else "removed"
    for entry in entries:
        print(f"{verb} {entry.key[:12]}  {entry.record.name:<14} {human_bytes(sum(f.size for f in entry.record.files)):>10}")
    total = sum(sum(f.size for f in e.record.files) for e in entries)
    print(f"{verb} {len(entries)} entries ({human_bytes(total)})" + ("; nothing was deleted" if dry_run else ""))


@cache_app.command("verify")
def verify_command(cache_dir: Optional[Path] = CacheDir) -> None:
    """Hash-check every entry; bad ones are removed (and rebuilt by the next export that needs them). Exits 3 if any was bad."""
    cache = _cache(cache_dir)
    count = sum(1 for _ in cache.entries())
    bad = cache.verify()
    for entry, problem in bad:
        print(f"removed {entry.key[:12]} ({entry.record.name}): {problem}")
    print(f"{count - len(bad)} of {count} entries intact")
    if bad:
        raise typer.Exit(ExitCode.INTEGRITY)


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
