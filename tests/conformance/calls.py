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


# ------------------------------------------------------------------ neuronx_distributed ModelBuilder (NxD) records

NXD_BUILD_EVENTS = {
    "nxd_add": "adds",
    "nxd_trace": "traces",
    "nxd_shard_checkpoint": "shards",
    "nxd_transform_weight_layout": "layout_transforms",
}


def merge_nxd_builds(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per ModelBuilder made (tests/doubles/neuronx_distributed/trace/model_builder.py), in order:
    {builder_id, component, kwargs, adds [...], traces [...], shards [...], layout_transforms [...]}."""
    builds: list[dict[str, Any]] = []
    by_id: dict[str, dict[str, Any]] = {}
    for event in events:
        kind = event.get("event")
        if kind == "nxd_builder":
            build = {
                "builder_id": event["builder_id"],
                "component": event.get("component"),
                "kwargs": event.get("kwargs", {}),
                **{field: [] for field in NXD_BUILD_EVENTS.values()},
            }
            builds.append(build)
            by_id[event["builder_id"]] = build
        elif kind in NXD_BUILD_EVENTS and event.get("builder_id") in by_id:
            by_id[event["builder_id"]][NXD_BUILD_EVENTS[kind]].append(event)
    return builds


def component_io(events: Iterable[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """{component: {"inputs": [...], "outputs": [...]}}: the names optimum's exporter gave each traced component
    (recorded by tests/conformance/optimum_runner.py)."""
    return {
        event["component"]: {"inputs": event["inputs"], "outputs": event["outputs"]}
        for event in events
        if event.get("event") == "component_io"
    }


def _set_environment(environment: dict[str, Any] | None) -> dict[str, Any]:
    return {key: value for key, value in sorted((environment or {}).items()) if value is not None}


def component_summaries(events: Iterable[dict[str, Any]], export_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Per component, what an export did to compile it, as data a test compares (no ids, pids or absolute paths):
    the API (torch_neuronx.trace or neuronx_distributed.ModelBuilder), its arguments, compiler string, input
    names / shapes / dtypes, the environment variables set when it traced, tensor parallelism, and the files
    its folder holds (shards included). Components in trace order."""
    events = list(events)
    export_dir = Path(export_dir)
    names = component_io(events)
    summaries: dict[str, dict[str, Any]] = {}

    def common(component: str) -> dict[str, Any]:
        folder = export_dir / component
        config_path = folder / "config.json"
        neuron = json.loads(config_path.read_text()).get("neuron", {}) if config_path.exists() else {}
        return {
            "input_names": names.get(component, {}).get("inputs"),
            "output_names": names.get(component, {}).get("outputs"),
            "tensor_parallel_size": neuron.get("tensor_parallel_size"),
            "files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            if folder.is_dir()
            else [],
        }

    order: list[tuple[int, str, dict[str, Any]]] = []
    for call in merge_trace_calls(events):
        summary = {
            "api": "torch_neuronx.trace",
            "compiler_args": call.get("compiler_args"),
            "compiler_flags": call.get("compiler_flags"),
            "keywords": sorted(call.get("kwargs", {})),
            "inline_weights_to_neff": call.get("inline_weights_to_neff"),
            "input_output_aliases": call.get("kwargs", {}).get("input_output_aliases"),
            "input_shapes": call.get("input_shapes"),
            "input_dtypes": call.get("input_dtypes"),
            "environment": _set_environment(call.get("environment")),
            "after_trace": call.get("after_trace"),
        }
        order.append((call.get("seq", 0), call.get("component"), summary))
    for build in merge_nxd_builds(events):
        kwargs = {key: value for key, value in build["kwargs"].items() if key != "compiler_workdir"}
        summary = {
            "api": "neuronx_distributed.ModelBuilder",
            "builder": kwargs,
            "models": [
                {
                    "key": add.get("key"),
                    "module_cls": add.get("module_cls"),
                    "input_output_aliases": add.get("input_output_aliases"),
                    "compiler_args": add.get("compiler_args"),
                    "compiler_flags": add.get("compiler_flags"),
                    "example_inputs": add.get("example_inputs"),
                    "keywords": add.get("kwargs"),
                }
                for add in build["adds"]
            ],
            "traces": [t.get("kwargs") for t in build["traces"]],
            "environment": _set_environment(build["traces"][0].get("environment") if build["traces"] else None),
            "shards": [
                (Path(shard["serialize_path"]).name + "/" + name) if shard.get("serialize_path") else name
                for shard in build["shards"]
                for name in shard.get("files", [])
            ],
            "layout_transforms": len(build["layout_transforms"]),
        }
        first_seq = min([e.get("seq", 0) for e in build["adds"] + build["traces"]] or [0])
        order.append((first_seq, build["component"], summary))
    for _, component, summary in sorted(order, key=lambda item: item[0]):
        if component in summaries:
            raise ValueError(f"two compilations recorded for component {component!r}")
        summaries[component] = {**summary, **common(component)}
    return summaries
