"""Tiny random-weight diffusion-transformer pipelines (PixArt-Σ, PixArt-α, Flux) for the conformance suite.

Built INSIDE the conformance virtualenv (diffusers 0.35, transformers 4.57), so optimum-neuron reads files its own
stack wrote; nothing is downloaded (tokenizers are made here). The transformers follow diffusers' own test
configurations; the T5 encoders are random and tiny, with d_model equal to the transformer's caption_channels /
joint_attention_dim and head and feed-forward counts divisible by 2 (tensor parallelism 2).

    .venv-conformance/bin/python tests/conformance/tiny_dit.py pixart-sigma DIR [flux DIR2 ...]   # or pixart-alpha

Once neuron_export/testing/examples.py has pixart-alpha / pixart-sigma / flux, the suite should use those.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NAMES = ("pixart-sigma", "pixart-alpha", "flux")

T5_D_MODEL = 32  # = PixArt caption_channels = Flux joint_attention_dim
T5_MAX_LENGTH = 16  # the T5 tokenizer's model_max_length: the traced sequence length when none is given
T5_WORDS = ("a", "photo", "of", "cat", "dog", "the", "on", "mat", "red", "blue")


def t5_tokenizer(max_length: int = T5_MAX_LENGTH):
    """A T5TokenizerFast over a tiny unigram vocabulary: pad 0, eos 1, unk 2 as T5's, then words and letters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [f"\u2581{word}" for word in T5_WORDS] + ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (piece, -1.0 - i / 100) for i, piece in enumerate(pieces)
    ]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        additional_special_tokens=[],
        model_max_length=max_length,
    )


def t5_encoder(seed: int):
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(t5_tokenizer()),
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",  # as the T5 v1.1 encoders PixArt and Flux ship
        dense_act_fn="gelu_new",
        is_gated_act=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config).eval()


def clip_text_encoder(seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(REPO))
    from neuron_export.testing.tokenizer import BOS, EOS, TOKENIZER_MAX_LENGTH, tokenizer_vocab

    vocab = tokenizer_vocab()
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(config).eval()


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(REPO))
    from neuron_export.testing.tokenizer import write_tokenizer_files

    write_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(folder)


def vae(seed: int, latent_channels: int, **extra):
    """Two blocks: vae scale factor 2."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=32,
        **extra,
    ).eval()


def build_pixart(directory: Path, sigma: bool, seed: int = 0) -> Path:
    import torch
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(  # diffusers' PixArt pipeline tests, caption_channels = the T5's d_model
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=T5_D_MODEL,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    ).eval()
    pipeline_cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipeline = pipeline_cls(
        tokenizer=t5_tokenizer(),
        text_encoder=t5_encoder(seed + 1),
        vae=vae(seed + 2, latent_channels=4),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipeline.save_pretrained(directory)
    return directory


def build_flux(directory: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(  # diffusers' Flux pipeline tests, with guidance embeds as FLUX.1-dev
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()
    tokenizer_folder = directory / "_clip_tokenizer"
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae(
            seed + 2,
            latent_channels=1,
            shift_factor=0.0609,
            scaling_factor=1.5035,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=clip_text_encoder(seed + 3),
        tokenizer=clip_tokenizer(tokenizer_folder),
        text_encoder_2=t5_encoder(seed + 1),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
    pipeline.save_pretrained(directory)
    import shutil

    shutil.rmtree(tokenizer_folder)
    return directory


def build(name: str, directory: str | Path, seed: int = 0) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if name == "flux":
        return build_flux(directory, seed)
    if name in ("pixart-sigma", "pixart-alpha"):
        return build_pixart(directory, sigma=name == "pixart-sigma", seed=seed)
    raise SystemExit(f"unknown tiny pipeline {name!r}: one of {', '.join(NAMES)}")


if __name__ == "__main__":  # NAME DIR pairs, built in one process (importing diffusers costs seconds)
    pairs = sys.argv[1:]
    if not pairs or len(pairs) % 2:
        raise SystemExit("usage: tiny_dit.py NAME DIR [NAME DIR ...]")
    for index in range(0, len(pairs), 2):
        print(build(pairs[index], pairs[index + 1]))
