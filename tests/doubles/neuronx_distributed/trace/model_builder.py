"""TEST DOUBLE of `neuronx_distributed.trace.model_builder` (written by us): a recording ModelBuilder.

optimum-neuron 0.4.5 traces its NxD components (the T5 encoder of PixArt and Flux, the Flux transformer) with
`ModelBuilder(...)`, `.add(key=, model_instance=BaseModelInstance(...), example_inputs=[inputs], compiler_args=,
priority_model_idx=)`, `.trace(initialize_model_weights=False)`, `torch.jit.save(...)` of what trace returns, and
`.shard_checkpoint(serialize_path=<component>/weights/)` (optimum/exporters/neuron/convert.py, get_builder /
trace_neuronx / shard_weights). Nothing is compiled here. Every call is recorded as one JSON line in the
torch_neuronx double's record (same file, same rules for where it goes: tests/doubles/torch_neuronx):

  - {"event": "nxd_builder", "builder_id", "component", "kwargs" (the arguments given, by parameter name;
     callables by qualified name)}
  - {"event": "nxd_add", "builder_id", "component", "key", "module_cls", "input_output_aliases",
     "compiler_args" (raw), "compiler_flags", "compiler_options" (as the torch_neuronx double splits them),
     "example_inputs" (one entry per bucket: {"shapes", "dtypes"}), "kwargs" (the other keywords)}
  - {"event": "nxd_trace", "builder_id", "component", "trace_id", "kwargs", "environment" (ENVIRONMENT_KEYS)}
  - {"event": "nxd_shard_checkpoint", "builder_id", "component", "serialize_path", "files" (names, rank order),
     "split" ("rank" or "none"), "unsplit_reason", "tensors" (count per file), "dtypes", "shapes" {name: shape}
     (the checkpoint loader's state dict), "rank_shapes" (per file {name: shape})}
  - {"event": "nxd_transform_weight_layout", ...}: only when NXD_LAYOUT_TRANSFORMATION_OPTIONS is set.
tests/conformance/calls.py (merge_nxd_builds) folds them into one dict per builder. Arguments are bound to the
real parameter lists (neuronx-distributed's ModelBuilder.__init__ / add / trace), so a keyword the real API lacks
fails here too.

What is written, as the real one names it: trace returns a TorchScript module with an `nxd_model` submodule whose
`initialize(weights, start_rank)` takes one state dict per rank (as optimum's loader calls it,
optimum/neuron/modeling_traced.py); its forward computes nothing (a NEFF would). It carries the double's stamp
(attribute `torch_neuronx_double`, see torch_neuronx.artifact_info). shard_checkpoint writes
`tp{rank}_sharded_checkpoint.safetensors` for each local rank (start_rank_id .. + local_ranks_size, every rank <
tp_degree on one host), each holding that rank's state dict as the real builder makes it: the parallel model built
(module_cls, with parallel_state at tp_degree: the double's parallel layers, parallel_layers/layers.py), the
checkpoint keys its state_dict lacks dropped, each parallel layer's weights sliced for the rank
(neuronx_distributed/trace/trace.py preprocess_checkpoint / shard_children); metadata "split": "rank". A model the
double cannot build (optimum-neuron's parallel Flux transformer imports neuronx-distributed modules it lacks, and NKI kernels) gets unsplit shards, metadata
"split": "none" and the reason, recorded in the event too.
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

    def __init__(self, module_cls: Any, input_output_aliases: Any) -> None:
        self.module_cls = module_cls
        self.input_output_aliases = [input_output_aliases]  # one entry per bucket, as the real class keeps them
        self.module: Any = None

    def load_module(self) -> None:
        self.module = self.module_cls()

    def get(self, bucket_rank: int, **kwargs: Any) -> tuple[Any, Any]:
        return self.module, self.input_output_aliases[0]


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


def _builder_signature(
    router: Any,
    tp_degree: int,
    checkpoint_loader: Any,
    start_rank_id: int = 0,
    pp_degree: int = 1,
    ep_degree: int = 1,
    local_ranks_size: int | None = None,
    world_size: int | None = None,
    compiler_workdir: Any = None,
    master_proc_env_vars: dict[str, str] | None = None,
    debug: bool = False,
    num_cores_per_group: int = 1,
    init_custom_process_group_fn: Any = None,
    logical_nc_config: int = 1,
    weights_to_skip_layout_optimization: Any = (),
    compiler_flag_hook: Any = None,
) -> None:
    """ModelBuilder's constructor parameters (neuronx-distributed's, names and defaults): calls are bound to it."""


def _add_signature(
    key: str,
    model_instance: Any,
    example_inputs: Any,
    compiler_args: str | None = None,
    bucket_config: Any = None,
    priority_model_idx: int | None = None,
) -> None:
    """ModelBuilder.add's parameters."""


