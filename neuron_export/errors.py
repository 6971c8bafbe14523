"""The one exception type that reaches the user as a single sentence instead of a traceback."""


class UserError(Exception):
    """Bad input or an environment problem the user can fix; the message names field, value and fix."""

    exit_code = 2


class BuildError(UserError):
    """A component failed to build or validate; the export was not written."""

    exit_code = 1


class MemoryBudgetError(UserError):
    """The largest job cannot fit the memory budget; refused before anything is loaded."""

    exit_code = 6


class StorageError(UserError):
    """A write failed (disk full, quota, read-only or not writable); nothing half-written was left behind."""

    exit_code = 7
