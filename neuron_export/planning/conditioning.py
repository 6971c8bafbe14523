"""ControlNets and IP-Adapters added to a pipeline: resolved (local directory or hub snapshot), read from their
configs and safetensors headers, and checked against the UNet before any weight is loaded."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

from neuron_export.errors import ExportError
from neuron_export.planning.source import (
    HUB_PICKLE_PATTERNS,
    HUB_WEIGHT_PATTERNS,
    AddOnSource,
    ModelFacts,
    ModelSource,
    _read_json,
    find_weight_files,
    hub_download,
    looks_like_hub_id,
)
from neuron_export.roles.registry import CONTROLNET

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


def _resolve(
    value: str, flag: str, patterns: list[str], token: str | None, cache_dir: Path | None, offline: bool
) -> tuple[Path, str | None]:
    if looks_like_hub_id(value):
        return hub_download(value, None, patterns, token, cache_dir, offline, flag=flag)
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ExportError(f"{flag} {value}: directory does not exist; pass a directory or a hub id like org/name.")
    return root, None


def resolve_controlnet(value: str, token: str | None, cache_dir: Path | None, offline: bool) -> AddOnSource:
    """A ControlNet directory (its config.json at the root, or in controlnet/), or a hub snapshot of its configs
    only: its weights are fetched once it is known to fit (fetch_controlnet_weights)."""
    root, commit = _resolve(value, "--controlnet", ["config.json", "controlnet/config.json"], token, cache_dir, offline)
    path = root / "controlnet" if (root / "controlnet" / "config.json").is_file() else root
    if not (path / "config.json").is_file():
        raise ExportError(
            f"--controlnet {value} has no config.json; pass a diffusers ControlNetModel directory or hub id."
        )
    return AddOnSource(model_id=value, path=path, commit=commit)


def fetch_controlnet_weights(item: AddOnSource, token: str | None, cache_dir: Path | None, offline: bool) -> None:
    """A hub ControlNet's weights, at the commit its config came from: safetensors, else an older checkpoint's .bin."""
    if not looks_like_hub_id(item.model_id):
        return
    folder = f"{item.path.name}/" if item.path.name == "controlnet" else ""
    for patterns in (HUB_WEIGHT_PATTERNS, HUB_PICKLE_PATTERNS):
        hub_download(
            item.model_id,
            item.commit,
            [f"{folder}{name}" for name in patterns],
            token,
            cache_dir,
            offline,
            flag="--controlnet",
        )
        if any(item.path.glob("*.safetensors")):
            return


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


def resolve_ip_adapter(
    value: str, subfolder: str | None, weight_name: str, token: str | None, cache_dir: Path | None, offline: bool
) -> tuple[AddOnSource, Path]:
    """The adapter's weight file and the CLIP image encoder beside it (SUBFOLDER/image_encoder, as diffusers looks)."""
    if not weight_name.endswith(".safetensors"):
        raise ExportError(
            f"--ip-adapter-weight-name {weight_name} is not a .safetensors file; neuron-export reads "
            "adapters from safetensors only (no pickle is unpickled); pass the .safetensors file."
        )
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    patterns = [f"{prefix}{weight_name}", f"{prefix}image_encoder/config.json"]  # encoder weights once it fits
    root, commit = _resolve(value, "--ip-adapter", patterns, token, cache_dir, offline)
    weight_file = root / prefix / weight_name
    if not weight_file.is_file():
        where = f"{value}/{prefix}" if prefix else value
        raise ExportError(
            f"--ip-adapter-weight-name {weight_name}: no such file in {where}; check the name "
            "(and --ip-adapter-subfolder)."
        )
    return AddOnSource(model_id=value, path=weight_file, commit=commit), root / prefix / "image_encoder"


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


def add_conditioning(config: Any, source: ModelSource, facts: ModelFacts) -> tuple[ModelSource, ModelFacts]:
    """The ControlNets and IP-Adapter the config names, resolved, read and checked; their weight files added."""
    if not config.controlnet and config.ip_adapter is None:
        return source, facts
    hub = {"token": config.token, "cache_dir": config.hub_cache_dir, "offline": config.offline}
    controlnets = tuple(resolve_controlnet(value, **hub) for value in config.controlnet)
    configs = tuple(
        _read_json(item.path / "config.json", f"--controlnet {item.model_id} config.json") for item in controlnets
    )
    for item, controlnet_config in zip(controlnets, configs):
        check_controlnet(item.model_id, controlnet_config, facts, config.model)
    for item in controlnets:  # only now that they all fit
        fetch_controlnet_weights(item, **hub)
    weights = dict(facts.weight_files)
    weights.update(
        {CONTROLNET.component(index): find_weight_files(item.path) for index, item in enumerate(controlnets)}
    )
    adapter = encoder_path = encoder = None
    tokens = 0
    if config.ip_adapter is not None:
        adapter, encoder_path = resolve_ip_adapter(
            config.ip_adapter, config.ip_adapter_subfolder, config.ip_adapter_weight_name, **hub
        )
        if (source.path / "image_encoder" / "config.json").is_file():  # the pipeline's own encoder comes first
            encoder_path = source.path / "image_encoder"
        if not (encoder_path / "config.json").is_file():
            raise ExportError(
                f"--ip-adapter {config.ip_adapter}: no image encoder at {encoder_path} (diffusers looks in "
                "SUBFOLDER/image_encoder); pass the repository that holds it."
            )
        encoder = _read_json(encoder_path / "config.json", "image_encoder/config.json")
        tokens = check_ip_adapter(adapter, encoder, facts)
        if looks_like_hub_id(config.ip_adapter) and encoder_path.parent == adapter.path.parent:
            prefix = f"{config.ip_adapter_subfolder.strip('/')}/" if config.ip_adapter_subfolder else ""
            hub_download(
                config.ip_adapter,
                adapter.commit,
                [f"{prefix}image_encoder/{name}" for name in HUB_WEIGHT_PATTERNS],
                flag="--ip-adapter",
                **hub,
            )
        weights["image_encoder"] = find_weight_files(encoder_path)
        weights["unet"] = (*weights["unet"], adapter.path)  # the adapter's layers are traced into the UNet
    source = dataclasses.replace(source, controlnets=controlnets, ip_adapter=adapter, image_encoder_path=encoder_path)
    facts = dataclasses.replace(
        facts, controlnets=configs, image_encoder=encoder, ip_adapter_tokens=tokens, weight_files=weights
    )
    return source, facts


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