def _trace_signature(
    initialize_model_weights: bool = True, dry_run: bool = False, disable_fail_fast: bool = False
) -> None:
    """ModelBuilder.trace's parameters."""


def _bind(signature_of: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments as given, by parameter name; a parameter the real API lacks is a TypeError, as there."""
    import inspect

    bound = inspect.signature(signature_of).bind(*args, **kwargs)
    return dict(bound.arguments)


class ModelBuilder:
    """Records what it is built with and asked to do; writes the files the real one writes (see module doc).
    Arguments are bound to the real parameter lists; records hold what the caller gave (defaults left out)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import inspect

        import torch_neuronx

        given = _bind(_builder_signature, args, kwargs)
        settings = {
            name: given.get(name, parameter.default)
            for name, parameter in inspect.signature(_builder_signature).parameters.items()
        }
        self.builder_id = uuid.uuid4().hex[:12]
        self.tp_degree = int(settings["tp_degree"])
        self.world_size = int(settings["world_size"] or self.tp_degree * settings["pp_degree"] * settings["ep_degree"])
        self.start_rank_id = int(settings["start_rank_id"])
        self.local_ranks_size = int(settings["local_ranks_size"] or self.world_size)
        self.checkpoint_loader = settings["checkpoint_loader"]
        self.init_custom_process_group_fn = settings["init_custom_process_group_fn"]
        workdir = settings["compiler_workdir"]
        self.compiler_workdir = Path(workdir) if workdir is not None else None
        self.models: list[dict[str, Any]] = []
        self.component = torch_neuronx._context.get("component") or (
            self.compiler_workdir.name if self.compiler_workdir is not None else None
        )
        recorded = {key: _callable_name(value) if callable(value) else value for key, value in given.items()}
        self._emit("nxd_builder", kwargs=torch_neuronx._jsonable(recorded))

    def _emit(self, event: str, **fields: Any) -> None:
        import torch_neuronx

        torch_neuronx._emit(
            {"event": event, "builder_id": self.builder_id, "component": self.component, **fields},
            torch_neuronx._record_path(self.compiler_workdir),
        )

    def add(self, *args: Any, **kwargs: Any) -> ModelBuilder:
        import torch_neuronx

        given = _bind(_add_signature, args, kwargs)
        key, model_instance, example_inputs = given["key"], given["model_instance"], given["example_inputs"]
        compiler_args = given.get("compiler_args")
        self.models.append({"key": key, "model_instance": model_instance, "example_inputs": example_inputs})
        aliases = getattr(model_instance, "input_output_aliases", None)
        self._emit(
            "nxd_add",
            key=key,
            module_cls=_callable_name(getattr(model_instance, "module_cls", None)),
            model_instance_class=type(model_instance).__name__,
            input_output_aliases=torch_neuronx._jsonable(aliases[0] if isinstance(aliases, list) else aliases),
            compiler_args=torch_neuronx._jsonable(compiler_args),
            compiler_args_type=type(compiler_args).__name__,
            compiler_flags=torch_neuronx.normalize_flags(compiler_args),
            compiler_options=torch_neuronx.compiler_options(compiler_args),
            example_inputs=[_tensors_summary(bucket) for bucket in example_inputs],
            kwargs=torch_neuronx._jsonable(
                {
                    k: v
                    for k, v in given.items()
                    if k not in ("key", "model_instance", "example_inputs", "compiler_args")
                }
            ),
        )
        return self

    def trace(self, *args: Any, **kwargs: Any) -> torch.jit.ScriptModule:
        """Recorded as given. With initialize_model_weights (the real default) the real builder also shards into
        its compiler work dir and initializes the model with the shards: recorded, not done here."""
        import json

        import torch_neuronx

        given = _bind(_trace_signature, args, kwargs)
        trace_id = uuid.uuid4().hex[:12]
        self._emit(
            "nxd_trace",
            trace_id=trace_id,
            kwargs=torch_neuronx._jsonable(given),
            environment={key: os.environ.get(key) for key in ENVIRONMENT_KEYS},
        )
        if self.component is not None and torch_neuronx._fail_on(self.compiler_workdir) == self.component:
            raise RuntimeError("neuronx-cc failed with exit code -9")
        if self.init_custom_process_group_fn is not None:
            self.init_custom_process_group_fn()  # as the real one, once its parallel state is up (optimum's: a no-op)
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

    def _parallel_model(self) -> tuple[torch.nn.Module | None, str | None]:
        """The first added model as the real builder builds it for sharding (its model instance's load_module /
        get, parallel_state at tp_degree), or None and why when its module needs what this double lacks (an
        ImportError: optimum-neuron's own parallel Flux model imports parallel_layers.layer_norm and NKI kernels)."""
        if not self.models:
            raise RuntimeError("TEST DOUBLE ModelBuilder.shard_checkpoint: no model was added")
        instance = self.models[0]["model_instance"]
        try:
            instance.load_module()
        except ImportError as exc:
            return None, f"module_cls not built: {type(exc).__name__}: {exc}"
        model, _ = instance.get(0)
        return model, None

    def shard_checkpoint(self, serialize_path: str | os.PathLike[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """One state dict per local rank, as the real one: the parallel model built with parallel_state at
        tp_degree, the checkpoint's keys the model lacks dropped, each parallel layer's weights cut for the rank
        (parallel_layers/layers.py shard_state_dict: the real trace.py's preprocess_checkpoint / shard_children).
        When the model cannot be built here (see _parallel_model) every shard is the unsplit checkpoint and its
        metadata says "split": "none" with the reason, as the record does."""
        import torch_neuronx
        from safetensors.torch import save_file

        from neuronx_distributed.parallel_layers import layers, parallel_state

        if self.checkpoint_loader is None:
            raise RuntimeError("TEST DOUBLE ModelBuilder.shard_checkpoint: no checkpoint_loader was given")
        state = {name: tensor.detach().clone().contiguous() for name, tensor in self.checkpoint_loader().items()}
        ranks = range(self.start_rank_id, self.start_rank_id + self.local_ranks_size)  # the real builder's ranks
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=self.tp_degree)
        try:
            model, unsplit_reason = self._parallel_model()
            if model is None:
                shards = [dict(state) for _ in ranks]
            else:
                shards = [layers.shard_state_dict(model, state, rank) for rank in ranks]
        finally:
            parallel_state.destroy_model_parallel()
        split = "none" if model is None else "rank"
        files = [SHARD_NAME.format(rank=rank) for rank in ranks]
        if serialize_path is not None:
            folder = Path(serialize_path)
            folder.mkdir(parents=True, exist_ok=True)
            for rank, name, shard in zip(ranks, files, shards, strict=True):
                metadata = {"test_double": "neuronx_distributed", "rank": str(rank), "split": split}
                if unsplit_reason is not None:
                    metadata["reason"] = unsplit_reason
                save_file(shard, str(folder / name), metadata=metadata)
        self._emit(
            "nxd_shard_checkpoint",
            serialize_path=str(serialize_path) if serialize_path is not None else None,
            files=files if serialize_path is not None else [],
            split=split,
            unsplit_reason=unsplit_reason,
            tensors=[len(shard) for shard in shards],
            dtypes=sorted({torch_neuronx._dtype_name(t.dtype) for t in state.values()}),
            shapes={name: list(tensor.shape) for name, tensor in sorted(state.items())},
            rank_shapes=[{name: list(t.shape) for name, t in sorted(shard.items())} for shard in shards],
        )
        return shards

    def transform_weight_layout_with_overriden_option(self, sharded_checkpoint_dir: Any = None, **kwargs: Any) -> None:
        self._emit("nxd_transform_weight_layout", sharded_checkpoint_dir=str(sharded_checkpoint_dir), kwargs=kwargs)
