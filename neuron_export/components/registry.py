"""Which component module handles which component role: the one place that knows them all.

`describe()` is pure (no torch import) so plans and config errors stay instant; each component module
(`text_encoder`, `unet`, `vae`) imports torch only inside the functions that need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neuron_export.components import controlnet, image_encoder, text_encoder, unet, vae
from neuron_export.components.spec import ComponentSpec

if TYPE_CHECKING:
    from neuron_export.exporter.source import ModelFacts


def component_module(name: str) -> Any:
    """The module that loads, wraps and checks this component."""
    if name.startswith("controlnet_"):
        return controlnet
    return {"image_encoder": image_encoder, "text_encoder": text_encoder, "text_encoder_2": text_encoder, "unet": unet,
            "vae_encoder": vae, "vae_decoder": vae}[name]


def describe(name: str, facts: ModelFacts, batch_size: int, num_images_per_prompt: int,
             height: int, width: int) -> ComponentSpec:
    if name in ("text_encoder", "text_encoder_2"):
        return text_encoder.describe(name, facts, batch_size)
    if name == "unet":
        return unet.describe(facts, batch_size * num_images_per_prompt, height, width)
    if name.startswith("controlnet_"):  # called at the UNet's batch, as the pipelines call it
        return controlnet.describe(name, facts, batch_size * num_images_per_prompt, height, width)
    if name == "image_encoder":
        return image_encoder.describe(facts, batch_size * num_images_per_prompt)
    return vae.describe(name, facts, batch_size * num_images_per_prompt, height, width)
