"""The IP-Adapter's CLIP image encoder (`image_encoder`, CLIPVisionModelWithProjection): pixels in, the projected
image embeds, the last hidden state and all hidden states out (the pipeline reads hidden_states[-2])."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec

if TYPE_CHECKING:
    from neuron_export.planning.source import ModelFacts

MODEL_TYPE = "clip-vision-with-projection"


def describe(name: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
    batch = shapes.image_batch
    config = facts.image_encoder
    assert config is not None
    side, channels = int(config["image_size"]), int(config.get("num_channels", 3))
    return ComponentSpec(
        name="image_encoder",
        model_type=MODEL_TYPE,
        task="feature-extraction",
        inputs=(TensorSpec("pixel_values", (batch, channels, side, side)),),
        outputs=("image_embeds", "last_hidden_state", "hidden_states"),
        static_shapes={"batch_size": batch, "num_channels": channels, "height": side, "width": side},
        output_hidden_states=True,
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(folder).eval()


def wrap(model: Any, spec: ComponentSpec) -> Any:
    import torch

    class ImageEncoderForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> tuple:
            out = self.model(pixel_values, output_hidden_states=True, return_dict=True)
            return out.image_embeds, out.last_hidden_state, tuple(out.hidden_states)

    return ImageEncoderForTrace().eval()


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    out = model(pixel_values=inputs[0], output_hidden_states=True, return_dict=True)
    return [out.image_embeds, out.last_hidden_state, *out.hidden_states]
