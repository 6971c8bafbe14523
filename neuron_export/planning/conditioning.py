"""The --unet, ControlNets and IP-Adapters added to a pipeline (resolved in planning/sources.py): read from their
configs and safetensors headers, and checked against the UNet before any weight is loaded."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.errors import ExportError
from neuron_export.planning.source import AddOnSource, ModelFacts, ModelSource, _read_json, find_weight_files
from neuron_export.roles.registry import CONTROLNET

if TYPE_CHECKING:
    from neuron_export.planning.config import ExportConfig

# What a ControlNet must share with the UNet for its residuals to fit, and why each matters.
CONTROLNET_MUST_MATCH = (
    ("in_channels", "the latents it reads"),
    ("cross_attention_dim", "the text embeddings it reads"),
    ("block_out_channels", "the residual channels it adds"),
    ("layers_per_block", "the number of residuals it adds"),
    ("down_block_types", "the residuals it adds"),
    ("projection_class_embeddings_input_dim", "the SDXL added embeddings it reads"),
)
# Keys of the IP-Adapter image projections diffusers loads, by what their projection takes.
HIDDEN_STATE_PROJECTIONS = {"image_proj.proj.3.weight": "full-face", "image_proj.latents": "plus"}
EMBEDS_PROJECTIONS = {
    "image_proj.proj.weight": "basic",
    "image_proj.perceiver_resampler.proj_in.weight": "Face ID plus",
    "image_proj.norm.weight": "Face ID",
}


def check_controlnet(value: str, config: dict[str, Any], facts: ModelFacts, model: str) -> None:
    """A ControlNet whose conditioning does not fit the UNet is refused, naming the first field that differs."""
    class_name = config.get("_class_name", "ControlNetModel")
    if class_name != "ControlNetModel":
        raise ExportError(
            f"--controlnet {value}: its config.json names {class_name}, not diffusers' ControlNetModel; "
            "pass a ControlNet (custom code is never run)."
        )
    controlnet_xl = config.get("addition_embed_type") == "text_time"
    if controlnet_xl != facts.is_xl:
        kinds = ("an SDXL", "an SD 1.x/2.x") if controlnet_xl else ("an SD 1.x/2.x", "an SDXL")
        raise ExportError(
            f"--controlnet {value} is {kinds[0]} ControlNet but --model {model} is {kinds[1]} pipeline; "
            "pass a ControlNet trained for this model's architecture."
        )
    unet = facts.unet
    for key, why in CONTROLNET_MUST_MATCH:
        ours, theirs = unet.get(key), config.get(key)
        if key == "layers_per_block":  # an int means the same count in every block
            blocks = len(unet.get("block_out_channels", ()))
            ours, theirs = (list(v) if isinstance(v, (list, tuple)) else [v] * blocks for v in (ours, theirs))
        if ours != theirs:
            raise ExportError(
                f"--controlnet {value} does not fit --model {model}: its {key} is {theirs} where the UNet's "
                f"is {ours} ({why}); pass a ControlNet trained for this model."
            )
    downsampling = 2 ** (len(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1)
    if downsampling != facts.vae_scale_factor:
        raise ExportError(
            f"--controlnet {value} reduces the control image {downsampling}x but the latents are "
            f"{facts.vae_scale_factor}x smaller than the image; pass a ControlNet trained for this model."
        )


def _header(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            return json.loads(handle.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        raise ExportError(
            f"{path} is not a valid safetensors file (its header cannot be read); re-download it."
        ) from None


def check_ip_adapter(source: AddOnSource, encoder: dict[str, Any], facts: ModelFacts) -> int:
    """The adapter takes the image encoder's hidden states (what optimum-neuron's SD pipeline feeds it) and fits
    the UNet and the encoder; returns how many hidden states per image the UNet takes."""
    header = _header(source.path)
    flag = f"--ip-adapter-weight-name {source.path.name}"
    kind = next((name for key, name in EMBEDS_PROJECTIONS.items() if key in header), None)
    if kind is not None and not any(key in header for key in HIDDEN_STATE_PROJECTIONS):
        raise ExportError(
            f"{flag} is a {kind} IP-Adapter (its projection takes CLIP image embeds), which optimum-neuron's "
            "SD pipeline cannot feed (it passes the image encoder's hidden states); use a full-face or "
            "plus adapter such as ip-adapter-full-face_sd15.safetensors."
        )
    if not any(key in header for key in HIDDEN_STATE_PROJECTIONS):
        raise ExportError(
            f"{flag} holds no IP-Adapter image projection (no image_proj.* tensors); pass an IP-Adapter file."
        )
    keys = sorted(key for key in header if key.endswith(".to_k_ip.weight"))
    cross = facts.unet.get("cross_attention_dim")
    for key in keys:
        if header[key]["shape"][1] != cross:
            raise ExportError(
                f"{flag} does not fit the UNet: {key} reads {header[key]['shape'][1]}-wide text embeddings "
                f"where the UNet's cross_attention_dim is {cross}; pass an adapter for this model."
            )
    hidden = int(encoder["hidden_size"])
    width = header.get("image_proj.proj.0.weight", header.get("image_proj.proj_in.weight", {})).get(
        "shape", [0, hidden]
    )[1]
    if width != hidden:
        raise ExportError(
            f"{flag} expects {width}-wide image features but its image encoder's hidden_size is {hidden}; "
            "pass the adapter together with its own image encoder."
        )
    return (int(encoder["image_size"]) // int(encoder["patch_size"])) ** 2 + 1  # patches + the class token


def read_add_ons(config: ExportConfig, source: ModelSource, facts: ModelFacts) -> ModelFacts:
    """The --unet, ControlNets and IP-Adapter the config names (resolved in planning/sources.py), read and checked
    against the model's UNet; their configs and weight files added to the facts."""
    check_replacement_unet(source)
    if not source.controlnets and source.ip_adapter is None:
        return facts
    configs = tuple(
        _read_json(item.path / "config.json", f"--controlnet {item.model_id} config.json")
        for item in source.controlnets
    )
    for item, controlnet_config in zip(source.controlnets, configs):
        check_controlnet(item.model_id, controlnet_config, facts, config.spec.model or "")
    weights = dict(facts.weight_files)
    weights.update(
        {CONTROLNET.component(index): find_weight_files(item.path) for index, item in enumerate(source.controlnets)}
    )
    encoder = None
    tokens = 0
    if source.ip_adapter is not None and source.image_encoder_path is not None:
        encoder = _read_json(source.image_encoder_path / "config.json", "image_encoder/config.json")
        tokens = check_ip_adapter(source.ip_adapter, encoder, facts)
        weights["image_encoder"] = find_weight_files(source.image_encoder_path)
        weights["unet"] = (*weights["unet"], source.ip_adapter.path)  # the adapter's layers are traced into the UNet
    return dataclasses.replace(
        facts, controlnets=configs, image_encoder=encoder, ip_adapter_tokens=tokens, weight_files=weights
    )


