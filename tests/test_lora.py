"""LoRA fused before tracing and a replacement VAE: tiny random-weight adapters built locally, exported on the cpu
backend, compared with diffusers' own eager pipeline after it loads and fuses the same adapters."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from neuron_export.testing.lora import build_lora


@pytest.fixture(scope="module")
def loras(tiny_model, tmp_path_factory):
    """Two adapters for the tiny SD pipeline (one touching the UNet and text encoder, one the UNet only, with a
    Conv2d layer), and one for the tiny SDXL pipeline."""
    root = tmp_path_factory.mktemp("loras")
    build_lora(tiny_model("sd"), root / "both")
    build_lora(
        tiny_model("sd"),
        root / "unet-only",
        components=("unet",),
        seed=1,
        targets={"unet": ("to_k", "to_v", "ff.net.2", "proj_out")},
    )
    build_lora(tiny_model("sdxl"), root / "xl", components=("unet", "text_encoder", "text_encoder_2"))
    build_lora(tiny_model("sdxl"), root / "xl-unet", components=("unet",))
    return root


def lora_location(path: Path) -> dict[str, str]:
    """(folder, weight_name) for diffusers' load_lora_weights: offline, diffusers 0.35 guesses no file name."""
    from neuron_export.testing.lora import LORA_WEIGHT_NAME

    path = Path(path)
    folder, name = (path.parent, path.name) if path.is_file() else (path, LORA_WEIGHT_NAME)
    return {"pretrained_model_name_or_path_or_dict": str(folder), "weight_name": name}


