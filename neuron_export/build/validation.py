"""Validation results stored beside a cached artifact, so neither the tolerance nor whether to validate is in
its cache key. A tolerance at least as loose as one a stored measurement was made at reuses that measurement;
a stricter one, or an artifact built with --disable-validation, is compared with the eager model again (in a
worker, without rebuilding) and the new result is stored too.

The build's own result is in the entry's record.json (what a remote upload carries); later checks are
appended to `validation.json` in the same entry, a file of its own that a signed remote record can include.
"""

from __future__ import annotations

import contextlib
import uuid

from pydantic import BaseModel

from neuron_export.manifest import ValidationRecord
from neuron_export.store.cache import CacheEntry

VALIDATION_NAME = "validation.json"
DISABLED = "skipped: disabled by --disable-validation"


class ValidationLog(BaseModel):
    """The checks made on a cached artifact after its build, oldest first."""

    results: list[ValidationRecord] = []


def measurements(entry: CacheEntry) -> list[ValidationRecord]:
    """Every stored result of this artifact that measured a difference, oldest first."""
    try:
        later = ValidationLog.model_validate_json((entry.directory / VALIDATION_NAME).read_text()).results
    except (OSError, ValueError):  # none yet, or unreadable: the artifact is checked again
        later = []
    return [r for r in [entry.record.validation, *later] if r.max_abs_diff is not None and r.atol is not None]


def reuse(entry: CacheEntry, atol: float) -> ValidationRecord | None:
    """The verdict at `atol` from the newest measurement made at that tolerance or a stricter one; None when
    every measurement was made at a looser one (a stricter check runs the comparison again)."""
    usable = [r for r in measurements(entry) if r.atol is not None and r.atol <= atol]
    if not usable:
        return None
    newest = usable[-1]  # a downloaded build's own measurement stays its signer's (or uploader's) report
    return verdict(newest.max_abs_diff or 0.0, atol, reused=True).model_copy(update={"by": newest.by})


def verdict(diff: float, atol: float, reused: bool = False) -> ValidationRecord:
    passed = diff <= atol
    return ValidationRecord(
        status="passed" if passed else "failed",
        max_abs_diff=diff,
        atol=atol,
        reused=reused,
        reason=None if passed else f"max abs diff {diff:.3g} > atol {atol:g}",
    )


def remember(entry: CacheEntry, result: ValidationRecord) -> None:
    """Append a check made now to the entry's log (replaced in one rename; a read-only cache only forgets it)."""
    path = entry.directory / VALIDATION_NAME
    try:
        log = ValidationLog.model_validate_json(path.read_text())
    except (OSError, ValueError):
        log = ValidationLog()
    log.results.append(result.model_copy(update={"reused": False}))
    temporary = path.with_name(f".{VALIDATION_NAME}.{uuid.uuid4().hex[:8]}")
    try:
        temporary.write_text(log.model_dump_json(indent=2))
        temporary.replace(path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()


def failure_message(component: str, result: ValidationRecord) -> str:
    return (
        f"Validation of {component} failed: {result.reason} on fresh inputs; nothing was written to the output "
        "(the build is kept in the cache, so a larger --atol reuses it without recompiling; raise --atol only "
        "if this difference is acceptable)."
    )
