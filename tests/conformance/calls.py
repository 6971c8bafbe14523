"""Reads the torch_neuronx test double's record (tests/doubles/torch_neuronx): one dict per trace call.

Pure standard library (no torch), so our main pytest process can read records written by worker processes
or by the conformance virtualenv. Event format: see tests/doubles/torch_neuronx/__init__.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every event of a record file, in file order (missing file: no events)."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merge_trace_calls(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per `trace` call, in call order, each with `after_trace`: the ordered names of the post-trace
    calls (dynamic_batch, async_load, lazy_load) made on the module that call returned, and
    `after_trace_calls`: those events in full (with their keywords)."""
    calls: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    for event in events:
        kind = event.get("event", "trace")  # records of the original double had no "event" key
        if kind == "trace":
            call = dict(event, after_trace=[], after_trace_calls=[])
            calls.append(call)
            if event.get("trace_id"):
                by_id[event["trace_id"]] = call
        elif kind == "after_trace" and event.get("trace_id") in by_id:
            call = by_id[event["trace_id"]]
            call["after_trace"].append(event["call"])
            call["after_trace_calls"].append(event)
    return calls


def read_trace_calls(path: str | Path) -> list[dict[str, Any]]:
    """The trace calls of a record file, after-trace calls merged in (see merge_trace_calls)."""
    return merge_trace_calls(read_events(path))


def orphan_after_trace_calls(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Post-trace calls made on a module that no recorded `trace` returned (a bug in the caller)."""
    events = list(events)
    ids = {event.get("trace_id") for event in events if event.get("event", "trace") == "trace"}
    return [e for e in events if e.get("event") == "after_trace" and e.get("trace_id") not in ids]


def by_component(calls: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{component: call}; refuses two calls for one component (ambiguous)."""
    result: dict[str, dict[str, Any]] = {}
    for call in calls:
        name = call.get("component")
        if name in result:
            raise ValueError(f"two trace calls recorded for component {name!r}")
        result[name] = call
    return result


def summary(call: dict[str, Any]) -> dict[str, Any]:
    """The parts of a trace call a conformance test compares (no ids, paths or pids)."""
    kwargs = call.get("kwargs", {})
    return {
        "component": call.get("component"),
        "compiler_flags": call.get("compiler_flags"),
        "keywords": sorted(kwargs),
        "inline_weights_to_neff": call.get("inline_weights_to_neff"),
        "cpu_backend": call.get("cpu_backend"),
        "input_output_aliases": kwargs.get("input_output_aliases"),
        "input_shapes": call.get("input_shapes"),
        "input_dtypes": call.get("input_dtypes"),
        "environment": call.get("environment"),
        "after_trace": call.get("after_trace"),
    }
