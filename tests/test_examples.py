"""The tiny example pipelines of `neuron_export.testing.examples`: their layout, their shapes, and that diffusers runs them."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from neuron_export.testing.examples import EXAMPLE_NAMES, build_example

TINY_NAMES = EXAMPLE_NAMES
PROMPT = "a photo of the dog"

SD_WEIGHTS = {
    "text_encoder/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
}
PIXART_WEIGHTS = {
    "text_encoder/model.safetensors",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
}
EXPECTED_WEIGHTS = {
    "sd": SD_WEIGHTS,
    "sd-inpaint": SD_WEIGHTS,
    "lcm": SD_WEIGHTS,
    "sdxl": SD_WEIGHTS | {"text_encoder_2/model.safetensors"},
    "sdxl-refiner": SD_WEIGHTS - {"text_encoder/model.safetensors"} | {"text_encoder_2/model.safetensors"},
    "lcm-sdxl-unet": {"diffusion_pytorch_model.safetensors"},
    "sd-pix2pix": SD_WEIGHTS,
    "sd-controlnet": {"diffusion_pytorch_model.safetensors"},
    "sdxl-controlnet": {"diffusion_pytorch_model.safetensors"},
    "sd-ip-adapter": {"models/image_encoder/model.safetensors", "models/ip-adapter-full-face_tiny.safetensors"},
    "pixart-alpha": PIXART_WEIGHTS,
    "pixart-sigma": PIXART_WEIGHTS,
    "flux": PIXART_WEIGHTS | {"text_encoder_2/model.safetensors"},
}
TOKENIZER_FOLDERS = {
    "sd": ("tokenizer",),
    "sd-inpaint": ("tokenizer",),
    "sd-pix2pix": ("tokenizer",),
    "lcm": ("tokenizer",),
    "sdxl": ("tokenizer", "tokenizer_2"),
    "sdxl-refiner": ("tokenizer_2",),
}


def weight_files(folder: pathlib.Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*.safetensors")}


def rgb_image(seed: int = 0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def assert_one_64x64_image(images) -> None:
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0


def generator():
    import torch

    return torch.Generator("cpu").manual_seed(0)


# --- what gets written -------------------------------------------------------------------------------


def test_all_names_are_listed():
    assert EXAMPLE_NAMES == (
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


def test_unknown_example_is_rejected_with_the_valid_names(tmp_path):
    with pytest.raises(ValueError, match="sdxl-refiner") as error:
        build_example("sd3", tmp_path / "out")
    assert "'sd3'" in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", TINY_NAMES)
def test_each_tiny_example_is_saved_as_float32_safetensors_only(tiny_model, name):
    from safetensors import safe_open

    folder = tiny_model(name)
    index = {
        "lcm-sdxl-unet": "config.json",
        "sd-controlnet": "config.json",
        "sdxl-controlnet": "config.json",
        "sd-ip-adapter": "models/image_encoder/config.json",
    }.get(name, "model_index.json")
    assert (folder / index).is_file()
    assert weight_files(folder) == EXPECTED_WEIGHTS[name]
    pickled = [p for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert pickled == []
    for file in EXPECTED_WEIGHTS[name]:
        with safe_open(folder / file, framework="pt") as weights:
            dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}
        assert dtypes == {"F32"}, file


def test_lcm_sdxl_unet_is_a_bare_unet_like_the_hub_repo(tiny_model):
    folder = tiny_model("lcm-sdxl-unet")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    assert config["time_cond_proj_dim"] == 32


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path):
    first = build_example("sdxl", tmp_path / "first", seed=0)
    second = build_example("sdxl", tmp_path / "second", seed=0)
    third = build_example("sdxl", tmp_path / "third", seed=1)

    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (first / unet).read_bytes() != (third / unet).read_bytes()


def test_building_leaves_the_callers_random_state_alone(tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_example("lcm-sdxl-unet", tmp_path, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_command_line_builds_one_example(tmp_path, capsys):
    from neuron_export.testing.examples import main

    assert main(["lcm-sdxl-unet", str(tmp_path / "unet")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


# --- tokenizers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOKENIZER_FOLDERS))
def test_tokenizer_folders_have_vocab_and_merges_for_older_transformers(tiny_model, name):
    folder = tiny_model(name)
    for subfolder in TOKENIZER_FOLDERS[name]:
        tokenizer_dir = folder / subfolder
        for file in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            assert (tokenizer_dir / file).is_file(), f"{subfolder}/{file}"
        # transformers 4.x's CLIPTokenizer skips the first line of merges.txt as a header.
        assert (tokenizer_dir / "merges.txt").read_text().startswith("#version")


def test_tokenizer_pads_to_77_and_every_id_fits_the_text_encoder(tiny_model):
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = tiny_model("sd")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder")

    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert max(tokenizer.get_vocab().values()) < config.vocab_size
    # CLIP pools the hidden state at the eos token, so the ids in the config must be the tokenizer's.
    assert config.eos_token_id == tokenizer.eos_token_id
    # merges are applied: "the" and "dog" are single tokens, "photo" too
    assert tokenizer.tokenize("the dog photo") == ["the</w>", "dog</w>", "photo</w>"]


def test_vocab_and_merges_alone_encode_like_tokenizer_json(tiny_model, tmp_path):
    from transformers import CLIPTokenizer

    source = tiny_model("sd") / "tokenizer"
    slow_only = tmp_path / "tokenizer"
    slow_only.mkdir()
    for file in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / file, slow_only / file)

    text = "A photo of the cat, 42 times!"
    from_slow_files = CLIPTokenizer.from_pretrained(slow_only)(text).input_ids
    assert from_slow_files == CLIPTokenizer.from_pretrained(source)(text).input_ids


# --- shapes ------------------------------------------------------------------------------------------


def test_sdxl_unet_conditions_on_both_text_encoders_and_six_time_ids(tiny_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = tiny_model("sdxl")
    unet = UNet2DConditionModel.load_config(folder / "unet")
    text_1 = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    text_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")

    assert unet["cross_attention_dim"] == text_1.hidden_size + text_2.hidden_size == 64
    assert unet["addition_embed_type"] == "text_time"
    time_ids_width = 6 * unet["addition_time_embed_dim"]
    assert unet["projection_class_embeddings_input_dim"] == time_ids_width + text_2.projection_dim == 80
    assert unet["sample_size"] == 8


def test_refiner_unet_conditions_on_text_encoder_2_and_five_time_ids(tiny_model):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    folder = tiny_model("sdxl-refiner")
    unet = UNet2DConditionModel.load_config(folder / "unet")
    text_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    index = json.loads((folder / "model_index.json").read_text())

    assert index["requires_aesthetics_score"] is True
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert unet["cross_attention_dim"] == text_2.hidden_size == 32
    time_ids_width = 5 * unet["addition_time_embed_dim"]  # no target size, one aesthetic score
    assert unet["projection_class_embeddings_input_dim"] == time_ids_width + text_2.projection_dim == 72


def test_inpaint_unet_takes_nine_channels_and_lcm_unet_a_guidance_embedding(tiny_model):
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.load_config(tiny_model("sd-inpaint") / "unet")["in_channels"] == 9
    assert UNet2DConditionModel.load_config(tiny_model("sd") / "unet")["in_channels"] == 4
    assert UNet2DConditionModel.load_config(tiny_model("sd") / "unet")["time_cond_proj_dim"] is None
    assert UNet2DConditionModel.load_config(tiny_model("lcm") / "unet")["time_cond_proj_dim"] == 32


# --- diffusers runs them -------------------------------------------------------------------------------


def test_sd_generates_a_64x64_image(tiny_model):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model("sd"))
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8

    result = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=generator())
    assert_one_64x64_image(result.images)


def test_sd_inpaint_fills_a_masked_64x64_image(tiny_model):
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_model("sd-inpaint"))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))

    result = pipe(
        PROMPT, image=rgb_image(), mask_image=mask, num_inference_steps=2, output_type="np", generator=generator()
    )
    assert_one_64x64_image(result.images)


def test_sdxl_generates_a_64x64_image(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"))
    result = pipe(PROMPT, num_inference_steps=2, output_type="np", generator=generator())
    assert_one_64x64_image(result.images)


def test_sdxl_refiner_runs_image_to_image_with_only_text_encoder_2(tiny_model):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_model("sdxl-refiner"))
    assert pipe.text_encoder is None and pipe.tokenizer is None

    result = pipe(
        PROMPT, image=rgb_image(), strength=1.0, num_inference_steps=2, output_type="np", generator=generator()
    )
    assert_one_64x64_image(result.images)


def test_lcm_generates_with_the_guidance_embedding(tiny_model):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    pipe = LatentConsistencyModelPipeline.from_pretrained(tiny_model("lcm"))
    assert isinstance(pipe.scheduler, LCMScheduler)

    # LCM has no negative branch: guidance_scale is fed to the UNet through time_cond_proj_dim.
    result = pipe(PROMPT, num_inference_steps=2, guidance_scale=8.0, output_type="np", generator=generator())
    assert_one_64x64_image(result.images)


def test_lcm_sdxl_unet_replaces_the_sdxl_unet(tiny_model):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    lcm_unet = UNet2DConditionModel.from_pretrained(tiny_model("lcm-sdxl-unet"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"), unet=lcm_unet)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    assert pipe.unet.config.time_cond_proj_dim == 32

    result = pipe(PROMPT, num_inference_steps=1, guidance_scale=8.0, output_type="np", generator=generator())
    assert_one_64x64_image(result.images)


def test_tiny_controlnets_have_no_zero_output_convolutions(tiny_model):
    """Trained ControlNets start from zero output convolutions; ours must not, or their residuals vanish and a
    comparison could not see them wired wrongly."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(tiny_model("sd-controlnet"))
    for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
        assert conv.weight.abs().sum() > 0


def test_the_tiny_flux_runs_in_diffusers_with_both_tokenizers(tiny_model):
    import torch
    from diffusers import FluxPipeline

    folder = tiny_model("flux")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]
    transformer = json.loads((folder / "transformer" / "config.json").read_text())
    assert transformer["guidance_embeds"] is True and transformer["axes_dims_rope"] == [4, 4, 8]
    pipe = FluxPipeline.from_pretrained(folder)
    assert pipe.vae_scale_factor == 8 and pipe.tokenizer_2.model_max_length == 16
    images = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    ).images
    assert_one_64x64_image(images)
