"""The exit-code table and the exceptions that reach the user as one sentence instead of a traceback.

Each exception class carries its exit code; `neuron_export.cli.app` is the one place that turns an
exception into a message and an exit code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Every exit code the CLI uses, and only these."""

    OK = 0
    BUILD_FAILED = (
        1  # a component failed to build or validate, the Hub refused a push, or a required remote cache failed
    )
    USAGE = 2  # bad input: a flag, a config key, a path, a model the tool cannot export
    INTEGRITY = 3  # an export's (or a cache entry's) files do not match their record
    COMPATIBILITY = 4  # this host's software cannot run the export
    DOES_NOT_FIT = 5  # the export does not fit the instance given to `verify --instance`
    MEMORY_BUDGET = 6  # the largest build cannot fit --max-memory
    STORAGE = 7  # disk full, quota, read-only or unwritable
    INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
    TERMINATED = 143  # SIGTERM (a CI job's timeout), as shells report it


class ExportError(Exception):
    """Bad input or an environment problem the user can fix; the message names field, value and fix."""

    exit_code = ExitCode.USAGE


class BuildError(ExportError):
    """A component failed to build or validate; the export was not written."""

    exit_code = ExitCode.BUILD_FAILED


class MemoryBudgetError(ExportError):
    """The largest job cannot fit the memory budget; refused before anything is loaded."""

    exit_code = ExitCode.MEMORY_BUDGET


class StorageError(ExportError):
    """A write failed (disk full, quota, read-only or not writable); nothing half-written was left behind."""

    exit_code = ExitCode.STORAGE


class RemoteCacheError(ExportError):
    """A required remote cache (--remote-cache-required) could not be used; nothing was written."""

    exit_code = ExitCode.BUILD_FAILED


class IntegrityError(ExportError):
    """An export whose files do not match its manifest (push refuses it)."""

    exit_code = ExitCode.INTEGRITY


class PushError(ExportError):
    """The Hub refused or could not be reached; nothing about the export is wrong."""

    exit_code = ExitCode.BUILD_FAILED
