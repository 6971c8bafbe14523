"""The UNet: SD (4 or 9 channels), SDXL base/refiner (`text_embeds`, `time_ids`), LCM (`timestep_cond`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.components.spec import ComponentSpec, TensorSpec

if TYPE_CHECKING:
    from neuron_export.exporter.source import ModelFacts

SEQUENCE_LENGTH = 77


def describe(facts: ModelFacts, batch: int, height: int, width: int) -> ComponentSpec:
    config = facts.unet
    scale = facts.vae_scale_factor
    channels = facts.unet_in_channels
    latent_h, latent_w = height // scale, width // scale
    inputs = [
        TensorSpec("sample", (batch, channels, latent_h, latent_w)),
        TensorSpec("timestep", (batch,), timestep=True),  # float32 [B]: a 0-dim trace would reject batched steps
        TensorSpec("encoder_hidden_states", (batch, SEQUENCE_LENGTH, int(config["cross_attention_dim"]))),
    ]
    # The runtime passes timestep_cond before the SDXL extras, so that is the traced order too.
    if facts.is_lcm:
        inputs.append(TensorSpec("timestep_cond", (batch, int(config["time_cond_proj_dim"]))))
    if config.get("addition_embed_type") == "text_time":
        time_embed_dim = int(config["addition_time_embed_dim"])
        time_values = 5 if facts.architecture == "sdxl-refiner" else 6  # the refiner's aesthetic score replaces 2 size values
        pooled_dim = int(config["projection_class_embeddings_input_dim"]) - time_values * time_embed_dim
        inputs.append(TensorSpec("text_embeds", (batch, pooled_dim)))
        inputs.append(TensorSpec("time_ids", (batch, time_values)))
    return ComponentSpec(
        name="unet",
        model_type="unet",
        task="semantic-segmentation",
        inputs=tuple(inputs),
        outputs=("sample",),
        static_shapes={
            "batch_size": batch,
            "sequence_length": SEQUENCE_LENGTH,
            "num_channels": channels,
            "height": latent_h,
            "width": latent_w,
            "vae_scale_factor": scale,
        },
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder).eval()


def _call(unet: Any, named: dict[str, Any]) -> Any:
    added = {key: named[key] for key in ("text_embeds", "time_ids") if key in named}
    return unet(
        named["sample"], named["timestep"], named["encoder_hidden_states"],
        timestep_cond=named.get("timestep_cond"),
        added_cond_kwargs=added or None,
        return_dict=False,
    )


def wrap(model: Any, spec: ComponentSpec) -> Any:
    """Positional inputs in the contract's order -> a one-item tuple (the noise prediction)."""
    import torch

    names = [tensor.name for tensor in spec.inputs]

    class UNetForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = model

        def forward(self, *inputs: torch.Tensor) -> tuple:
            return tuple(_call(self.unet, dict(zip(names, inputs)))[:1])

    return UNetForTrace().eval()


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    named = {tensor.name: value for tensor, value in zip(spec.inputs, inputs)}
    added = {key: named[key] for key in ("text_embeds", "time_ids") if key in named}
    out = model(
        sample=named["sample"], timestep=named["timestep"], encoder_hidden_states=named["encoder_hidden_states"],
        timestep_cond=named.get("timestep_cond"), added_cond_kwargs=added or None,
    )
    return [out.sample]
