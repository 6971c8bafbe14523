"""TEST DOUBLE of AWS's `torch_neuronx` module (the real SDK is not installable here). Written by us.

It stands in for the SDK both for our own exporter (tests/test_neuron_backend.py) and for optimum-neuron
0.4.5 run in the conformance virtualenv (tests/conformance/optimum_runner.py). Everything is recorded,
nothing is compiled: `trace` records the call, then returns `torch.jit.trace(...)`, so the rest of the
export runs for real on the CPU and the saved TorchScript loads and runs anywhere.

The record: one JSON object per line ("events").
  - {"event": "trace", "trace_id", "component", "compiler_args" (raw, str or list, as given),
     "compiler_flags" (tokens: shell-split, "--flag=value" split in two), "compiler_options" ([flag, value|null]
     pairs), "kwargs" (EVERY keyword received, JSON-safe), "inline_weights_to_neff", "cpu_backend",
     "compiler_workdir", "workdir_existed", "input_shapes", "input_dtypes", "environment", "pid"}
  - {"event": "after_trace", "call": "dynamic_batch" | "async_load" | "lazy_load", "trace_id", "kwargs",
     "seq"}: a post-trace function called on a module `trace` returned (trace_id null for any other module).
  - {"event": "DataParallel" | "set_neuron_cores" | "move_trace_to_device", ...}: load-time placement calls.
tests/conformance/calls.py reads it back (one dict per trace call, with its ordered after-trace calls).

Where it goes: the file named by $TORCH_NEURONX_RECORD when set; otherwise `torch_neuronx_calls.jsonl` two
levels above the compiler work dir (the test's tmp directory: our exports run in worker processes); with
neither, events are only kept in memory (`events` below). If a file `torch_neuronx_fail_on` beside that
default record (or $TORCH_NEURONX_FAIL_ON) names the component, `trace` fails like a neuronx-cc crash.

The traced module is also stamped with a TorchScript attribute `torch_neuronx_double` (a JSON string: trace
id, component, compiler args, inline weights, input shapes/dtypes, after-trace calls), saved by torch.jit.save:
`artifact_info(torch.jit.load(path))` tells what an artifact went through, as the real SDK keeps its load
flags inside the saved graph.

Return values follow the real API: `trace` and `dynamic_batch` return a module; `async_load`, `lazy_load`,
`move_trace_to_device` and `experimental.set_neuron_cores` act in place and return None.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from torch_neuronx import experimental  # noqa: F401  (torch_neuronx.experimental.set_neuron_cores)

__version__ = "2.8.0.2.10+test.double"  # also in ../torch_neuronx-<version>.dist-info (optimum reads that)

RECORD_ENV = "TORCH_NEURONX_RECORD"
FAIL_ON_ENV = "TORCH_NEURONX_FAIL_ON"
DEFAULT_RECORD_NAME = "torch_neuronx_calls.jsonl"
FAIL_ON_NAME = "torch_neuronx_fail_on"
ENVIRONMENT_KEYS = ("NEURON_FUSE_SOFTMAX", "NEURON_CUSTOM_SILU", "TORCHDYNAMO_DISABLE")
STAMP_ATTRIBUTE = "torch_neuronx_double"

events: list[dict[str, Any]] = []  # every event of this process, in order
data_parallel_instances: list[DataParallel] = []

_context: dict[str, Any] = {}
_traced: dict[int, tuple[weakref.ref, str, Path | None]] = {}  # id(module) -> (module ref, trace id, record)
_seq = 0


@contextlib.contextmanager
def record_context(**fields: Any) -> Iterator[None]:
    """Fields (e.g. component="unet") merged into every trace record made inside the block. Used by the
    conformance runner, since optimum-neuron gives every component the same (or no) compiler work dir."""
    saved = dict(_context)
    _context.update(fields)
    try:
        yield
    finally:
        _context.clear()
        _context.update(saved)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": _dtype_name(value.dtype)}
    if isinstance(value, torch.dtype):
        return _dtype_name(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(_jsonable(key)): _jsonable(item) for key, item in value.items()}
    return repr(value)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def normalize_flags(compiler_args: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """Compiler arguments as neuronx-cc's argument parser sees them: a string (optimum passes one) or a list
    (we pass one) is shell-split, and "--flag=value" becomes "--flag", "value"."""
    if compiler_args is None:
        return []
    pieces = [compiler_args] if isinstance(compiler_args, str) else [str(arg) for arg in compiler_args]
    tokens: list[str] = []
    for piece in pieces:
        for token in shlex.split(piece):
            if token.startswith("--") and "=" in token:
                flag, value = token.split("=", 1)
                tokens += [flag, value]
            else:
                tokens.append(token)
    return tokens


def compiler_options(compiler_args: str | list[str] | tuple[str, ...] | None) -> list[list[str | None]]:
    """[flag, value] pairs in order; value None for a flag followed by another flag (a switch)."""
    tokens = normalize_flags(compiler_args)
    options: list[list[str | None]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        value = None
        if index + 1 < len(tokens) and not tokens[index + 1].startswith("-"):
            value = tokens[index + 1]
            index += 1
        options.append([token, value])
        index += 1
    return options


def _record_path(workdir: Path | None) -> Path | None:
    if os.environ.get(RECORD_ENV):
        return Path(os.environ[RECORD_ENV])
    if workdir is not None:
        return workdir.parent.parent / DEFAULT_RECORD_NAME
    return None


def _emit(event: dict[str, Any], path: Path | None) -> None:
    global _seq
    _seq += 1
    event = {"seq": _seq, "pid": os.getpid(), **event}
    events.append(event)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as log:  # one write per line: appends from several processes stay whole lines
            log.write(json.dumps(event) + "\n")


def _fail_on(workdir: Path | None) -> str | None:
    if os.environ.get(FAIL_ON_ENV):
        return os.environ[FAIL_ON_ENV].strip()
    if workdir is not None:
        marker = workdir.parent.parent / FAIL_ON_NAME
        if marker.exists():
            return marker.read_text().strip()
    return None


def trace(func: Any, example_inputs: Any, *_: Any, **kwargs: Any) -> torch.jit.ScriptModule:
    """Records the call (every keyword), then traces on the CPU with torch.jit.trace."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    raw_workdir = kwargs.get("compiler_workdir")
    workdir = Path(raw_workdir) if raw_workdir is not None else None
    component = _context.get("component") or (workdir.name if workdir is not None else None)
    compiler_args = kwargs.get("compiler_args")
    trace_id = uuid.uuid4().hex[:12]
    record_path = _record_path(workdir)
    call = {
        "event": "trace",
        "trace_id": trace_id,
        "component": component,
        "context": _jsonable(_context),
        "compiler_args": _jsonable(compiler_args),
        "compiler_args_type": type(compiler_args).__name__,
        "compiler_flags": normalize_flags(compiler_args),
        "compiler_options": compiler_options(compiler_args),
        "kwargs": {key: _jsonable(value) for key, value in kwargs.items()},
        "positional_extra": len(_),
        "inline_weights_to_neff": kwargs.get("inline_weights_to_neff", True),  # the real default
        "cpu_backend": kwargs.get("cpu_backend", False),
        "compiler_workdir": str(workdir) if workdir is not None else None,
        "workdir_existed": workdir.is_dir() if workdir is not None else None,
        "input_shapes": [list(t.shape) if isinstance(t, torch.Tensor) else None for t in example_inputs],
        "input_dtypes": [
            _dtype_name(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in example_inputs
        ],
        "func_class": type(func).__name__,
        "environment": {key: os.environ.get(key) for key in ENVIRONMENT_KEYS},
    }
    _emit(call, record_path)
    if component is not None and _fail_on(workdir) == component:
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "log-neuron-cc.txt").write_text("ERROR: out of memory\n")
        raise RuntimeError("neuronx-cc failed with exit code -9")
    traced = torch.jit.trace(func, example_inputs, strict=False, check_trace=False)
    for parameter in traced.parameters():  # a NEFF's outputs never need autograd (optimum's ControlNet __call__
        parameter.requires_grad_(False)  # runs without torch.no_grad and turns them into numpy)
    _traced[id(traced)] = (weakref.ref(traced), trace_id, record_path)
    stamp = {
        key: call[key]
        for key in ("trace_id", "component", "compiler_args", "inline_weights_to_neff", "input_shapes", "input_dtypes")
    }
    stamp["after_trace"] = []
    traced._c._register_attribute(STAMP_ATTRIBUTE, torch._C.StringType.get(), json.dumps(stamp))
    return traced


