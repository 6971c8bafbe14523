"""TEST DOUBLE of `neuronx_distributed.trace.model_builder` (written by us): a recording ModelBuilder.

optimum-neuron 0.4.5 traces its NxD components (the T5 encoder of PixArt and Flux, the Flux transformer) with
`ModelBuilder(...)`, `.add(key=, model_instance=BaseModelInstance(...), example_inputs=[inputs], compiler_args=,
priority_model_idx=)`, `.trace(initialize_model_weights=False)`, `torch.jit.save(...)` of what trace returns, and
`.shard_checkpoint(serialize_path=<component>/weights/)` (optimum/exporters/neuron/convert.py, get_builder /
trace_neuronx / shard_weights). Nothing is compiled here. Every call is recorded as one JSON line in the
torch_neuronx double's record (same file, same rules for where it goes: tests/doubles/torch_neuronx):

  - {"event": "nxd_builder", "builder_id", "component", "kwargs" (every keyword, callables by name)}
  - {"event": "nxd_add", "builder_id", "component", "key", "module_cls", "input_output_aliases",
     "compiler_args" (raw), "compiler_flags", "compiler_options" (as the torch_neuronx double splits them),
     "example_inputs" (one entry per bucket: {"shapes", "dtypes"}), "kwargs" (the other keywords)}
  - {"event": "nxd_trace", "builder_id", "component", "kwargs", "environment" (ENVIRONMENT_KEYS)}
  - {"event": "nxd_shard_checkpoint", "builder_id", "component", "serialize_path", "files" (names, rank order),
     "tensors" (count per file), "dtypes"}
  - {"event": "nxd_transform_weight_layout", ...}: only when NXD_LAYOUT_TRANSFORMATION_OPTIONS is set.
tests/conformance/calls.py (read_nxd_builds) folds them into one dict per builder.

What is written, as the real one names it: trace returns a TorchScript module with an `nxd_model` submodule whose
`initialize(weights, start_rank)` takes one state dict per rank (as optimum's loader calls it,
optimum/neuron/modeling_traced.py); its forward computes nothing (a NEFF would). It carries the double's stamp
(attribute `torch_neuronx_double`, see torch_neuronx.artifact_info). shard_checkpoint writes
`tp{rank}_sharded_checkpoint.safetensors` for every rank < tp_degree, each holding the checkpoint loader's full
state dict (the double does not build the parallel model, so it cannot split it; metadata says so).
If the torch_neuronx double's fail-on marker names the component, trace fails like a neuronx-cc crash.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch

ENVIRONMENT_KEYS = (
    "LOCAL_WORLD_SIZE",
    "NEURON_RT_VIRTUAL_CORE_SIZE",
    "NEURON_RT_NUM_CORES",
    "NEURON_LOGICAL_NC_CONFIG",
    "NXD_LAYOUT_TRANSFORMATION_OPTIONS",
    "NEURON_CC_FLAGS",
    "NEURON_FUSE_SOFTMAX",
    "NEURON_CUSTOM_SILU",
    "TORCHDYNAMO_DISABLE",
    "XLA_DISABLE_FUNCTIONALIZATION",
)
SHARD_NAME = "tp{rank}_sharded_checkpoint.safetensors"


class BaseModelInstance:
    """What ModelBuilder.add takes: a callable that builds the (parallel) module, and its aliases."""

    def __init__(self, module_cls: Any = None, input_output_aliases: Any = None) -> None:
        self.module_cls = module_cls
        self.input_output_aliases = input_output_aliases
        self.module: Any = None

    def load_module(self) -> None:
        self.module = self.module_cls()

    def get(self, bucket_rank: int, **kwargs: Any) -> tuple[Any, Any]:
        return self.module, self.input_output_aliases


def _callable_name(value: Any) -> str | None:
    if value is None:
        return None
    inner = getattr(value, "func", value)  # functools.partial
    owner = getattr(inner, "__self__", None)
    name = getattr(inner, "__qualname__", None) or type(inner).__name__
    if owner is not None and "." not in name:
        name = f"{type(owner).__name__}.{name}"
    return name


def _tensors_summary(inputs: Any) -> dict[str, list[Any]]:
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    import torch_neuronx

    return {
        "shapes": [list(t.shape) if isinstance(t, torch.Tensor) else None for t in inputs],
        "dtypes": [
            torch_neuronx._dtype_name(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__ for t in inputs
        ],
    }


class _NxDRuntimeStandIn(torch.nn.Module):
    """The `nxd_model` a traced NxD artifact carries: optimum's loader hands it one state dict per rank."""

    def __init__(self, tp_degree: int) -> None:
        super().__init__()
        self.tp_degree = tp_degree
        self.initialized_ranks = 0

    @torch.jit.export
    def initialize(self, checkpoint: list[dict[str, torch.Tensor]], start_rank: torch.Tensor) -> None:
        if len(checkpoint) != self.tp_degree:
            raise RuntimeError("TEST DOUBLE nxd_model.initialize: one state dict per rank is expected")
        self.initialized_ranks = len(checkpoint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("TEST DOUBLE: an NxD artifact of the neuronx_distributed double computes nothing")


class _NxDArtifactStandIn(torch.nn.Module):
    def __init__(self, tp_degree: int) -> None:
        super().__init__()
        self.nxd_model = _NxDRuntimeStandIn(tp_degree)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nxd_model(x)


class ModelBuilder:
    """Records what it is built with and asked to do; writes the files the real one writes (see module doc)."""

    def __init__(
        self,
        router: Any = None,
        tp_degree: int = 1,
        checkpoint_loader: Any = None,
        compiler_workdir: Any = None,
        **kwargs: Any,
    ) -> None:
        import torch_neuronx

        self.builder_id = uuid.uuid4().hex[:12]
        self.tp_degree = int(tp_degree)
        self.checkpoint_loader = checkpoint_loader
        self.compiler_workdir = Path(compiler_workdir) if compiler_workdir is not None else None
        self.kwargs = dict(kwargs)
        self.models: list[dict[str, Any]] = []
        self.component = torch_neuronx._context.get("component") or (
            self.compiler_workdir.name if self.compiler_workdir is not None else None
        )
        recorded = {
            "router": router,
            "tp_degree": tp_degree,
            "checkpoint_loader": _callable_name(checkpoint_loader),
            "compiler_workdir": compiler_workdir,
        }
        for key, value in kwargs.items():
            recorded[key] = _callable_name(value) if callable(value) else value
        self._emit("nxd_builder", kwargs=torch_neuronx._jsonable(recorded))

    def _emit(self, event: str, **fields: Any) -> None:
        import torch_neuronx

        torch_neuronx._emit(
            {"event": event, "builder_id": self.builder_id, "component": self.component, **fields},
            torch_neuronx._record_path(self.compiler_workdir),
        )

    def add(
        self,
        key: str,
        model_instance: BaseModelInstance,
        example_inputs: list[Any],
        compiler_args: str | list[str] | None = None,
        **kwargs: Any,
    ) -> ModelBuilder:
        import torch_neuronx

        self.models.append({"key": key, "model_instance": model_instance, "example_inputs": example_inputs})
        self._emit(
            "nxd_add",
            key=key,
            module_cls=_callable_name(getattr(model_instance, "module_cls", None)),
            model_instance_class=type(model_instance).__name__,
            input_output_aliases=torch_neuronx._jsonable(getattr(model_instance, "input_output_aliases", None)),
            compiler_args=torch_neuronx._jsonable(compiler_args),
            compiler_args_type=type(compiler_args).__name__,
            compiler_flags=torch_neuronx.normalize_flags(compiler_args),
            compiler_options=torch_neuronx.compiler_options(compiler_args),
            example_inputs=[_tensors_summary(bucket) for bucket in example_inputs],
            kwargs=torch_neuronx._jsonable(kwargs),
        )
        return self

    def trace(self, *args: Any, **kwargs: Any) -> torch.jit.ScriptModule:
        """The real signature is (tag="", initialize_model_weights=True); recorded as given."""
        import json

        import torch_neuronx

        trace_id = uuid.uuid4().hex[:12]
        self._emit(
            "nxd_trace",
            trace_id=trace_id,
            args=torch_neuronx._jsonable(list(args)),
            kwargs=torch_neuronx._jsonable(kwargs),
            environment={key: os.environ.get(key) for key in ENVIRONMENT_KEYS},
        )
        if self.component is not None and torch_neuronx._fail_on(self.compiler_workdir) == self.component:
            raise RuntimeError("neuronx-cc failed with exit code -9")
        group_fn = self.kwargs.get("init_custom_process_group_fn")
        if group_fn is not None:
            group_fn()  # the real builder calls it once its parallel state is up (optimum's: a no-op for diffusion)
        artifact = torch.jit.script(_NxDArtifactStandIn(self.tp_degree))
        stamp = {
            "trace_id": trace_id,
            "component": self.component,
            "builder": "neuronx_distributed.ModelBuilder",
            "tp_degree": self.tp_degree,
            "models": [
                {"key": model["key"], "example_inputs": [_tensors_summary(b) for b in model["example_inputs"]]}
                for model in self.models
            ],
            "after_trace": [],
        }
        artifact._c._register_attribute(torch_neuronx.STAMP_ATTRIBUTE, torch._C.StringType.get(), json.dumps(stamp))
        return artifact

    def shard_checkpoint(self, serialize_path: str | os.PathLike[str] | None = None) -> list[dict[str, torch.Tensor]]:
        import torch_neuronx
        from safetensors.torch import save_file

        if self.checkpoint_loader is None:
            raise RuntimeError("TEST DOUBLE ModelBuilder.shard_checkpoint: no checkpoint_loader was given")
        state = {name: tensor.detach().clone().contiguous() for name, tensor in self.checkpoint_loader().items()}
        shards = [dict(state) for _ in range(self.tp_degree)]
        files = [SHARD_NAME.format(rank=rank) for rank in range(self.tp_degree)]
        if serialize_path is not None:
            folder = Path(serialize_path)
            folder.mkdir(parents=True, exist_ok=True)
            for rank, (name, shard) in enumerate(zip(files, shards, strict=True)):
                metadata = {"test_double": "neuronx_distributed", "rank": str(rank), "split": "none"}
                save_file(shard, str(folder / name), metadata=metadata)
        self._emit(
            "nxd_shard_checkpoint",
            serialize_path=str(serialize_path) if serialize_path is not None else None,
            files=files if serialize_path is not None else [],
            tensors=[len(shard) for shard in shards],
            dtypes=sorted({torch_neuronx._dtype_name(t.dtype) for t in state.values()}),
        )
        return shards

    def transform_weight_layout_with_overriden_option(self, sharded_checkpoint_dir: Any = None, **kwargs: Any) -> None:
        self._emit("nxd_transform_weight_layout", sharded_checkpoint_dir=str(sharded_checkpoint_dir), kwargs=kwargs)
