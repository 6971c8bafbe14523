"""The module one rank of a tensor-parallel ModelBuilder component runs, made from neuronx-distributed's parallel
layers (ColumnParallelLinear, RowParallelLinear, ParallelEmbedding) in place of a model's own linear layers.

A role (roles/t5.py, roles/flux.py) says which of its layers are split and how; this module does the swapping.
The model is rebuilt from its config with its weights on the meta device (nothing is copied or allocated twice),
its split layers are replaced by parallel layers sized for one rank (the rank count and this rank are read from
neuronx-distributed's parallel_state by the layers themselves), and what stays whole is given empty CPU storage:
ModelBuilder fills every weight from the checkpoint loader, slicing each parallel layer's weights for the rank
(`tensor_model_parallel`, `partition_dim` on the parameters). Parameter names stay the model's, so the checkpoint
is the model's state dict (a role renames only the layers it restructures).

neuronx_distributed is imported inside the functions that build (the package imports without the SDK).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def tensor_parallel_size() -> int:
    from neuronx_distributed.parallel_layers import parallel_state

    return int(parallel_state.get_tensor_model_parallel_size())


def per_rank(count: int, what: str) -> int:
    """`count` split evenly over the ranks (heads, feed-forward width); an uneven split is an error."""
    tp = tensor_parallel_size()
    if count % tp:
        raise ValueError(f"{what} ({count}) does not divide by the tensor parallel size {tp}")
    return count // tp


def column(linear: Any) -> Any:
    """A linear layer split by output features; each rank keeps its slice of the output (no gather)."""
    from neuronx_distributed.parallel_layers.layers import ColumnParallelLinear

    return ColumnParallelLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        gather_output=False,
        dtype=linear.weight.dtype,
    )


def row(linear: Any, bias: bool | None = None, in_features: int | None = None) -> Any:
    """A linear layer split by input features, fed each rank's slice (input_is_parallel); its outputs are summed
    over the ranks (all-reduce) and the bias added once."""
    from neuronx_distributed.parallel_layers.layers import RowParallelLinear

    return RowParallelLinear(
        linear.in_features if in_features is None else in_features,
        linear.out_features,
        bias=linear.bias is not None if bias is None else bias,
        input_is_parallel=True,
        dtype=linear.weight.dtype,
    )


def head_embedding(embedding: Any) -> Any:
    """An embedding whose columns are attention heads (T5's relative position bias): each rank keeps its heads'."""
    from neuronx_distributed.parallel_layers.layers import ParallelEmbedding

    return ParallelEmbedding(
        embedding.num_embeddings,
        embedding.embedding_dim,
        dtype=embedding.weight.dtype,
        shard_across_embedding=True,
        collect_output=False,
    )


def set_child(root: Any, path: str, module: Any) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def rebuild(model: Any, split: Callable[[Any], None]) -> Any:
    """`model`'s architecture for this rank: rebuilt from its config on the meta device, each parameter in the
    dtype the model holds it in, `split(copy)` swapping in parallel layers (built on the CPU, in the dtype of the
    layer each replaces), then the rest given empty CPU storage."""
    import torch

    with torch.device("meta"):
        copy = (
            type(model)(model.config) if hasattr(type(model), "config_class") else type(model).from_config(model.config)
        )
    dtypes = {name: tensor.dtype for name, tensor in model.named_parameters(remove_duplicate=False)}
    cast: dict[int, Any] = {}  # a tied parameter (T5's shared / embed_tokens) stays one parameter
    for module_name, module in copy.named_modules(remove_duplicate=False):  # each in the model's dtype for it
        for name, tensor in list(module.named_parameters(recurse=False)):
            if id(tensor) not in cast:
                dtype = dtypes.get(f"{module_name}.{name}" if module_name else name, tensor.dtype)
                cast[id(tensor)] = torch.nn.Parameter(tensor.to(dtype), False)
            module.register_parameter(name, cast[id(tensor)])
    copy = copy.eval()
    with torch.device("cpu"):
        split(copy)
    storage: dict[int, Any] = {}
    for _, module in copy.named_modules(remove_duplicate=False):
        for name, tensor in list(module.named_parameters(recurse=False)):
            if tensor.is_meta:
                if id(tensor) not in storage:
                    storage[id(tensor)] = torch.nn.Parameter(torch.empty_like(tensor, device="cpu"), False)
                module.register_parameter(name, storage[id(tensor)])
        for name, tensor in list(module.named_buffers(recurse=False)):
            if tensor is not None and tensor.is_meta:
                raise RuntimeError(f"{type(module).__name__}.{name}: a buffer cannot be rebuilt from the config")
    return copy.requires_grad_(False)
