"""Deterministic random-weight Stable Diffusion pipelines built locally for tests, demos and benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

from neuron_export.testing.adapters import save_controlnet, save_ip_adapter
from neuron_export.testing.tokenizer import (
    BOS,
    EOS,
    TOKENIZER_MAX_LENGTH,
    make_t5_tokenizer,
    make_tokenizer,
    t5_vocab,
    tokenizer_vocab,
    write_t5_tokenizer_files,
    write_tokenizer_files,
)

EXAMPLE_NAMES = (
    "sd",
    "sd-inpaint",
    "sd-pix2pix",
    "sdxl",
    "sdxl-refiner",
    "lcm",
    "lcm-sdxl-unet",
    "sd-controlnet",
    "sdxl-controlnet",
    "sd-ip-adapter",
    "pixart-alpha",
    "pixart-sigma",
    "flux",
)

# --- shared dimensions of the tiny examples -------------------------------------------------------

TINY_TEXT_HIDDEN = 32  # hidden size of every tiny CLIP text encoder
TINY_TEXT_PROJECTION = 32  # projection_dim of the tiny SDXL text_encoder_2 (pooled embeds)
TINY_ADDITION_TIME_EMBED_DIM = 8  # SDXL "text_time" embedding width per time id
TINY_TIME_COND_PROJ_DIM = 32  # LCM guidance-embedding width (UNet time_cond_proj_dim)
TINY_UNET_SAMPLE_SIZE = 8  # latent side; with the vae scale factor of 8 the default image is 64x64

# --- model factories ------------------------------------------------------------------------------


def clip_text_config(
    *,
    hidden_size: int = TINY_TEXT_HIDDEN,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 37,
    vocab_size: int | None = None,
    projection_dim: int = TINY_TEXT_PROJECTION,
    hidden_act: str = "quick_gelu",
):
    from transformers import CLIPTextConfig

    vocab = tokenizer_vocab()
    return CLIPTextConfig(
        vocab_size=vocab_size if vocab_size is not None else len(vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        projection_dim=projection_dim,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        # Pooling takes the hidden state at the eos token, so the ids must match the tokenizer.
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )


def _tiny_text_encoder():
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_text_config())


def _tiny_text_encoder_2():
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(clip_text_config(hidden_act="gelu"))


def tiny_sd_unet(*, in_channels: int = 4, time_cond_proj_dim: int | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_UNET_SAMPLE_SIZE,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=TINY_TEXT_HIDDEN,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def _tiny_sdxl_unet(*, refiner: bool = False, time_cond_proj_dim: int | None = None):
    """SDXL-shaped UNet: linear-projection transformers and "text_time" additional embeddings.

    The base model conditions on both text encoders (hidden states concatenated) and 6 time ids
    (original size, crop offset, target size); the refiner only on text_encoder_2 and 5 time ids
    (original size, crop offset, aesthetic score).
    """
    from diffusers import UNet2DConditionModel

    num_time_ids = 5 if refiner else 6
    cross_attention_dim = TINY_TEXT_HIDDEN if refiner else 2 * TINY_TEXT_HIDDEN
    return UNet2DConditionModel(
        sample_size=TINY_UNET_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=num_time_ids * TINY_ADDITION_TIME_EMBED_DIM + TINY_TEXT_PROJECTION,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def _tiny_vae(
    *, scaling_factor: float = 0.18215, latent_channels: int = 4, shift_factor: float | None = None, quant_conv=True
):
    from diffusers import AutoencoderKL

    # Flux's VAE has no quant convolutions and a shift factor; the UNet pipelines' has quant convolutions
    flux_like = {} if quant_conv else {"use_quant_conv": False, "use_post_quant_conv": False}
    return AutoencoderKL(
        **flux_like,
        **({} if shift_factor is None else {"shift_factor": shift_factor}),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),  # four blocks -> vae scale factor 8, like real models
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def euler_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading", steps_offset=1)


def _lcm_scheduler():
    from diffusers import LCMScheduler

    return LCMScheduler(
        **_SD_BETAS,
        original_inference_steps=50,
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=True,
        clip_sample=False,
    )


# --- PixArt: a diffusion transformer conditioned on a T5 encoder ------------------------------------

TINY_T5_D_MODEL = 32  # the T5's hidden size, which is the transformer's caption_channels


def tiny_t5_encoder():
    """A tiny random T5EncoderModel (heads and feed-forward width divisible by 2, for tensor parallelism)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(t5_vocab()),
        d_model=TINY_T5_D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def tiny_pixart_transformer():
    """diffusers' own PixArt test transformer (tests/pipelines/pixart_*): 8x8 latents, 2 layers, patch 2."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=TINY_UNET_SAMPLE_SIZE,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=TINY_T5_D_MODEL,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def _build_pixart(sigma: bool):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline

    pipeline_cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    scheduler = DPMSolverMultistepScheduler() if sigma else DDIMScheduler()
    return pipeline_cls(
        tokenizer=make_t5_tokenizer(),
        text_encoder=tiny_t5_encoder(),
        vae=_tiny_vae(),
        transformer=tiny_pixart_transformer(),
        scheduler=scheduler,
    )


# --- Flux: a rectified-flow transformer conditioned on CLIP (pooled) and T5 (sequence) ------------------


def tiny_flux_transformer():
    """diffusers' own Flux test transformer (tests/pipelines/flux), with guidance embeds as FLUX.1-dev has."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # 1 latent channel, packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_T5_D_MODEL,
        pooled_projection_dim=TINY_TEXT_HIDDEN,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )


