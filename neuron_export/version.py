"""The tool version, on its own so every layer can record it without importing the package's API; and the
installed libraries' versions, read without importing them."""

from __future__ import annotations

__version__ = "0.1.0"


def installed_version(distribution: str) -> str | None:
    """`distribution`'s installed version, or None. Read from its metadata's header: metadata.version parses the
    whole file (torch's and diffusers' hold their READMEs), which costs a rerun ~5 ms a library."""
    from importlib import metadata

    try:
        found = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    text = found.read_text("METADATA") or found.read_text("PKG-INFO") or ""
    for line in text.partition("\n\n")[0].splitlines():
        if line.startswith("Version:"):
            return line.removeprefix("Version:").strip()
    return found.version
