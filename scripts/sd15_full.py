"""Build a full-size Stable Diffusion 1.5 pipeline with random weights (about 4 GiB; no network needed), the model
the memory and cache benchmarks export: `python scripts/sd15_full.py DIR [--seed N]`."""

from __future__ import annotations

import argparse
import gc
import pathlib
import sys

import torch

from neuron_export.testing import examples
from neuron_export.testing.tokenizer import make_tokenizer, write_tokenizer_files


def build_sd15_full(directory: pathlib.Path) -> None:
    """Stable Diffusion 1.5 shapes, written one component at a time so only one big model is live."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(
        examples.clip_text_config(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            vocab_size=49408,
            projection_dim=768,
        )
    )
    text_encoder.save_pretrained(directory / "text_encoder")
    del text_encoder
    gc.collect()

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    vae.save_pretrained(directory / "vae", safe_serialization=True)
    del vae
    gc.collect()

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=8,
        cross_attention_dim=768,
        norm_num_groups=32,
    )
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    del unet
    gc.collect()

    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(directory / "tokenizer")
    write_tokenizer_files(directory / "tokenizer")
    scheduler = examples.euler_scheduler()
    scheduler.save_pretrained(directory / "scheduler")

    # model_index.json only records component classes, so let diffusers write it from a tiny
    # stand-in pipeline with the same component classes (save_config writes nothing else).
    stand_in = examples.sd_like(StableDiffusionPipeline, examples.tiny_sd_unet(), scheduler)
    stand_in.save_config(directory)


def build(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]), examples.quiet_transformers_saving():
        torch.manual_seed(seed)
        build_sd15_full(directory)
    return directory


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("directory", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.directory, args.seed))
    sys.exit(0)