def _build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(latent_channels=1, scaling_factor=1.5035, shift_factor=0.0609, quant_conv=False),
        text_encoder=_tiny_text_encoder(),
        tokenizer=make_tokenizer(),
        text_encoder_2=tiny_t5_encoder(),
        tokenizer_2=make_t5_tokenizer(),
        transformer=tiny_flux_transformer(),
    )


# --- pipeline builders ----------------------------------------------------------------------------


def sd_like(pipeline_cls, unet, scheduler):
    return pipeline_cls(
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(),
        tokenizer=make_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sd():
    from diffusers import StableDiffusionPipeline

    return sd_like(StableDiffusionPipeline, tiny_sd_unet(), euler_scheduler())


def _build_sd_inpaint():
    from diffusers import StableDiffusionInpaintPipeline

    # 4 noisy latents + 1 mask channel + 4 masked-image latents
    return sd_like(StableDiffusionInpaintPipeline, tiny_sd_unet(in_channels=9), euler_scheduler())


def _build_sd_pix2pix():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    # 4 noisy latents + 4 latents of the image to edit
    return sd_like(StableDiffusionInstructPix2PixPipeline, tiny_sd_unet(in_channels=8), euler_scheduler())


def _build_lcm():
    from diffusers import LatentConsistencyModelPipeline

    unet = tiny_sd_unet(time_cond_proj_dim=TINY_TIME_COND_PROJ_DIM)
    return sd_like(LatentConsistencyModelPipeline, unet, _lcm_scheduler())


def _build_sdxl():
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=_tiny_vae(scaling_factor=0.13025),
        text_encoder=_tiny_text_encoder(),
        text_encoder_2=_tiny_text_encoder_2(),
        tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(),
        unet=_tiny_sdxl_unet(),
        scheduler=euler_scheduler(),
        add_watermarker=False,
    )


