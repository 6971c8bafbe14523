"""`generate` on an LCM-SDXL export (sd-xl with an LCM --unet): LCM's defaults and a clean LCMScheduler.

The manifest says is_lcm while the pipeline class is SDXL's, whose 50 steps and guidance 5.0 are not what an
LCM UNet runs with; diffusers' LCM-SDXL docs build the scheduler with LCMScheduler.from_config.
"""

from __future__ import annotations

import inspect
import json
import logging

import numpy as np
import pytest

PROMPT = "a photo of the dog"


@pytest.fixture(scope="module")
def lcm_sdxl(tiny_model, tmp_path_factory):
    from helpers import run_cli

    out = tmp_path_factory.mktemp("lcm-sdxl") / "export"
    result = run_cli(
        "sd-xl",
        "-m",
        tiny_model("sdxl"),
        "--unet",
        tiny_model("lcm-sdxl-unet"),
        "--backend",
        "cpu",
        "--disable-validation",
        "-o",
        out,
    )
    assert result.exit_code == 0, result
    return out


class Warnings(logging.Handler):
    """diffusers' own warnings (its library logger does not propagate to the root logger)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_scheduler_config_is_a_proper_lcm_scheduler(lcm_sdxl):
    from diffusers import LCMScheduler

    config = json.loads((lcm_sdxl / "scheduler" / "scheduler_config.json").read_text())
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters)
    assert config["_class_name"] == "LCMScheduler"
    assert {key for key in config if not key.startswith("_")} <= accepted  # no Euler-only keys left over

    from neuron_export.runtime.loading import load_pipeline

    caught = Warnings()
    logger = logging.getLogger("diffusers")
    logger.addHandler(caught)
    try:
        pipe = load_pipeline(lcm_sdxl)
    finally:
        logger.removeHandler(caught)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert [m for m in caught.messages if "scheduler" in m.lower() or "config" in m.lower()] == []


def test_generate_takes_lcm_defaults_and_matches_diffusers_lcm_sdxl_recipe(lcm_sdxl, tiny_model, tmp_path):
    import diffusers
    import torch
    from helpers import run_cli
    from PIL import Image

    out = tmp_path / "out.png"
    result = run_cli("generate", lcm_sdxl, "--prompt", PROMPT, "-o", out)
    assert result.exit_code == 0, result
    steps, guidance = (
        inspect.signature(diffusers.LatentConsistencyModelPipeline.__call__).parameters[name].default
        for name in ("num_inference_steps", "guidance_scale")
    )
    assert (steps, guidance) == (4, 8.5)
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith(f"generate: steps={steps} guidance={guidance} seed=0")
    assert "LatentConsistencyModelPipeline.__call__" in first_line

    # diffusers' LCM-SDXL recipe on the sources, with the same steps, guidance and seed
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny_model("lcm-sdxl-unet"))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"), unet=unet)
    pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        PROMPT, num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(0)
    ).images[0]
    with Image.open(out) as written:
        ours = np.asarray(written.convert("RGB")).astype(np.int16)
    assert np.abs(ours - np.asarray(reference).astype(np.int16)).max() <= 1
