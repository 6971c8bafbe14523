"""The VAE, exported as two modules: `vae_encoder` (image -> latent moments) and `vae_decoder` (latents -> image)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec

if TYPE_CHECKING:
    from neuron_export.planning.source import ModelFacts


def describe(name: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
    batch, height, width = shapes.image_batch, shapes.height, shapes.width
    scale = facts.vae_scale_factor
    if name == "vae_encoder":
        channels = int(facts.vae.get("in_channels", 3))
        return ComponentSpec(
            name=name,
            model_type="vae-encoder",
            task="semantic-segmentation",
            inputs=(TensorSpec("sample", (batch, channels, height, width)),),
            outputs=("latent_parameters",),
            static_shapes={"batch_size": batch, "num_channels": channels, "height": height, "width": width},
        )
    channels = int(facts.vae.get("latent_channels", 4))
    latent_h, latent_w = height // scale, width // scale
    return ComponentSpec(
        name=name,
        model_type="vae-decoder",
        task="semantic-segmentation",
        inputs=(TensorSpec("latent_sample", (batch, channels, latent_h, latent_w)),),
        outputs=("sample",),
        static_shapes={"batch_size": batch, "num_channels": channels, "height": latent_h, "width": latent_w},
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder).eval()
    # Each export needs only its half; dropping the other halves the memory the trace holds.
    if spec.name == "vae_encoder":
        vae.decoder = None
        vae.post_quant_conv = None
    else:
        vae.encoder = None
        vae.quant_conv = None
    return vae


def wrap(model: Any, spec: ComponentSpec) -> Any:
    """Returns the dict the runtime expects (it calls `.values()` on VAE outputs)."""
    import torch

    class VaeEncoderForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = model

        def forward(self, sample: torch.Tensor) -> dict:
            return {"latent_parameters": self.vae.encode(sample).latent_dist.parameters}

    class VaeDecoderForTrace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vae = model

        def forward(self, latent_sample: torch.Tensor) -> dict:
            return {"sample": self.vae.decode(latent_sample).sample}

    wrapper = VaeEncoderForTrace() if spec.name == "vae_encoder" else VaeDecoderForTrace()
    return wrapper.eval()


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    if spec.name == "vae_encoder":
        return [model.encode(inputs[0]).latent_dist.parameters]
    return [model.decode(inputs[0]).sample]