def eager_fused(source: Path, adapters: list[tuple[Path, str, float]]):
    """diffusers' pipeline on the source after load_lora_weights per adapter, set_adapters and fuse_lora."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(source)
    for path, name, _ in adapters:
        pipe.load_lora_weights(**lora_location(path), adapter_name=name)
    pipe.set_adapters([name for _, name, _ in adapters], adapter_weights=[scale for _, _, scale in adapters])
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def unet_inputs(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 4, 8, 8, generator=generator),
        torch.tensor([421.0]),
        torch.randn(1, 77, 32, generator=generator),
    )


def test_two_loras_from_optimum_cli_spellings_equal_diffusers_fused(cli, tiny_model, loras, tmp_path):
    out = tmp_path / "export"
    weights = tiny_model("sd") / "unet" / "diffusion_pytorch_model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    result = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        out,
        "--json",
        "--components",
        "text_encoder,unet",
        "--lora_model_ids",
        loras / "both",
        loras / "unet-only",
        "--lora_adapter_names",
        "style",
        "detail",
        "--lora_scales",
        "0.7",
        "-0.5",
    )
    assert result.exit_code == 0, result
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before  # fused in memory, never into the mapped file
    pipe = eager_fused(tiny_model("sd"), [(loras / "both", "style", 0.7), (loras / "unet-only", "detail", -0.5)])
    plain = eager_fused(tiny_model("sd"), [(loras / "both", "style", 0.0)])

    with torch.no_grad():
        sample, timestep, text = unet_inputs(7)
        expected = pipe.unet(sample, timestep, text).sample
        got = torch.jit.load(out / "unet" / "model.neuron")(sample, timestep, text)[0]
        assert (got - expected).abs().max() < 1e-5
        assert (plain.unet(sample, timestep, text).sample - expected).abs().max() > 1e-2  # the LoRAs changed it
        ids = torch.randint(0, 100, (1, 77), generator=torch.Generator().manual_seed(8))
        expected = pipe.text_encoder(ids)[0]
        assert (torch.jit.load(out / "text_encoder" / "model.neuron")(ids)[0] - expected).abs().max() < 1e-5
        assert (plain.text_encoder(ids)[0] - expected).abs().max() > 1e-2

    manifest = json.loads((out / "manifest.json").read_text())
    recorded = [(r["adapter_name"], r["scale"], r["weight_name"], r["components"]) for r in manifest["source"]["loras"]]
    assert recorded == [
        ("style", 0.7, "pytorch_lora_weights.safetensors", ["text_encoder", "unet"]),
        ("detail", -0.5, "pytorch_lora_weights.safetensors", ["unet"]),
    ]
    assert all(len(r["sha256"]) == 64 for r in manifest["source"]["loras"])


def test_sdxl_lora_reaches_both_text_encoders(cli, tiny_model, loras, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "export"
    result = cli(
        "sd-xl",
        "-m",
        tiny_model("sdxl"),
        "--backend",
        "cpu",
        "-o",
        out,
        "--components",
        "text_encoder_2",
        "--lora",
        loras / "xl",
        "--lora-scale",
        "0.9",
    )
    assert result.exit_code == 0, result
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"))
    pipe.load_lora_weights(**lora_location(loras / "xl"))
    pipe.fuse_lora(lora_scale=0.9)  # optimum-neuron's single-adapter call
    ids = torch.randint(0, 100, (1, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = pipe.text_encoder_2(ids, output_hidden_states=True)
        got = torch.jit.load(out / "text_encoder_2" / "model.neuron")(ids)
    assert (got[0] - expected.text_embeds).abs().max() < 1e-5


def test_changing_only_a_lora_scale_rebuilds_only_what_it_touches(cli, tiny_model, loras, tmp_path):
    out = tmp_path / "export"

    def origins(*flags):
        result = cli(
            "sd",
            "-m",
            tiny_model("sd"),
            "--backend",
            "cpu",
            "-o",
            out,
            "--force",
            "--json",
            "--components",
            "text_encoder,unet,vae_decoder",
            *flags,
        )
        assert result.exit_code == 0, result
        return {name: c["origin"] for name, c in json.loads(result.stdout)["components"].items()}

    assert set(origins().values()) == {"built"}
    touched = {"text_encoder": "cached", "unet": "built", "vae_decoder": "cached"}
    assert origins("--lora", loras / "unet-only") == touched
    assert origins("--lora", loras / "unet-only", "--lora-scale", "0.5") == touched
    assert set(origins("--lora", loras / "unet-only", "--lora-scale", "0.5", "--lora-adapter-name", "x").values()) == {
        "cached"
    }


def test_replacement_vae_never_reads_the_source_vae(cli, tiny_model, tmp_path):
    from diffusers import AutoencoderKL

    source = tmp_path / "model"
    shutil.copytree(tiny_model("sd"), source)
    replacement = tmp_path / "other"
    from neuron_export.testing.examples import build_example

    build_example("sd", replacement, seed=1)
    first = cli("sd", "-m", source, "--backend", "cpu", "-o", tmp_path / "plain", "--components", "unet,vae_decoder")
    assert first.exit_code == 0, first
    (source / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")

    out = tmp_path / "export"
    result = cli(
        "sd",
        "-m",
        source,
        "--backend",
        "cpu",
        "-o",
        out,
        "--json",
        "--vae",
        replacement / "vae",
        "--components",
        "unet,vae_decoder",
    )
    assert result.exit_code == 0, result
    origins = {name: c["origin"] for name, c in json.loads(result.stdout)["components"].items()}
    assert origins == {"unet": "cached", "vae_decoder": "built"}  # the key follows the replacement's weights
    vae = AutoencoderKL.from_pretrained(replacement / "vae").eval()
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = torch.jit.load(out / "vae_decoder" / "model.neuron")(latents)["sample"]
        assert (got - vae.decode(latents).sample).abs().max() < 1e-5
    written = json.loads((out / "vae_decoder" / "config.json").read_text())
    assert (
        written["block_out_channels"]
        == json.loads((replacement / "vae" / "config.json").read_text())["block_out_channels"]
    )
    assert json.loads((out / "manifest.json").read_text())["source"]["vae_id"] == str(replacement / "vae")


def _two_files(root: Path, loras: Path) -> Path:
    folder = root / "two"
    folder.mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(loras / "both" / "pytorch_lora_weights.safetensors", folder / name)
    return folder


def _vae_config(root: Path, tiny_model, **changes) -> Path:
    folder = root / "vae"
    folder.mkdir()
    config = json.loads((tiny_model("sd") / "vae" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


BAD = {
    "another base model": (lambda root, loras, tiny: ["--lora", loras / "xl"], "made for another base model"),
    "a layer the model lacks": (
        lambda root, loras, tiny: ["--lora", loras / "xl-unet"],
        "its layer unet.down_blocks.1.attentions.0",
    ),
    "counts differ": (
        lambda root, loras, tiny: ["--lora-scale", "1", "--lora", loras / "both", "--lora", loras / "unet-only"],
        "--lora-scale is given 1 time(s) for 2 --lora",
    ),
    "scale out of range": (
        lambda root, loras, tiny: ["--lora", loras / "both", "--lora-scale", "12"],
        "from -10 to 10",
    ),
    "several files, no name": (
        lambda root, loras, tiny: ["--lora", _two_files(root, loras)],
        "pass --lora-weight-name",
    ),
    "no such weight name": (
        lambda root, loras, tiny: ["--lora", loras / "both", "--lora-weight-name", "x.safetensors"],
        "--lora-weight-name x.safetensors",
    ),
    "vae scaling": (lambda root, loras, tiny: ["--vae", tiny("sdxl") / "vae"], "scales latents by 0.13025"),
    "vae latent channels": (
        lambda root, loras, tiny: ["--vae", _vae_config(root, tiny, latent_channels=16)],
        "16-channel latents",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_lora_and_vae_input_is_one_sentence_and_no_output(cli, tiny_model, loras, tmp_path, case):
    flags, words = BAD[case]
    out = tmp_path / "export"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", out, *flags(tmp_path, loras, tiny_model))
    assert result.exit_code == 2, result
    assert words in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not out.exists()


def test_the_shipped_sdxl_lora_config_plans_with_local_stand_ins(cli, tiny_model, loras, tmp_path):
    """configs/sdxl-lora-1024.yaml with its hub ids swapped for tiny local ones: the LoRA lists go through YAML,
    the adapter is checked against the model and planned into the components it touches."""
    config = Path(__file__).parent.parent / "configs" / "sdxl-lora-1024.yaml"
    result = cli(
        "plan",
        "build",
        config,
        "--set",
        f"model={tiny_model('sdxl')}",
        "--set",
        f"lora=[{loras / 'xl'}]",
        "--set",
        "lora_weight_name=[pytorch_lora_weights.safetensors]",
        "--set",
        "height=64",
        "--set",
        "width=64",
        "--backend",
        "cpu",
        "--json",
    )
    assert result.exit_code == 0, result
    fused = {job["component"]: job["loras"] for job in json.loads(result.stdout)["components"]}
    assert fused == {
        "text_encoder": ["cereal"],
        "text_encoder_2": ["cereal"],
        "unet": ["cereal"],
        "vae_encoder": [],
        "vae_decoder": [],
    }


def _kohya_sgm(module: str) -> str:
    """diffusers' name of a tiny SDXL UNet attention layer (1 layer per block) -> kohya's sgm spelling."""
    parts = module.split(".")
    if parts[0] == "down_blocks":
        return "_".join(["input_blocks", str(1 + int(parts[1]) * 2 + int(parts[3])), "1", *parts[4:]])
    if parts[0] == "up_blocks":
        return "_".join(["output_blocks", str(int(parts[1]) * 2 + int(parts[3])), "1", *parts[4:]])
    return "_".join(["middle_block", "1", *parts[3:]])


def test_kohya_lora_with_sgm_block_names_equals_diffusers_fused(cli, tiny_model, loras, tmp_path):
    """kohya's SDXL LoRAs name layers after the original UNet (input_blocks_4_1_...): checked and fused as diffusers does."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    tensors = load_file(loras / "xl-unet" / "pytorch_lora_weights.safetensors")
    kohya = {}
    for key, value in tensors.items():
        module, part = key.removeprefix("unet.").rsplit(".lora_", 1)
        name = "lora_unet_" + _kohya_sgm(module).replace(".", "_")
        kohya[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(value.shape[0] if part.startswith("A") else value.shape[1]) / 2)
    save_file(kohya, tmp_path / "kohya.safetensors")

    out = tmp_path / "export"
    result = cli(
        "sd-xl",
        "-m",
        tiny_model("sdxl"),
        "--backend",
        "cpu",
        "-o",
        out,
        "--components",
        "unet",
        "--lora",
        tmp_path / "kohya.safetensors",
        "--lora-scale",
        "0.8",
    )
    assert result.exit_code == 0, result
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"))
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors", adapter_name="k")
    pipe.set_adapters(["k"], adapter_weights=[0.8])
    pipe.fuse_lora()
    generator = torch.Generator().manual_seed(2)
    inputs = [
        torch.randn(1, 4, 8, 8, generator=generator),
        torch.tensor([300.0]),
        torch.randn(1, 77, 64, generator=generator),
        torch.randn(1, 32, generator=generator),
        torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    ]
    with torch.no_grad():
        expected = pipe.unet(*inputs[:3], added_cond_kwargs={"text_embeds": inputs[3], "time_ids": inputs[4]}).sample
        got = torch.jit.load(out / "unet" / "model.neuron")(*inputs)[0]
        plain = (
            StableDiffusionXLPipeline.from_pretrained(tiny_model("sdxl"))
            .unet(*inputs[:3], added_cond_kwargs={"text_embeds": inputs[3], "time_ids": inputs[4]})
            .sample
        )
    assert (got - expected).abs().max() < 1e-5
    assert (plain - expected).abs().max() > 1e-3  # diffusers did map and apply the sgm-named layers

    first = next(key for key in kohya if key.endswith("lora_down.weight"))
    kohya[first] = torch.zeros(kohya[first].shape[0], kohya[first].shape[1] + 1)  # a layer one input too wide
    save_file(kohya, tmp_path / "kohya.safetensors")
    refused = cli(
        "sd-xl",
        "-m",
        tiny_model("sdxl"),
        "--backend",
        "cpu",
        "-o",
        tmp_path / "bad",
        "--components",
        "unet",
        "--lora",
        tmp_path / "kohya.safetensors",
    )
    assert refused.exit_code == 2 and "layer unet." in refused.stderr and "input width" in refused.stderr, refused
