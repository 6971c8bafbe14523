"""`generate BASE --refiner REFINER [--high-noise-frac F]`: SDXL's base + refiner flows on the command line.

Equal to diffusers' own code on the source pipelines: the optimum-neuron SDXL tutorial's split schedule
(base with denoising_end and latent output, refiner with denoising_start) and diffusers' "base to refiner"
(base fully, refiner as image-to-image on its latents). The image records what made it in PNG text chunks.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

PROMPT = "a photo of the dog"
STEPS = 4
ATOL = 1e-4


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory):
    from helpers import run_cli

    root = tmp_path_factory.mktemp("refiner")
    base, refiner = root / "base", root / "refiner"
    for model, task, out in (("sdxl", "text-to-image", base), ("sdxl-refiner", "image-to-image", refiner)):
        result = run_cli(
            "sd-xl", "-m", tiny_model(model), "--task", task, "--backend", "cpu", "--disable-validation", "-o", out
        )
        assert result.exit_code == 0, result
    return base, refiner


def diffusers_base_and_refiner(tiny_model, high_noise_frac):
    """The same flow in diffusers on the original tiny pipelines."""
    import diffusers
    import torch

    base = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"))
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_model("sdxl-refiner"))
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    if high_noise_frac is None:
        latents = base(prompt=PROMPT, num_inference_steps=STEPS, output_type="latent", generator=generator).images
        return refiner(
            prompt=PROMPT, num_inference_steps=STEPS, image=latents, generator=generator, output_type="np"
        ).images
    latents = base(
        prompt=PROMPT,
        num_inference_steps=STEPS,
        denoising_end=high_noise_frac,
        output_type="latent",
        generator=generator,
    ).images
    return refiner(
        prompt=PROMPT,
        num_inference_steps=STEPS,
        denoising_start=high_noise_frac,
        image=latents,
        generator=generator,
        output_type="np",
    ).images


@pytest.mark.parametrize("high_noise_frac", [0.5, None])
def test_base_and_refiner_equal_diffusers_on_the_sources(exports, tiny_model, high_noise_frac):
    from neuron_export.runtime.generation import generate_images

    base, refiner = exports
    ours = generate_images(
        base, PROMPT, steps=STEPS, refiner=refiner, high_noise_frac=high_noise_frac, output_type="np"
    )
    theirs = diffusers_base_and_refiner(tiny_model, high_noise_frac)
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= ATOL
    # the refiner changed the base's image: the second stage really ran
    alone = generate_images(base, PROMPT, steps=STEPS, output_type="np")
    assert np.abs(ours - alone).max() > 1e-3


def test_the_png_records_prompt_seed_steps_guidance_and_exports(exports, tmp_path):
    from helpers import run_cli
    from PIL import Image

    from neuron_export.manifest import sha256_file

    base, refiner = exports
    out = tmp_path / "refined.png"
    result = run_cli(
        "generate",
        base,
        "--refiner",
        refiner,
        "--high-noise-frac",
        "0.5",
        "--prompt",
        PROMPT,
        "--steps",
        STEPS,
        "--seed",
        7,
        "--guidance-scale",
        6.5,
        "-o",
        out,
    )
    assert result.exit_code == 0, result
    assert f"refiner: {refiner} (base to 0.5 of the schedule, then the refiner)" in result.stdout
    with Image.open(out) as written:
        text = dict(written.text)
    assert text["prompt"] == PROMPT
    assert (text["seed"], text["steps"], text["guidance_scale"]) == ("7", str(STEPS), "6.5")
    assert text["export"] == str(base.resolve()) and text["refiner"] == str(refiner.resolve())
    assert text["export_manifest_sha256"] == sha256_file(base / "manifest.json")
    assert text["refiner_manifest_sha256"] == sha256_file(refiner / "manifest.json")
    assert text["high_noise_frac"] == "0.5"
    assert "negative_prompt" not in text  # only the values given or used


def test_a_plain_generate_records_its_request_too(exports, tmp_path):
    from helpers import run_cli
    from PIL import Image

    base, _ = exports
    out = tmp_path / "plain.png"
    result = run_cli("generate", base, "-p", PROMPT, "--negative-prompt", "blurry", "--steps", 2, "-o", out)
    assert result.exit_code == 0, result
    with Image.open(out) as written:
        text = dict(written.text)
    assert (text["prompt"], text["negative_prompt"], text["seed"], text["steps"]) == (PROMPT, "blurry", "0", "2")
    assert text["guidance_scale"] == "5.0" and "refiner" not in text


def _with_manifest(export, tmp_path, change):
    copy = tmp_path / export.name
    shutil.copytree(export, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_refiners_that_do_not_fit_are_refused_in_one_sentence(exports, tmp_path):
    from helpers import run_cli

    base, refiner = exports
    taller = _with_manifest(refiner, tmp_path, lambda m: m["pipeline"].update(height=128))
    cases = [
        (["--refiner", taller], "--refiner", "--height 64 --width 64"),
        (["--refiner", base], "is not an SDXL refiner export", "--task image-to-image"),
        (["--high-noise-frac", "0.8"], "--high-noise-frac 0.8 applies only with --refiner", "add --refiner"),
        (["--refiner", refiner, "--high-noise-frac", "1.5"], "--high-noise-frac 1.5 is out of range", "0 and 1"),
        (["--refiner", refiner, "--high-noise-frac", "0.8", "--steps", "2"], "--steps 2 leaves", "--steps 3 or more"),
        (["--refiner", refiner, "--steps", "2"], "--steps 2 leaves the refiner", "--steps 4 or more"),
    ]
    for flags, *expected in cases:
        out = tmp_path / "never.png"
        result = run_cli("generate", base, "-p", PROMPT, "-o", out, *flags)
        assert result.exit_code == 2, (flags, result)
        message = result.stderr.strip()
        assert len(message.splitlines()) == 1 and "Traceback" not in message, message
        for part in expected:
            assert part in message, (part, message)
        assert not out.exists()
    # the refiner export as the base: a refiner follows a text-to-image SDXL export
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    result = run_cli(
        "generate", refiner, "-p", PROMPT, "--image", tmp_path / "x.png", "-o", tmp_path / "n.png", "--refiner", refiner
    )
    assert result.exit_code == 2 and "--refiner follows an SDXL text-to-image export" in result.stderr, result