# --- the replacement UNet (--unet) ---------------------------------------------------------------------

# What a --unet must share with the model's own UNet to run in its pipeline, and why each matters.
UNET_MUST_MATCH = (
    ("cross_attention_dim", "the width of the text embeddings it reads"),
    ("addition_embed_type", "SDXL's added text and time embeddings"),
    ("projection_class_embeddings_input_dim", "the number of SDXL time ids it reads"),
    ("in_channels", "the latents it reads"),
    ("out_channels", "the latents it writes"),
    ("sample_size", "the latent size it was trained at"),
)
# An SD UNet's text width names the checkpoint it was made for (used in the suggestion).
SD_BASE_FOR_WIDTH = {768: "stable-diffusion-v1-5/stable-diffusion-v1-5", 1024: "stabilityai/stable-diffusion-2-1-base"}


def _unet_kind(config: dict[str, Any]) -> str:
    kind = "an SDXL" if config.get("addition_embed_type") == "text_time" else "an SD 1.x/2.x"
    return kind + (" LCM" if config.get("time_cond_proj_dim") is not None else "") + " UNet"


def check_replacement_unet(source: ModelSource) -> None:
    """A --unet must fit the model it goes into (checked from configs only, before any weight is read); the
    message names --unet, and a command that takes it when one does."""
    own = source.path / "unet" / "config.json"
    if source.unet_path is None or not own.is_file():
        return
    base, replacement = (
        _read_json(own, "unet/config.json"),
        _read_json(source.unet_path / "config.json", "--unet config.json"),
    )
    for key, why in UNET_MUST_MATCH:
        ours, theirs = replacement.get(key), base.get(key)
        if ours == theirs or (isinstance(ours, list) and ours == [theirs] * len(ours)):
            continue
        if replacement.get("addition_embed_type") == "text_time" and base.get("addition_embed_type") != "text_time":
            fix = f"export it into an SDXL pipeline with `neuron-export sd-xl --unet {source.unet_id}`"
        elif base.get("addition_embed_type") == "text_time" and replacement.get("addition_embed_type") != "text_time":
            family = "lcm" if replacement.get("time_cond_proj_dim") is not None else "sd"
            model = SD_BASE_FOR_WIDTH.get(replacement.get("cross_attention_dim", 0))
            fix = (
                f"export it with `neuron-export {family} --model {model} --unet {source.unet_id}`"
                if model
                else f"pass a UNet made for {source.model_id}, or export this one with `neuron-export {family}` and "
                "the --model it was made for"
            )
        else:
            fix = f"pass a UNet made for {source.model_id}"
        raise ExportError(
            f"--unet {source.unet_id} is {_unet_kind(replacement)} with {key} {ours}, but --model "
            f"{source.model_id}'s is {_unet_kind(base)} with {theirs} ({why}); {fix}."
        )