def artifact_info(module: Any) -> dict[str, Any] | None:
    """What the double stamped on a traced (or saved and reloaded) module; None if it did not trace it."""
    inner = getattr(module, "module", module)  # through a DataParallel
    try:
        if inner._c.hasattr(STAMP_ATTRIBUTE):
            return json.loads(getattr(inner, STAMP_ATTRIBUTE))
    except AttributeError:
        pass
    return None


def _after_trace(call: str, module: Any, **kwargs: Any) -> None:
    entry = _traced.get(id(module))
    trace_id, record_path = None, _record_path(None)
    if entry is not None and entry[0]() is module:
        trace_id, record_path = entry[1], entry[2]
    _emit(
        {
            "event": "after_trace",
            "call": call,
            "trace_id": trace_id,
            "kwargs": {key: _jsonable(value) for key, value in kwargs.items()},
        },
        record_path,
    )
    info = artifact_info(module)
    if info is not None:
        info["after_trace"].append(call if not kwargs else [call, _jsonable(kwargs)])
        module._c.setattr(STAMP_ATTRIBUTE, json.dumps(info))


def dynamic_batch(neuron_script: Any) -> Any:
    """Lets the compiled module take batches that are multiples of the compiled one; returns the module."""
    _after_trace("dynamic_batch", neuron_script)
    return neuron_script


