"""LoRA fusion, the worker's side: the adapters' layers for the one component being built are loaded, combined at
their scales and fused into its weights in place, then the LoRA layers are removed, so the traced module is the
plain model with updated weights (a sharded role's weights/ shards are written from it, so they hold the LoRA).
Stable Diffusion's UNet and text encoders, Flux's transformer and CLIP text encoder.

The steps are diffusers' own (the same conversion of kohya names, the same PEFT layers and merge), applied to one
component: the weights equal a diffusers pipeline after `load_lora_weights(..., adapter_name=...)` per adapter,
`set_adapters(names, scales)` and `fuse_lora()`. Only this component's keys are read from each LoRA file, and
fusing adds each low-rank product to the weight it belongs to, so no second copy of the model is made.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuron_export.planning.lora import LoraFusion

METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps an adapter's LoraConfig in the file's header


def read_layers(fusion: LoraFusion) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """This component's tensors from the LoRA file (nothing else is read), and diffusers' adapter metadata."""
    from safetensors import safe_open

    with safe_open(str(fusion.path), framework="pt") as handle:
        header = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(fusion.key_prefixes)}
    raw = header.get(METADATA_KEY)
    return tensors, (json.loads(raw) if raw else None)


def fuse(model: Any, component: str, fusions: tuple[LoraFusion, ...]) -> None:
    """Fuse `fusions` (in order) into `model`, the loaded `component`; leaves a model without LoRA layers."""
    import warnings

    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    warnings.filterwarnings("ignore", module=r"peft\..*")  # "several adapters in one model" is what we mean to do
    if component == "transformer":  # Flux's: no other transformer is given a LoRA (planning refuses PixArt's)
        fuse_into_transformer(model, fusions)
        return
    mixin = (
        StableDiffusionXLLoraLoaderMixin
        if any(f.unet_config_mapping for f in fusions)
        else StableDiffusionLoraLoaderMixin
    )
    for fusion in fusions:
        tensors, metadata = read_layers(fusion)
        options = {"unet_config": model.config} if fusion.unet_config_mapping else {}
        state_dict, network_alphas = mixin.lora_state_dict(tensors, **options)
        extra = {"metadata": metadata} if metadata else {}
        if component == "unet":
            mixin.load_lora_into_unet(state_dict, network_alphas, unet=model, adapter_name=fusion.adapter_name, **extra)
        else:
            mixin.load_lora_into_text_encoder(
                state_dict,
                network_alphas,
                text_encoder=model,
                prefix=component,
                adapter_name=fusion.adapter_name,
                **extra,
            )
        del tensors, state_dict
    names = [fusion.adapter_name for fusion in fusions]
    scales = [fusion.scale for fusion in fusions]
    if component == "unet":
        model.set_adapters(names, scales)
        model.fuse_lora()
        model.unload_lora()
    else:
        from diffusers.loaders.lora_base import (
            _remove_text_encoder_monkey_patch,
            fuse_text_encoder_lora,
            set_adapters_for_text_encoder,
        )

        set_adapters_for_text_encoder(names, model, scales)
        fuse_text_encoder_lora(model)
        _remove_text_encoder_monkey_patch(model)


def fuse_into_transformer(model: Any, fusions: tuple[LoraFusion, ...]) -> None:
    """Flux's transformer, as diffusers' FluxPipeline.load_lora_weights loads each adapter into it (its own key
    conversions, the same PEFT layers), then set_adapters and fuse_lora."""
    from diffusers.loaders import FluxLoraLoaderMixin

    for fusion in fusions:
        tensors, metadata = read_layers(fusion)
        state_dict, network_alphas = FluxLoraLoaderMixin.lora_state_dict(tensors, return_alphas=True)
        extra = {"metadata": metadata} if metadata else {}
        FluxLoraLoaderMixin.load_lora_into_transformer(
            state_dict, network_alphas, transformer=model, adapter_name=fusion.adapter_name, **extra
        )
        del tensors, state_dict
    model.set_adapters([fusion.adapter_name for fusion in fusions], [fusion.scale for fusion in fusions])
    model.fuse_lora()
    model.unload_lora()
