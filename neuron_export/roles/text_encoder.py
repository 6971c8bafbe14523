"""CLIP text encoders: `text_encoder` (CLIPTextModel) and `text_encoder_2` (CLIPTextModelWithProjection, SDXL)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec

if TYPE_CHECKING:
    from neuron_export.planning.source import ModelFacts

SEQUENCE_LENGTH = 77  # CLIP's tokenizer pads every prompt to 77 tokens


def describe(name: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
    batch_size = shapes.batch_size
    config = facts.text_encoder if name == "text_encoder" else facts.text_encoder_2
    assert config is not None, name
    sequence_length = int(config.get("max_position_embeddings", SEQUENCE_LENGTH))
    # SDXL pipelines read hidden_states[-2] from both encoders, so both must return all hidden states.
    hidden_states = facts.is_xl
    if name == "text_encoder":
        outputs: tuple[str, ...] = ("last_hidden_state", "pooler_output")
        model_type = "clip-text-model"
    else:
        outputs = ("text_embeds", "last_hidden_state")
        model_type = "clip-text-with-projection"
    if hidden_states:
        outputs = (*outputs, "hidden_states")
    return ComponentSpec(
        name=name,
        model_type=model_type,
        task="feature-extraction",
        inputs=(TensorSpec("input_ids", (batch_size, sequence_length), "int64", high=int(config["vocab_size"])),),
        outputs=outputs,
        static_shapes={"batch_size": batch_size, "sequence_length": sequence_length},
        output_hidden_states=hidden_states,
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModel if spec.name == "text_encoder" else CLIPTextModelWithProjection
    return model_class.from_pretrained(folder).eval()


def wrap(model: Any, spec: ComponentSpec) -> Any:
    """A module returning the contract's tuple instead of a ModelOutput."""
    import torch

    class TextEncoderForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> tuple:
            out = self.model(input_ids, output_hidden_states=spec.output_hidden_states, return_dict=True)
            return tuple(out[name] for name in spec.outputs)

    return TextEncoderForTrace().eval()


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    """The eager model's outputs, called directly with named arguments."""
    out = model(input_ids=inputs[0], output_hidden_states=spec.output_hidden_states, return_dict=True)
    tensors = [out[name] for name in spec.outputs if name != "hidden_states"]
    if spec.output_hidden_states:
        tensors.extend(out.hidden_states)
    return tensors
