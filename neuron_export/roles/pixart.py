"""PixArt-α/-Σ's diffusion transformer: (sample, encoder_hidden_states, timestep, encoder_attention_mask) ->
`out_hidden_states` (the noise prediction, with the learned variance channels when out_channels is twice in)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec
from neuron_export.roles.t5 import sequence_length

if TYPE_CHECKING:
    from neuron_export.planning.source import ModelFacts

MODEL_TYPE = "pixart-transformer-2d"


def describe(name: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
    config = facts.transformer
    assert config is not None, name
    batch, scale = shapes.image_batch, facts.vae_scale_factor
    latent_h, latent_w = shapes.height // scale, shapes.width // scale
    channels = int(config.get("in_channels", 4))
    length = sequence_length(facts, shapes)
    hidden = int((facts.text_encoder or {})["d_model"])
    return ComponentSpec(
        name=name,
        model_type=MODEL_TYPE,
        task="semantic-segmentation",
        inputs=(
            TensorSpec("sample", (batch, channels, latent_h, latent_w)),
            TensorSpec("encoder_hidden_states", (batch, length, hidden)),
            TensorSpec("timestep", (batch,), timestep=True),
            TensorSpec("encoder_attention_mask", (batch, length), "int64", high=2),
        ),
        outputs=("out_hidden_states",),
        static_shapes={
            "batch_size": batch,
            "sequence_length": length,
            "num_channels": channels,
            "height": latent_h,
            "width": latent_w,
            "vae_scale_factor": scale,
            "encoder_hidden_size": hidden,
        },
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(folder).eval()


def _conditions(model: Any, sample: Any, spec: ComponentSpec) -> dict[str, Any]:
    """The resolution and aspect-ratio conditioning PixArt-α 1024 takes, fixed by the export's static size (the
    reference passes None, so it cannot export such a model); other transformers ignore it."""
    import torch

    if not model.use_additional_conditions:
        return {"resolution": None, "aspect_ratio": None}
    statics = spec.static_shapes
    height, width = statics["height"] * statics["vae_scale_factor"], statics["width"] * statics["vae_scale_factor"]
    batch = sample.shape[0]
    resolution = torch.tensor([[height, width]], dtype=sample.dtype).repeat(batch, 1)
    aspect_ratio = torch.tensor([[height / width]], dtype=sample.dtype).repeat(batch, 1)
    return {"resolution": resolution, "aspect_ratio": aspect_ratio}


def _call(model: Any, spec: ComponentSpec, inputs: list[Any] | tuple[Any, ...]) -> Any:
    sample, encoder_hidden_states, timestep, encoder_attention_mask = inputs
    return model(
        hidden_states=sample,
        encoder_hidden_states=encoder_hidden_states,
        timestep=timestep,
        encoder_attention_mask=encoder_attention_mask,
        added_cond_kwargs=_conditions(model, sample, spec),
        return_dict=False,
    )[0]


def wrap(model: Any, spec: ComponentSpec) -> Any:
    """The contract's four positional inputs -> a one-item tuple."""
    import torch

    class PixArtTransformerForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> tuple:
            return (_call(self.model, spec, inputs),)

    return PixArtTransformerForTrace().eval()


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    return [_call(model, spec, inputs)]