def async_load(trace: Any, enable_async_load: bool = True) -> None:
    """Marks the module for asynchronous loading onto the NeuronCore; in place."""
    _after_trace("async_load", trace, **({} if enable_async_load else {"enable_async_load": False}))


def lazy_load(trace: Any, enable_lazy_load: bool = True) -> None:
    """Marks the module to load onto the NeuronCore only when first used (or by DataParallel); in place."""
    _after_trace("lazy_load", trace, **({} if enable_lazy_load else {"enable_lazy_load": False}))


def _load_event(event: str, module: Any, **fields: Any) -> None:
    info = artifact_info(module)
    _emit(
        {
            "event": event,
            "module_id": id(module),  # module_id: to name components within this process
            "artifact": info and {k: info.get(k) for k in ("trace_id", "component")},
            **{key: _jsonable(value) for key, value in fields.items()},
        },
        _record_path(None),
    )


def move_trace_to_device(trace: Any, device_id: int) -> None:
    """Moves separated (non-inlined) weights to a NeuronCore; in place. Recorded only."""
    _load_event("move_trace_to_device", trace, device_id=device_id)


def _split(value: Any, pieces: int, dim: int, batch: int) -> list[Any]:
    if isinstance(value, torch.Tensor) and value.dim() > dim and value.shape[dim] == batch:
        return list(torch.tensor_split(value, pieces, dim=dim))
    return [value] * pieces


def _concat(outputs: list[Any], dim: int) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs, dim=dim) if first.dim() > dim else first
    if isinstance(first, dict):
        return type(first)((key, _concat([out[key] for out in outputs], dim)) for key in first)
    if isinstance(first, (list, tuple)):
        merged = [_concat([out[index] for out in outputs], dim) for index in range(len(first))]
        return merged if isinstance(first, list) else tuple(merged)
    return first


class DataParallel(torch.nn.Module):
    """The runtime's data parallelism over NeuronCores: tensor inputs are split along `dim` over the device
    ids (as many pieces as there are ids, fewer if the batch is smaller), each piece runs on the module (the
    same module stands for each core's copy) and the outputs are concatenated back. `core_calls` records
    (core, input shapes) per piece."""

    def __init__(
        self, module: Any, device_ids: list[int] | None = None, dim: int = 0, set_dynamic_batching: bool = True
    ) -> None:
        super().__init__()
        self.module = module
        self.device_ids = list(device_ids) if device_ids is not None else [0, 1]
        self.dim = dim
        self.dynamic_batching_enabled = set_dynamic_batching
        self.core_calls: list[tuple[int, list[list[int] | None]]] = []
        data_parallel_instances.append(self)
        _load_event(
            "DataParallel", module, device_ids=self.device_ids, dim=dim, set_dynamic_batching=set_dynamic_batching
        )

    def disable_dynamic_batching(self) -> None:
        self.dynamic_batching_enabled = False

    def forward(self, *args: Any) -> Any:
        batch = next((a.shape[self.dim] for a in args if isinstance(a, torch.Tensor) and a.dim() > self.dim), None)
        if batch is None:
            return self.module(*args)
        pieces = min(len(self.device_ids), batch)
        split = [_split(arg, pieces, self.dim, batch) for arg in args]
        outputs = []
        for index in range(pieces):
            piece = [parts[index] for parts in split]
            self.core_calls.append(
                (self.device_ids[index], [list(p.shape) if isinstance(p, torch.Tensor) else None for p in piece])
            )
            outputs.append(self.module(*piece))
        return _concat(outputs, self.dim)
