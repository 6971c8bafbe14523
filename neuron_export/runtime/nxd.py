"""A CPU stand-in of neuronx-distributed's runtime, for the sharded roles (T5 encoders, the Flux transformer) on
--backend cpu: their artifact is laid out as a ModelBuilder artifact is, and computes only with the weights its
`weights/tp{rank}_sharded_checkpoint.safetensors` shards give it.

The artifact (TorchScript, loadable by `torch.jit.load` alone) holds no weights. Its `nxd_model` submodule has
`initialize(checkpoint: List[Dict[str, Tensor]], start_rank: Tensor)`, as optimum-neuron's loader calls it
(optimum/neuron/modeling_traced.py NeuronTracedModel.load_model: one state dict per rank, read from the component's
`weights/` folder, and `torch.tensor([0], dtype=int32)`); until it is called the module refuses to compute. The
traced graph takes the weights as inputs (the wrapper's parameters and buffers swapped for them while tracing), so
whatever initialize was given is what it computes with. A shard with a missing, unexpected, misshapen or mistyped
tensor is refused, naming the tensor.

This module imports torch: import it only where a sharded artifact is built or loaded. Its annotations are
evaluated (no `from __future__ import annotations`): TorchScript reads the scripted classes' ones.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple  # noqa: UP035  (TorchScript reads these annotations)

import torch

from neuron_export.errors import ExportError
from neuron_export.files import WEIGHTS_FOLDER, component_shards

MAX_INPUTS = 8  # the artifact's forward takes up to this many positional tensors (Flux's transformer takes 6)
START_RANK = 0  # ranks this process holds begin at 0, as optimum's loader passes it


@contextmanager
def weights_swapped(module: torch.nn.Module, names: list[str], weights: list[torch.Tensor]) -> Iterator[None]:
    """`module` computing with `weights` in place of its parameters and buffers of those names (state-dict
    names), put back afterwards. Tied names (one tensor under two names) end on the later one."""
    saved = []
    try:
        for name, tensor in zip(names, weights, strict=True):
            path, _, attribute = name.rpartition(".")
            owner = module.get_submodule(path)
            slot = owner._parameters if attribute in owner._parameters else owner._buffers
            if attribute not in slot:
                raise KeyError(f"{name} is neither a parameter nor a buffer of the module")
            saved.append((slot, attribute, slot[attribute]))
            slot[attribute] = tensor
        yield
    finally:
        for slot, attribute, original in reversed(saved):
            slot[attribute] = original


class WeightsAsInputs(torch.nn.Module):
    """What is traced: the wrapper's forward on (inputs, weights), its own weights never read. The wrapper is
    kept outside the module's registered children, so the traced module holds no copy of them."""

    def __init__(self, wrapper: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.__dict__["wrapped"] = wrapper  # not a registered child: its weights stay out of what is traced
        self.names = names

    def forward(self, inputs: list[torch.Tensor], weights: list[torch.Tensor]) -> Any:
        with weights_swapped(self.wrapped, self.names, weights):
            return self.wrapped(*inputs)


class NxDModel(torch.nn.Module):
    """The `nxd_model` of a sharded CPU artifact: the traced computation and the weights initialize gave it."""

    names: List[str]  # noqa: UP006
    shapes: List[List[int]]  # noqa: UP006
    dtype_names: List[str]  # noqa: UP006
    dtypes: List[torch.Tensor]  # noqa: UP006  (an empty tensor of each weight's dtype)
    weights: List[torch.Tensor]  # noqa: UP006
    tp_degree: int
    input_count: int

    def __init__(self, compute: Any, state: dict[str, torch.Tensor], tp_degree: int, input_count: int) -> None:
        super().__init__()
        self.compute = compute
        self.names = list(state)
        self.shapes = [list(tensor.shape) for tensor in state.values()]
        self.dtype_names = [str(tensor.dtype).removeprefix("torch.") for tensor in state.values()]
        self.dtypes = [torch.empty(0, dtype=tensor.dtype) for tensor in state.values()]
        self.weights = []
        self.tp_degree = tp_degree
        self.input_count = input_count

    @torch.jit.export
    def initialize(self, checkpoint: List[Dict[str, torch.Tensor]], start_rank: torch.Tensor) -> None:  # noqa: UP006
        if len(checkpoint) != self.tp_degree:
            raise RuntimeError(
                "nxd_model.initialize takes one shard per rank of tensor parallelism ("
                + str(self.tp_degree)
                + "), got "
                + str(len(checkpoint))
            )
        # On the CPU the shards are unsplit: every rank's holds the whole state dict, so rank 0's is the model.
        shard = checkpoint[0]
        weights: List[torch.Tensor] = []  # noqa: UP006
        for index in range(len(self.names)):
            name = self.names[index]
            if name not in shard:
                raise RuntimeError("the rank 0 shard has no tensor " + name)
            tensor = shard[name]
            if tensor.shape != self.shapes[index]:
                raise RuntimeError(
                    "the rank 0 shard's "
                    + name
                    + " has shape "
                    + str(tensor.shape)
                    + " where the module computes with "
                    + str(self.shapes[index])
                )
            if tensor.dtype != self.dtypes[index].dtype:
                raise RuntimeError(
                    "the rank 0 shard's " + name + " is not " + self.dtype_names[index] + ", the dtype it was traced in"
                )
            weights.append(tensor)
        for name in shard.keys():
            if name not in self.names:
                raise RuntimeError("the rank 0 shard has a tensor the module does not compute with: " + name)
        self.weights = weights

    def forward(self, inputs: List[torch.Tensor]) -> Tuple[torch.Tensor]:  # noqa: UP006
        if len(self.weights) != len(self.names):
            raise RuntimeError(
                "this artifact computes with the weights of its weights/ shards: call "
                "nxd_model.initialize(shards, start_rank) first"
            )
        if len(inputs) != self.input_count:
            raise RuntimeError("this artifact takes " + str(self.input_count) + " inputs, got " + str(len(inputs)))
        return self.compute(inputs, self.weights)


class ShardedArtifact(torch.nn.Module):
    """The saved module: positional tensors in, the traced outputs out, computed by `nxd_model`."""

    def __init__(self, nxd_model: NxDModel) -> None:
        super().__init__()
        self.nxd_model = nxd_model

    def forward(
        self,
        input_0: torch.Tensor,
        input_1: Optional[torch.Tensor] = None,  # noqa: UP045
        input_2: Optional[torch.Tensor] = None,  # noqa: UP045
        input_3: Optional[torch.Tensor] = None,  # noqa: UP045
        input_4: Optional[torch.Tensor] = None,  # noqa: UP045
        input_5: Optional[torch.Tensor] = None,  # noqa: UP045
        input_6: Optional[torch.Tensor] = None,  # noqa: UP045
        input_7: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> Tuple[torch.Tensor]:  # noqa: UP006
        inputs = [input_0]
        for given in [input_1, input_2, input_3, input_4, input_5, input_6, input_7]:
            if given is not None:
                inputs.append(given)
        return self.nxd_model(inputs)


def build(wrapper: torch.nn.Module, example_inputs: list[Any], tp_degree: int) -> tuple[Any, dict[str, Any]]:
    """The sharded artifact of `wrapper` (scripted, holding no weights) and the state dict its shards hold: every
    tensor the wrapper's state dict names, each its own contiguous copy (tied ones included)."""
    if len(example_inputs) > MAX_INPUTS:
        raise ValueError(f"a sharded artifact takes at most {MAX_INPUTS} inputs, not {len(example_inputs)}")
    state = {name: tensor.detach().clone().contiguous() for name, tensor in wrapper.state_dict().items()}
    names = list(state)
    with torch.no_grad():
        compute = torch.jit.trace(
            WeightsAsInputs(wrapper, names),
            (list(example_inputs), [state[name] for name in names]),
            strict=False,
            check_trace=False,
        )
    artifact = torch.jit.script(ShardedArtifact(NxDModel(compute, state, tp_degree, len(example_inputs))))
    return artifact, state


def jit_message(error: BaseException) -> str:
    """The sentence a TorchScript `raise` carried, without the interpreter's traceback around it."""
    text = str(error).strip()
    marker = "RuntimeError: "
    return text.rsplit(marker, 1)[-1].strip() if marker in text else text.splitlines()[-1]


def initialize(module: Any, artifact: Path) -> Any:
    """Give a loaded artifact with an `nxd_model` its shards (beside it, or in its `weights/` folder), one state
    dict per rank in rank order, as optimum-neuron's loader does; a module without one is returned as it is."""
    if not hasattr(module, "nxd_model"):
        return module
    from safetensors.torch import load_file

    component = artifact.parent.name
    shards = component_shards(artifact)
    if not shards:
        raise ExportError(
            f"{component}/{artifact.name} computes with the weights in {component}/{WEIGHTS_FOLDER}/, and there "
            "are none; re-export the model (or run `neuron-export verify`)."
        )
    try:
        module.nxd_model.initialize(
            [load_file(str(shard)) for shard in shards], torch.tensor([START_RANK], dtype=torch.int32)
        )
    except (RuntimeError, torch.jit.Error) as error:  # a TorchScript raise arrives as torch.jit.Error
        raise ExportError(
            f"{component}'s weights in {component}/{WEIGHTS_FOLDER}/ do not fit its module: {jit_message(error)}; "
            "re-export the model (or run `neuron-export verify`)."
        ) from None
    return module
