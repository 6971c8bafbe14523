"""T5 encoders (PixArt-α/-Σ's `text_encoder`, Flux's `text_encoder_2`): `input_ids` -> `last_hidden_state`.

optimum-neuron traces them through neuronx-distributed's ModelBuilder with the weights outside the NEFF, in
`weights/tp{rank}_sharded_checkpoint.safetensors` beside the module; `write_weights` writes those shards. Like the
reference, the encoder is traced without its attention mask: optimum-neuron's loader never passes one to a
`t5-encoder` (its text-encoder part drops it), so a mask input would make the export unloadable there.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec

if TYPE_CHECKING:
    from neuron_export.planning.source import ModelFacts

MODEL_TYPE = "t5-encoder"
WEIGHTS_FOLDER = "weights"
DEFAULT_SEQUENCE_LENGTH = 120  # PixArt-α's max_sequence_length, used when the tokenizer states no limit


def shard_name(rank: int) -> str:
    return f"tp{rank}_sharded_checkpoint.safetensors"


def sequence_length(facts: ModelFacts, shapes: Shapes) -> int:
    """--sequence-length, else the tokenizer's model_max_length (as optimum-neuron's exporter decides)."""
    return shapes.sequence_length or facts.tokenizer_max_length or DEFAULT_SEQUENCE_LENGTH


def describe(name: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
    config = facts.text_encoder if name == "text_encoder" else facts.text_encoder_2
    assert config is not None, name
    batch, length = shapes.batch_size, sequence_length(facts, shapes)
    return ComponentSpec(
        name=name,
        model_type=MODEL_TYPE,
        task="feature-extraction",
        inputs=(TensorSpec("input_ids", (batch, length), "int64", high=int(config["vocab_size"])),),
        outputs=("last_hidden_state",),
        static_shapes={"batch_size": batch, "sequence_length": length},
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(folder).eval()


def wrap(model: Any, spec: ComponentSpec) -> Any:
    """`input_ids` -> a one-item tuple (the last hidden state)."""
    import torch

    class T5EncoderForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple:
            return (self.model(input_ids=input_ids, return_dict=True).last_hidden_state,)

    return T5EncoderForTrace().eval()


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    return [model(input_ids=inputs[0], return_dict=True).last_hidden_state]


def write_weights(model: Any, spec: ComponentSpec, directory: Path, tensor_parallel_size: int = 1) -> list[str]:
    """The weight shards ModelBuilder keeps beside the module, written flat into `directory`; returns their paths
    inside the component folder (`weights/tp0_sharded_checkpoint.safetensors`, ...). At tp 1 the one shard holds
    the whole state dict under transformers' names, each tensor its own contiguous copy (tied ones included)."""
    from safetensors.torch import save_file

    if tensor_parallel_size != 1:
        raise NotImplementedError("T5 shards for tensor parallelism above 1")
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(directory / shard_name(0)))
    return [f"{WEIGHTS_FOLDER}/{shard_name(0)}"]
