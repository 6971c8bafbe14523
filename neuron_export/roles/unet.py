"""The UNet: SD (4, 8 or 9 channels), SDXL base/refiner (`text_embeds`, `time_ids`), LCM (`timestep_cond`),
ControlNet residuals and IP-Adapter image embeds."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec

if TYPE_CHECKING:
    from neuron_export.planning.source import ModelFacts

SEQUENCE_LENGTH = 77
MID_RESIDUAL, DOWN_RESIDUAL, IMAGE_EMBEDS = (
    "mid_block_additional_residual",
    "down_block_additional_residuals",
    "image_embeds",
)


def residual_shapes(
    config: dict[str, Any], batch: int, height: int, width: int
) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
    """The down-block residuals (conv_in, each resnet, each downsampler) and the mid-block residual a ControlNet
    returns and the UNet adds, at latent size height x width."""
    channels = list(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(channels)
    downs: list[tuple[int, ...]] = [(batch, channels[0], height, width)]
    for index, (width_channels, count) in enumerate(zip(channels, layers)):
        downs += [(batch, width_channels, height, width)] * int(count)
        if index < len(channels) - 1:
            height, width = (height + 1) // 2, (width + 1) // 2  # a stride-2 convolution with padding 1
            downs.append((batch, width_channels, height, width))
    return downs, (batch, channels[-1], height, width)


def describe(name: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
    batch, height, width = shapes.image_batch, shapes.height, shapes.width
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
    if facts.controlnets:  # optimum-neuron's runtime passes the mid-block residual before the down-block ones
        downs, mid = residual_shapes(config, batch, latent_h, latent_w)
        inputs.append(TensorSpec(MID_RESIDUAL, mid))
        inputs += [TensorSpec(f"{DOWN_RESIDUAL}_{index}", shape) for index, shape in enumerate(downs)]
    if config.get("addition_embed_type") == "text_time":
        time_embed_dim = int(config["addition_time_embed_dim"])
        # the refiner's aesthetic score replaces 2 size values
        time_values = 5 if facts.architecture == "sdxl-refiner" else 6
        pooled_dim = int(config["projection_class_embeddings_input_dim"]) - time_values * time_embed_dim
        inputs.append(TensorSpec("text_embeds", (batch, pooled_dim)))
        inputs.append(TensorSpec("time_ids", (batch, time_values)))
    if facts.ip_adapter_tokens:  # the image encoder's hidden states for one image prompt, after the SDXL extras
        hidden = int((facts.image_encoder or {})["hidden_size"])
        inputs.append(TensorSpec(IMAGE_EMBEDS, (batch, 1, facts.ip_adapter_tokens, hidden)))
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

    unet = UNet2DConditionModel.from_pretrained(folder).eval()
    if spec.add_ons.get("ip_adapter_file"):
        load_ip_adapter(unet, Path(spec.add_ons["ip_adapter_file"]), float(spec.add_ons["ip_adapter_scale"]))
    return unet


def load_ip_adapter(unet: Any, weight_file: Path, scale: float) -> None:
    """The adapter's image projection and attention layers loaded into the UNet as diffusers does, at `scale`."""
    from safetensors.torch import load_file

    tensors = load_file(str(weight_file))
    state = {
        part: {key.removeprefix(f"{part}."): value for key, value in tensors.items() if key.startswith(f"{part}.")}
        for part in ("image_proj", "ip_adapter")
    }
    unet._load_ip_adapter_weights([state])
    for processor in unet.attn_processors.values():
        if hasattr(processor, "scale") and isinstance(processor.scale, list):
            processor.scale = [scale] * len(processor.scale)


def _arguments(named: dict[str, Any]) -> dict[str, Any]:
    """The UNet's keyword arguments from the contract's named inputs."""
    added: dict[str, Any] = {key: named[key] for key in ("text_embeds", "time_ids") if key in named}
    if IMAGE_EMBEDS in named:
        added[IMAGE_EMBEDS] = [named[IMAGE_EMBEDS]]  # one tensor per IP-Adapter
    downs = [named[name] for name in named if name.startswith(DOWN_RESIDUAL)]
    return {
        "timestep_cond": named.get("timestep_cond"),
        "added_cond_kwargs": added or None,
        "down_block_additional_residuals": tuple(downs) if downs else None,
        "mid_block_additional_residual": named.get(MID_RESIDUAL),
    }


def _call(unet: Any, named: dict[str, Any]) -> Any:
    return unet(
        named["sample"], named["timestep"], named["encoder_hidden_states"], return_dict=False, **_arguments(named)
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
    out = model(
        sample=named["sample"],
        timestep=named["timestep"],
        encoder_hidden_states=named["encoder_hidden_states"],
        **_arguments(named),
    )
    return [out.sample]
