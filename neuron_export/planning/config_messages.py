"""ExportConfig's messages: one sentence naming the option as the user gave it (flag, --set or YAML key), the value
and the fix."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError


def spelled(field: str, value: Any, where: str | None) -> str:
    """A value as the user gave it: `--height 513` (flags), `--set height=513`, `height: 513 in FILE`, or `height = 513`."""
    if where == "flags":
        values = value if isinstance(value, (list, tuple)) else [value]
        return f"--{field.replace('_', '-')} {' '.join(str(v) for v in values)}"
    if where == "--set":
        return f"--set {field}={value}"
    if where is not None:
        return f"{field}: {value} in {where}"
    return f"{field} = {value!r}"


def explain_validation_error(
    error: ValidationError, valid_keys: list[str], origins: dict[str, str] | None = None
) -> str:
    """Turn pydantic's report into one sentence naming the option as given (flag, --set or YAML key and file),
    the value and the fix. `origins` says where each key came from (see spelled)."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or "config"
    value = first.get("input")
    error_type = first["type"]
    message = first["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if not first["loc"]:  # a model-level check already names its fields
        return message + "."
    if error_type == "extra_forbidden":
        return unknown_key(field, "options", valid_keys)
    given = spelled(field, value, (origins or {}).get(field))
    if error_type in ("literal_error", "enum"):
        expected = first.get("ctx", {}).get("expected", "")
        return f"{given} is not valid; use one of {expected}."
    if error_type in ("int_parsing", "int_type", "int_from_float"):
        return f"{given} is not a whole number; pass an integer such as 1."
    if error_type in ("float_parsing", "float_type"):
        return f"{given} is not a number; pass a number such as 0.001."
    if error_type in ("bool_parsing", "bool_type"):
        return f"{given} is not true or false."
    return f"{given} is not valid: {message}."


def unknown_key(key: str, where: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys are: {', '.join(valid)}."
    return f"Unknown key '{key}' in {where}; {hint}"
