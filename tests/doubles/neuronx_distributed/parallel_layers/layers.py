"""TEST DOUBLE of `neuronx_distributed.parallel_layers.layers` (written by us): ColumnParallelLinear,
RowParallelLinear and ParallelEmbedding with the real constructors' parameters, computing on the CPU.

Each holds its rank's slice of the weight (sizes from parallel_state's tensor parallel size), marked as the real
layers mark it (`tensor_model_parallel`, `partition_dim`, `partition_stride`, `num_partitions`), so ModelBuilder's
checkpoint sharding (trace/model_builder.py) slices a full state dict for each rank as the real one does.
Forward: column-parallel y_r = x W_r^T (+ b_r), all-gathered over the ranks if gather_output; row-parallel
y = all-reduce(x_r W_r^T) + b, the input split first unless input_is_parallel; embedding across the embedding
dimension: this rank's columns, gathered if collect_output. Features the real layers have and these do not
(padding, sequence parallelism, strides, rank orderings, vocabulary sharding) are refused, not ignored.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import Parameter

from neuronx_distributed.parallel_layers import mappings, parallel_state
from neuronx_distributed.parallel_layers.utils import divide, set_tensor_model_parallel_attributes


def _refuse(**unsupported: Any) -> None:
    given = [name for name, value in unsupported.items() if value]
    if given:
        raise NotImplementedError(f"TEST DOUBLE parallel layers: {', '.join(given)} not supported")


class BaseParallelLayer(torch.nn.Module):
    def __init__(self, device: torch.device | None = None) -> None:
        super().__init__()


class BaseParallelLinear(BaseParallelLayer):
    pass


def _group(tensor_model_parallel_group: Any) -> Any:
    if tensor_model_parallel_group is not None:
        return tensor_model_parallel_group
    return parallel_state.get_tensor_model_parallel_group()


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | None) -> Parameter:
    return Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(BaseParallelLinear):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        stride: int = 1,
        init_method: Any = None,
        sequence_parallel_enabled: bool = False,
        sequence_dimension: int | None = None,
        keep_master_weight: bool = False,
        skip_bias_add: bool = False,
        pad: bool = False,
        pad_alignment_size_per_rank: int = 1,
        keep_padded_output: bool = False,
        tensor_model_parallel_group: Any = None,
        reduce_dtype: torch.dtype = torch.float32,
        rank_ordering: list[int] | None = None,
    ) -> None:
        super().__init__(device=device)
        _refuse(stride=stride != 1, sequence_parallel_enabled=sequence_parallel_enabled, pad=pad,
                rank_ordering=rank_ordering, skip_bias_add=skip_bias_add)  # fmt: skip
        self.tensor_parallel_group = _group(tensor_model_parallel_group)
        world = self.tensor_parallel_group.size()
        self.input_size, self.output_size, self.gather_output = input_size, output_size, gather_output
        self.output_size_per_partition = divide(output_size, world)
        self.weight = _empty((self.output_size_per_partition, input_size), dtype, device)
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5)) if not self.weight.is_meta else None
        set_tensor_model_parallel_attributes(self.weight, True, dim=0, stride=1, num_partitions=world)
        if bias:
            size = output_size if gather_output else self.output_size_per_partition
            self.bias = _empty((size,), dtype, device)
            torch.nn.init.zeros_(self.bias) if not self.bias.is_meta else None
            if not gather_output:
                set_tensor_model_parallel_attributes(self.bias, True, dim=0, stride=1, num_partitions=world)
        else:
            self.register_parameter("bias", None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = torch.nn.functional.linear(input, self.weight)
        if self.gather_output:
            output = mappings.gather_from_tensor_model_parallel_region(output, self.tensor_parallel_group)
        return output + self.bias if self.bias is not None else output


class RowParallelLinear(BaseParallelLinear):
    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | None = None,
        stride: int = 1,
        init_method: Any = None,
        sequence_parallel_enabled: bool = False,
        sequence_dimension: int | None = None,
        keep_master_weight: bool = False,
        skip_bias_add: bool = False,
        pad: bool = False,
        reduce_output: bool = True,
        tensor_model_parallel_group: Any = None,
        reduce_dtype: torch.dtype = torch.float32,
        tile_cc: bool = False,
        rank_ordering: list[int] | None = None,
    ) -> None:
        super().__init__(device=device)
        _refuse(stride=stride != 1, sequence_parallel_enabled=sequence_parallel_enabled, pad=pad,
                rank_ordering=rank_ordering, skip_bias_add=skip_bias_add, reduce_output=not reduce_output)  # fmt: skip
        self.tensor_parallel_group = _group(tensor_model_parallel_group)
        world = self.tensor_parallel_group.size()
        self.input_size, self.output_size, self.input_is_parallel = input_size, output_size, input_is_parallel
        self.input_size_per_partition = divide(input_size, world)
        self.weight = _empty((output_size, self.input_size_per_partition), dtype, device)
        torch.nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5)) if not self.weight.is_meta else None
        set_tensor_model_parallel_attributes(self.weight, True, dim=1, stride=1, num_partitions=world)
        if bias:
            self.bias = _empty((output_size,), dtype, device)  # whole on every rank, added after the reduce
            torch.nn.init.zeros_(self.bias) if not self.bias.is_meta else None
        else:
            self.register_parameter("bias", None)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            input_ = mappings.scatter_to_tensor_model_parallel_region(input_, self.tensor_parallel_group)
        output = mappings.reduce_from_tensor_model_parallel_region(
            torch.nn.functional.linear(input_, self.weight), self.tensor_parallel_group
        )
        return output + self.bias if self.bias is not None else output


class ParallelEmbedding(BaseParallelLayer):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        init_method: Any = torch.nn.init.normal_,
        device: torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        shard_across_embedding: bool = False,
        pad: bool = False,
        sequence_parallel_enabled: bool = False,
        tensor_model_parallel_group: Any = None,
        use_spmd_rank: bool = False,
        sequence_dimension: int | None = None,
        tile_cc: bool = False,
        rank_ordering: list[int] | None = None,
        collect_output: bool = True,
    ) -> None:
        super().__init__(device=device)
        _refuse(vocabulary_sharding=not shard_across_embedding, pad=pad, max_norm=max_norm is not None,
                sequence_parallel_enabled=sequence_parallel_enabled, rank_ordering=rank_ordering,
                use_spmd_rank=use_spmd_rank)  # fmt: skip
        self.tensor_model_parallel_group = _group(tensor_model_parallel_group)
        world = self.tensor_model_parallel_group.size()
        self.num_embeddings, self.embedding_dim, self.collect_output = num_embeddings, embedding_dim, collect_output
        self.padding_idx = padding_idx
        self.embedding_dim_per_partition = divide(embedding_dim, world)
        self.weight = _empty((num_embeddings, self.embedding_dim_per_partition), dtype, device)
        init_method(self.weight) if not self.weight.is_meta else None
        set_tensor_model_parallel_attributes(self.weight, True, dim=1, stride=1, num_partitions=world)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        output = torch.nn.functional.embedding(input_.long(), self.weight, self.padding_idx)
        if self.collect_output:
            output = mappings.gather_from_tensor_model_parallel_region(output, self.tensor_model_parallel_group)
        return output


def shard_state_dict(model: torch.nn.Module, checkpoint: dict[str, torch.Tensor], rank: int) -> dict[str, Any]:
    """DOUBLE ONLY: `checkpoint` (full tensors, the model's names) as rank `rank` holds it, the way
    neuronx-distributed's trace.py preprocess_checkpoint / shard_children do: keys the model lacks dropped, each
    parameter marked tensor_model_parallel cut into num_partitions contiguous pieces along partition_dim and
    the rank's piece kept; the rest whole."""
    parameters = dict(model.named_parameters())
    wanted = model.state_dict()
    sharded: dict[str, Any] = {}
    for name, tensor in checkpoint.items():
        if name not in wanted:
            continue
        parameter = parameters.get(name)
        if parameter is not None and getattr(parameter, "tensor_model_parallel", False):
            dim, parts = parameter.partition_dim, parameter.num_partitions
            tensor = tensor.split(divide(tensor.shape[dim], parts), dim=dim)[rank % parts]
        sharded[name] = tensor.detach().clone().contiguous()
    return sharded