def _build_sdxl_refiner():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return StableDiffusionXLImg2ImgPipeline(
        vae=_tiny_vae(scaling_factor=0.13025),
        text_encoder=None,
        text_encoder_2=_tiny_text_encoder_2(),
        tokenizer=None,
        tokenizer_2=make_tokenizer(),
        unet=_tiny_sdxl_unet(refiner=True),
        scheduler=euler_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


_PIPELINE_BUILDERS = {
    "sd": _build_sd,
    "sd-inpaint": _build_sd_inpaint,
    "sd-pix2pix": _build_sd_pix2pix,
    "sdxl": _build_sdxl,
    "sdxl-refiner": _build_sdxl_refiner,
    "lcm": _build_lcm,
    "pixart-alpha": lambda: _build_pixart(sigma=False),
    "pixart-sigma": lambda: _build_pixart(sigma=True),
    "flux": _build_flux,
}

_ADD_ON_BUILDERS: dict[str, tuple[Callable[..., None], Callable[..., object]]] = {
    "sd-controlnet": (save_controlnet, tiny_sd_unet),
    "sdxl-controlnet": (save_controlnet, _tiny_sdxl_unet),
    "sd-ip-adapter": (save_ip_adapter, tiny_sd_unet),
}
_TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")


def _save_pipeline(pipeline, directory: pathlib.Path) -> None:
    pipeline.save_pretrained(directory, safe_serialization=True)
    if "PixArt" in type(pipeline).__name__:
        _save_t5_tokenizer(directory)
        return
    if "Flux" in type(pipeline).__name__:  # CLIP tokenizer and encoder first, the T5 ones second
        write_tokenizer_files(directory / "tokenizer")
        _prefix_text_model_keys(directory / "text_encoder" / "model.safetensors")
        _save_t5_tokenizer(directory, "tokenizer_2")
        return
    for name in _TOKENIZER_FOLDERS:
        if getattr(pipeline, name, None) is not None:
            write_tokenizer_files(directory / name)
    if (directory / "text_encoder" / "model.safetensors").is_file():
        _prefix_text_model_keys(directory / "text_encoder" / "model.safetensors")


def _save_t5_tokenizer(directory: pathlib.Path, folder: str = "tokenizer") -> None:
    """The T5 tokenizer as files both transformers lines load, named T5TokenizerFast in model_index.json
    (transformers 5 records T5Tokenizer, which transformers 4.x reads as the sentencepiece-file tokenizer)."""
    import json

    write_t5_tokenizer_files(directory / folder)
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index[folder] = ["transformers", "T5TokenizerFast"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _prefix_text_model_keys(weights: pathlib.Path) -> None:
    """Save CLIPTextModel weights as hub checkpoints have them ("text_model." keys).

    transformers 5 drops the prefix when saving, and transformers 4.x (optimum-neuron's stack) then loads
    the encoder with random weights, silently; both lines load the prefixed layout.
    """
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    prefixed = {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in tensors.items()}
    save_file(prefixed, str(weights), metadata={"format": "pt"})


def _build_lcm_sdxl_unet(directory: pathlib.Path) -> None:
    # Laid out like the hub repo latent-consistency/lcm-sdxl: a bare UNet at the repository root.
    unet = _tiny_sdxl_unet(time_cond_proj_dim=TINY_TIME_COND_PROJ_DIM)
    unet.save_pretrained(directory, safe_serialization=True)


@contextlib.contextmanager
def quiet_transformers_saving():
    """Hide the "Writing model shards" progress bar transformers 5 prints for every save."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


# --- public API -----------------------------------------------------------------------------------


def build_example(name: str, directory: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build the example pipeline `name` with random weights (seeded) and save it to `directory`.

    Weights are float32 safetensors; the same name and seed always give byte-identical files.
    Returns the directory as a `pathlib.Path`.
    """
    if name not in EXAMPLE_NAMES:
        raise ValueError(f"unknown example {name!r}; valid names: {', '.join(EXAMPLE_NAMES)}")

    import torch

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # fork_rng: seed our own draws without disturbing the caller's global RNG state.
    with torch.random.fork_rng(devices=[]), quiet_transformers_saving():
        torch.manual_seed(seed)
        if name == "lcm-sdxl-unet":
            _build_lcm_sdxl_unet(directory)
        elif name in _ADD_ON_BUILDERS:  # bare add-ons shaped after the tiny UNets; a seed gives another one
            save, make_unet = _ADD_ON_BUILDERS[name]
            save(make_unet(), directory)
        else:
            _save_pipeline(_PIPELINE_BUILDERS[name](), directory)
    return directory


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m neuron_export.testing.examples",
        description="Build a random-weight example Stable Diffusion pipeline (no network needed).",
    )
    parser.add_argument("name", choices=EXAMPLE_NAMES, help="which example to build")
    parser.add_argument("directory", help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed for the random weights (default 0)")
    args = parser.parse_args(argv)
    print(build_example(args.name, args.directory, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
