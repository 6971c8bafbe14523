"""Random-weight LoRA adapters for any pipeline on disk, for tests and benchmarks (shaped from its headers)."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

LORA_TARGETS = {  # the layers each LoRA touches, by component: attention projections, as most LoRAs train
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "transformer": ("to_q", "to_k", "to_v", "to_out.0"),  # Flux's (its single blocks have no to_out)
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "text_encoder_2": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def build_lora(
    base: str | os.PathLike,
    directory: str | os.PathLike,
    components: Sequence[str] = ("unet", "text_encoder"),
    rank: int = 4,
    seed: int = 0,
    targets: dict[str, Sequence[str]] | None = None,
    weight_name: str = LORA_WEIGHT_NAME,
) -> pathlib.Path:
    """A random LoRA for the pipeline saved in `base`, in diffusers' PEFT format (`unet.<layer>.lora_A.weight`),
    written to `directory/weight_name`. Shapes come from the base's safetensors headers, so a full-size base costs
    no more than the LoRA; Linear and Conv2d layers both get a low-rank pair. Returns the file."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, directory = pathlib.Path(base), pathlib.Path(directory)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for component in components:
        suffixes = tuple(f".{name}.weight" for name in (targets or LORA_TARGETS)[component])
        folder = base / component
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{folder} has no safetensors weights to shape a LoRA after")
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys() if key.endswith(suffixes)}
            for key, shape in sorted(shapes.items()):
                if len(shape) not in (2, 4):
                    continue
                module = key[: -len(".weight")]
                out_features, in_features, kernel = shape[0], shape[1], list(shape[2:])
                down = torch.randn([rank, in_features, *kernel], generator=generator) / in_features**0.5
                up = torch.randn([out_features, rank, *([1] * len(kernel))], generator=generator) * 0.1
                tensors[f"{component}.{module}.lora_A.weight"] = down.contiguous()
                tensors[f"{component}.{module}.lora_B.weight"] = up.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / weight_name), metadata={"format": "pt"})
    return directory / weight_name
