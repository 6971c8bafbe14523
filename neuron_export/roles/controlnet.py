"""ControlNets (one component per --controlnet, numbered in that order): the noisy latents, text embeddings and
a control image in, the residuals the UNet adds out (a tuple of down-block residuals, then the mid-block residual)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles.registry import CONTROLNET
from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec
from neuron_export.roles.unet import SEQUENCE_LENGTH

if TYPE_CHECKING:
    from neuron_export.planning.source import ModelFacts

OUTPUTS = ("down_block_res_samples", "mid_block_res_sample")


def describe(name: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
    """The runtime's order: sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, then the
    SDXL extras. The scale is one value per call (the runtime splits a [2] scale over the two NeuronCores)."""
    config = facts.controlnets[CONTROLNET.index(name)]
    batch, height, width = shapes.image_batch, shapes.height, shapes.width  # the UNet's batch, as the pipelines call it
    scale = facts.vae_scale_factor
    latent_h, latent_w = height // scale, width // scale
    channels = int(config.get("in_channels", 4))
    cross = int(config["cross_attention_dim"])
    inputs = [
        TensorSpec("sample", (batch, channels, latent_h, latent_w)),
        TensorSpec("timestep", (batch,), timestep=True),
        TensorSpec("encoder_hidden_states", (batch, SEQUENCE_LENGTH, cross)),
        TensorSpec("controlnet_cond", (batch, int(config.get("conditioning_channels", 3)), height, width)),
        TensorSpec("conditioning_scale", (1,)),
    ]
    if config.get("addition_embed_type") == "text_time":
        time_values = 6
        pooled = int(config["projection_class_embeddings_input_dim"]) - time_values * int(
            config["addition_time_embed_dim"]
        )
        inputs += [TensorSpec("text_embeds", (batch, pooled)), TensorSpec("time_ids", (batch, time_values))]
    return ComponentSpec(
        name=name,
        model_type="controlnet",
        task="semantic-segmentation",
        inputs=tuple(inputs),
        outputs=OUTPUTS,
        static_shapes={
            "batch_size": batch,
            "sequence_length": SEQUENCE_LENGTH,
            "num_channels": channels,
            "height": latent_h,
            "width": latent_w,
            "vae_scale_factor": scale,
            "encoder_hidden_size": cross,
        },
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(folder).eval()


def _arguments(named: dict[str, Any]) -> dict[str, Any]:
    added = {key: named[key] for key in ("text_embeds", "time_ids") if key in named}
    return {
        "sample": named["sample"],
        "timestep": named["timestep"],
        "encoder_hidden_states": named["encoder_hidden_states"],
        "controlnet_cond": named["controlnet_cond"],
        "conditioning_scale": named["conditioning_scale"],
        "added_cond_kwargs": added or None,
        "guess_mode": False,
    }


def wrap(model: Any, spec: ComponentSpec) -> Any:
    """Positional inputs in the contract's order -> (tuple of down-block residuals, mid-block residual)."""
    import torch

    names = [tensor.name for tensor in spec.inputs]

    class ControlNetForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.controlnet = model

        def forward(self, *inputs: torch.Tensor) -> tuple:
            downs, mid = self.controlnet(**_arguments(dict(zip(names, inputs))), return_dict=False)
            return tuple(downs), mid

    return ControlNetForTrace().eval()


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    out = model(**_arguments({tensor.name: value for tensor, value in zip(spec.inputs, inputs)}))
    return [*out.down_block_res_samples, out.mid_block_res_sample]
