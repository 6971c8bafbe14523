"""verify's integrity check: every file the manifest lists is there with its size and sha256, nothing the
loader would trip on was added, and every signed (downloaded) component's signature matches its record, by a
trusted key when keys are given (exit 3).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from neuron_export.deploy.checks import CheckResult
from neuron_export.deploy.instances import GIB
from neuron_export.files import MANIFEST_NAME
from neuron_export.roles.registry import roles

if TYPE_CHECKING:
    from neuron_export.manifest import Manifest


# Files the Hub adds to a repository (and `push` uploads the model card as README.md): never a problem.
HUB_FILES = frozenset({"README.md", ".gitattributes"})
HUB_DIRS = frozenset({".cache", ".git", ".huggingface"})  # huggingface_hub's local-dir metadata, a git clone
# Folders optimum-neuron's diffusion loader opens by name (a config.json or model.neuron in one is loaded): each
# component role's (every numbered one's, by prefix), and a transformer's.
OTHER_LOADER_FOLDERS = frozenset({"transformer"})
# Folders diffusers/transformers load through model_index.json: every file in them is read by from_pretrained.
PROCESSOR_FOLDERS = frozenset({"scheduler", "tokenizer", "tokenizer_2", "feature_extractor"})


def _unsafe(relative: str) -> bool:
    path = PurePosixPath(relative)
    return path.is_absolute() or ".." in path.parts or relative == ""


def _files_on_disk(directory: Path) -> Iterable[str]:
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in HUB_DIRS]
        dirs.sort()
        for name in sorted(files):
            yield (rel_root / name).as_posix()


def loader_trip_reason(relative: str, components: set[str], directory: Path) -> str | None:
    """Why an unlisted file could change what optimum-neuron's loader loads, or None if it cannot."""
    parts = PurePosixPath(relative).parts
    top = parts[0] if len(parts) > 1 else None
    if relative.endswith(".neuron"):
        return "it is a stray compiled artifact (*.neuron) that could be loaded or shipped instead of the recorded one"
    if top is None:
        return None
    if top in OTHER_LOADER_FOLDERS or any(
        top == role.name or (role.numbered and top.startswith(role.name)) for role in roles()
    ):
        if top not in components:
            return f"optimum-neuron's loader loads a {top}/ folder, but this export has no {top} component"
        return f"it sits in {top}/, a component folder optimum-neuron's loader reads"
    if top in PROCESSOR_FOLDERS:
        return f"it sits in {top}/, which the pipeline loads with from_pretrained (an extra file there can change it)"
    if (directory / top / "config.json").is_file():
        return f"{top}/ has a config.json, so it looks like a component folder the manifest does not know"
    return None


def signature_problems(manifest: Manifest, trusted: frozenset[str] | None) -> list[str]:
    """Each component's signature checked again against its record (the files' sizes and sha256 are checked
    against the same record). With trusted keys given, a downloaded component must be signed by one of them."""
    from neuron_export.signing import verifies

    problems = []
    for name, record in manifest.components.items():
        if record.signature is not None or record.signed_by is not None:
            if not verifies(record.signed_by or "", record.signature or "", record.cache_key, record):
                problems.append(f"{name}: its signature by {record.signed_by} does not match its record (tampered)")
            elif trusted is not None and record.signed_by not in trusted:
                problems.append(f"{name}: signed by {record.signed_by}, which is not a trusted key")
        elif trusted is not None and record.origin == "downloaded":
            problems.append(f"{name}: downloaded unsigned, and trusted keys were given")
    return problems


def check_integrity(directory: Path, manifest: Manifest, trusted: frozenset[str] | None = None) -> CheckResult:
    """Sizes first (cheap), then a streaming sha256 of every listed file; then look for unlisted files; then
    the signatures (`trusted`: the keys that must have signed downloaded components, None: any signer)."""
    from neuron_export.manifest import sha256_file

    problems: list[str] = []
    notes: list[str] = []
    listed: set[str] = set()
    hashed = 0
    records = manifest.all_files()
    for record in records:
        rel = record.path
        listed.add(rel)
        if _unsafe(rel):
            problems.append(f"{rel}: the manifest lists a path outside the export")
            continue
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != record.size:
            problems.append(f"{rel}: {size} bytes, the manifest records {record.size}")
            continue
        digest = sha256_file(path)
        hashed += size
        if digest != record.sha256:
            problems.append(
                f"{rel}: sha256 {digest[:16]}..., the manifest records {record.sha256[:16]}... (content changed)"
            )
    problems.extend(signature_problems(manifest, trusted))
    components = set(manifest.components)
    unlisted = 0
    for rel in _files_on_disk(directory):
        if rel == MANIFEST_NAME or rel in listed or rel in HUB_FILES:
            continue
        unlisted += 1
        reason = loader_trip_reason(rel, components, directory)
        if reason:
            problems.append(f"{rel}: not in the manifest, and {reason}")
        else:
            notes.append(f"{rel}: not in the manifest; the loader ignores it and `push` does not upload it")
    if problems:
        summary = f"{len(problems)} problem(s) in {len(records)} listed files: " + "; ".join(
            p.split(":")[0] for p in problems
        )
        verdict = "failed"
    else:
        summary = f"{len(records)} files match the manifest ({hashed / GIB:.2f} GiB hashed)"
        verdict = "ok"
    return CheckResult(
        "integrity",
        verdict,
        summary,
        problems,
        notes,
        {"listed_files": len(records), "hashed_bytes": hashed, "unlisted_files": unlisted},
    )
