"""T5 encoders (PixArt-α/-Σ's `text_encoder`, Flux's `text_encoder_2`): `input_ids` -> `last_hidden_state`.

optimum-neuron traces them through neuronx-distributed's ModelBuilder with the weights outside the NEFF, in
`weights/tp{rank}_sharded_checkpoint.safetensors` beside the module; `write_weights` writes those shards.

The attention mask: optimum-neuron's loader never passes one to a `t5-encoder` (its text-encoder part drops it),
so a mask input would make the export unloadable there, and the reference runs the encoder unmasked, which drifts
from diffusers (PixArt's pipelines mask the padding). Where the pipeline masks (PixArt), our traced module takes
`input_ids` alone, as the loader calls it, and computes the mask inside from the padding id: the outputs equal
diffusers'. Flux's pipeline runs its T5 unmasked, so its encoder is traced unmasked too.
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
    # PixArt's pipelines pad to max_sequence_length and pass the padding mask
    traced = {"padding_mask_id": int(config.get("pad_token_id", 0) or 0)} if facts.is_pixart else {}
    return ComponentSpec(
        name=name,
        model_type=MODEL_TYPE,
        task="feature-extraction",
        inputs=(TensorSpec("input_ids", (batch, length), "int64", high=int(config["vocab_size"])),),
        outputs=("last_hidden_state",),
        static_shapes={"batch_size": batch, "sequence_length": length},
        traced=traced
        if shapes.tensor_parallel_size == 1
        else {**traced, "tensor_parallel_size": shapes.tensor_parallel_size},
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(folder).eval()


def _encode(model: Any, spec: ComponentSpec, input_ids: Any) -> Any:
    pad = spec.traced.get("padding_mask_id")
    mask = None if pad is None else (input_ids != pad).long()
    return model(input_ids=input_ids, attention_mask=mask, return_dict=True).last_hidden_state


def wrap(model: Any, spec: ComponentSpec) -> Any:
    """`input_ids` -> a one-item tuple (the last hidden state)."""
    import torch

    class T5EncoderForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple:
            return (_encode(self.model, spec, input_ids),)

    return T5EncoderForTrace().eval()


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    """The eager encoder called as the pipeline calls it: with the padding mask where the pipeline gives one."""
    return [_encode(model, spec, inputs[0])]


def write_weights(model: Any, spec: ComponentSpec, directory: Path) -> list[str]:
    """The weight shards ModelBuilder keeps beside the module, written flat into `directory`; returns their paths
    inside the component folder (`weights/tp0_sharded_checkpoint.safetensors`, ...): one per rank below the
    spec's tensor parallel size. Each holds the whole state dict under the source's names, each tensor its own
    contiguous copy (tied ones included): the CPU module runs unsplit, so every rank's shard is the same superset
    (neuronx-distributed slices the parallel layers per rank; the loader hands every shard to the module)."""
    from safetensors.torch import save_file

    ranks = int(spec.traced.get("tensor_parallel_size", 1))
    state = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    # one metadata key: safetensors writes a metadata map in a per-process random order, and a shard's bytes must
    # depend only on its cache key (built on another host or Ray node, it is the same file)
    metadata = {"format": "pt"}
    for rank in range(ranks):
        save_file(state, str(directory / shard_name(rank)), metadata=metadata)
    return [f"{WEIGHTS_FOLDER}/{shard_name(rank)}" for rank in range(ranks)]
