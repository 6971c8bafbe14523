"""Tiny random-weight add-ons for the example pipelines: ControlNets and an IP-Adapter (image encoder + weights).

The pipelines' UNets are built in testing/examples.py and handed in, so this module imports nothing of ours.
"""

from __future__ import annotations

import pathlib

# Four stages like real ControlNets: the control image is downsampled 8x, to the latent size.
TINY_CONDITIONING_CHANNELS = (8, 8, 16, 16)
TINY_IMAGE_SIZE = 32  # CLIP vision input side; patches of 8 give 16 tokens + the class token
TINY_VISION_HIDDEN = 32
IP_ADAPTER_SUBFOLDER = "models"
IP_ADAPTER_WEIGHT_NAME = "ip-adapter-full-face_tiny.safetensors"


def _randomize_zeros(module) -> None:
    """ControlNets start with zero output convolutions (no effect until trained); random values instead make every
    residual and its wiring visible in a comparison."""
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.abs().sum():
                parameter.normal_(0.0, 0.2)


def save_controlnet(unet, directory: pathlib.Path) -> None:
    """A ControlNet shaped after `unet` (its own random weights), saved as a bare model directory."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=TINY_CONDITIONING_CHANNELS, load_weights_from_unet=False
    )
    _randomize_zeros(controlnet)
    controlnet.save_pretrained(directory, safe_serialization=True)


def _ip_adapter_layers(unet, image_embed_dim: int) -> dict:
    """diffusers' IP-Adapter state dict: "image_proj" (the full-face projection of the image encoder's hidden
    states) and "ip_adapter" (key and value projections per cross-attention layer, numbered 1, 3, 5, ...
    in the UNet's attention-processor order, as diffusers' loader reads them)."""
    import torch

    cross = int(unet.config.cross_attention_dim)
    channels = list(unet.config.block_out_channels)
    image_proj = {
        "proj.0.weight": torch.randn(image_embed_dim, image_embed_dim) * 0.2,
        "proj.0.bias": torch.randn(image_embed_dim) * 0.1,
        "proj.2.weight": torch.randn(cross, image_embed_dim) * 0.2,
        "proj.2.bias": torch.randn(cross) * 0.1,
        "proj.3.weight": 1.0 + torch.randn(cross) * 0.1,
        "proj.3.bias": torch.randn(cross) * 0.1,
    }
    ip_adapter, key_id = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        ip_adapter[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.2
        ip_adapter[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.2
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def save_ip_adapter(unet, directory: pathlib.Path) -> None:
    """Laid out like the hub repo h94/IP-Adapter: models/image_encoder/ and models/<weights>.safetensors."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = directory / IP_ADAPTER_SUBFOLDER
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=TINY_VISION_HIDDEN,
            intermediate_size=37,
            projection_dim=TINY_VISION_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=TINY_IMAGE_SIZE,
            patch_size=8,
            hidden_act="quick_gelu",
        )
    )
    encoder.save_pretrained(folder / "image_encoder")
    layers = _ip_adapter_layers(unet, TINY_VISION_HIDDEN)
    flat = {f"{part}.{key}": value.contiguous() for part, tensors in layers.items() for key, value in tensors.items()}
    save_file(flat, str(folder / IP_ADAPTER_WEIGHT_NAME), metadata={"format": "pt"})
