"""PixArt-α and PixArt-Σ on the CPU backend: the layout optimum-neuron's loader reads (T5 encoder with its weight
shard, transformer, both VAE halves), each config.json's neuron block, the manifest, and the cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuron_export.roles.registry import T5_FLAGS, role_of

T5_SHARD = "text_encoder/weights/tp0_sharded_checkpoint.safetensors"
COMPONENTS = ("text_encoder", "transformer", "vae_encoder", "vae_decoder")


def export_json(cli, model, out, *extra):
    result = cli("pixart", "-m", model, "--backend", "cpu", "-o", out, "--json", *extra)
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def origins(result: dict) -> dict[str, str]:
    return {name: component["origin"] for name, component in result["components"].items()}


@pytest.fixture(scope="module")
def sigma_export(tiny_model, tmp_path_factory):
    from helpers import run_cli

    out = tmp_path_factory.mktemp("pixart") / "sigma"
    result = run_cli("pixart", "-m", tiny_model("pixart-sigma"), "--backend", "cpu", "-o", out, "--json")
    assert result.exit_code == 0, result
    return out


def test_the_sigma_export_has_optimums_folders_and_the_t5_shard(sigma_export, tiny_model):
    files = {p.relative_to(sigma_export).as_posix() for p in sigma_export.rglob("*") if p.is_file()}
    for component in COMPONENTS:
        assert {f"{component}/model.neuron", f"{component}/config.json"} <= files
    assert T5_SHARD in files
    assert {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"} <= files
    assert not any(name.startswith(("unet/", "vae/")) for name in files)
    # the shard holds the T5's weights, as the source has them, under the traced wrapper's names (`model.` + the
    # source's), as the Neuron backend's ModelBuilder shard does; the module holds none of them
    source = load_file(str(tiny_model("pixart-sigma") / "text_encoder" / "model.safetensors"))
    shard = load_file(str(sigma_export / T5_SHARD))
    for key, tensor in source.items():
        assert f"model.{key}" in shard and bool((shard[f"model.{key}"] == tensor).all()), key
    module = torch.jit.load(str(sigma_export / "text_encoder" / "model.neuron"))
    assert hasattr(module, "nxd_model") and sum(t.numel() for t in module.state_dict().values()) == 0


def test_each_config_has_the_neuron_block_optimum_writes(sigma_export):
    t5 = json.loads((sigma_export / "text_encoder" / "config.json").read_text())
    assert t5["model_type"] == "t5"  # transformers' own; the neuron block names the exported type
    assert t5["neuron"]["model_type"] == "t5-encoder" and t5["neuron"]["task"] == "feature-extraction"
    assert (t5["neuron"]["static_batch_size"], t5["neuron"]["static_sequence_length"]) == (1, 16)  # model_max_length
    transformer = json.loads((sigma_export / "transformer" / "config.json").read_text())
    assert transformer["model_type"] == "pixart-transformer-2d"
    neuron = transformer["neuron"]
    assert (neuron["model_type"], neuron["task"]) == ("pixart-transformer-2d", "semantic-segmentation")
    statics = {key: value for key, value in neuron.items() if key.startswith("static_")}
    assert statics == {
        "static_batch_size": 1,
        "static_sequence_length": 16,
        "static_num_channels": 4,
        "static_height": 8,
        "static_width": 8,
        "static_vae_scale_factor": 8,
        "static_encoder_hidden_size": 32,
    }
    assert neuron["tensor_parallel_size"] == 1


def test_the_manifest_records_pixart_sigma_its_inputs_and_the_shard(sigma_export):
    manifest = json.loads((sigma_export / "manifest.json").read_text())
    assert manifest["pipeline"]["diffusers_pipeline"] == "PixArtSigmaPipeline"
    assert manifest["pipeline"]["optimum_pipeline"] == "NeuronPixArtSigmaPipeline"
    assert manifest["pipeline"]["architecture"] == "pixart-sigma"
    transformer = manifest["components"]["transformer"]
    assert [(t["name"], t["dtype"]) for t in transformer["inputs"]] == [
        ("sample", "float32"),
        ("encoder_hidden_states", "float32"),
        ("timestep", "float32"),
        ("encoder_attention_mask", "int64"),
    ]
    assert transformer["outputs"] == ["out_hidden_states"]
    t5 = manifest["components"]["text_encoder"]
    assert [t["name"] for t in t5["inputs"]] == ["input_ids"] and t5["outputs"] == ["last_hidden_state"]
    assert T5_SHARD in [f["path"] for f in t5["files"]]
    assert t5["neuron_compiler_args"] == list(T5_FLAGS)  # the fixed string, whatever --auto-cast says
    assert transformer["neuron_compiler_args"][-2:] == [
        "--model-type=transformer",
        "--enable-fast-loading-neuron-binaries",
    ]
    assert transformer["neuron_compiler_args"][:2] == ["--auto-cast", "matmult"]
    for component in COMPONENTS:
        assert all(component["validation"]["status"] == "passed" for component in manifest["components"].values())


def test_alpha_is_recognised_and_takes_sequence_length(cli, tiny_model, tmp_path):
    result = export_json(cli, tiny_model("pixart-alpha"), tmp_path / "alpha", "--sequence-length", "12")
    manifest = json.loads((tmp_path / "alpha" / "manifest.json").read_text())
    assert manifest["pipeline"]["optimum_pipeline"] == "NeuronPixArtAlphaPipeline"
    assert set(result["components"]) == set(COMPONENTS)
    for component in ("text_encoder", "transformer"):
        config = json.loads((tmp_path / "alpha" / component / "config.json").read_text())
        assert config["neuron"]["static_sequence_length"] == 12


def test_a_rerun_builds_nothing_and_a_changed_transformer_rebuilds_only_it(cli, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("pixart-sigma"), model)
    first = export_json(cli, model, tmp_path / "a")
    assert origins(first) == dict.fromkeys(COMPONENTS, "built")
    again = export_json(cli, model, tmp_path / "b")
    assert origins(again) == dict.fromkeys(COMPONENTS, "cached")
    assert (tmp_path / "b" / T5_SHARD).read_bytes() == (tmp_path / "a" / T5_SHARD).read_bytes()
    from neuron_export.testing.examples import build_example

    other = build_example("pixart-sigma", tmp_path / "other", seed=1)
    shutil.copy(other / "transformer" / "diffusion_pytorch_model.safetensors", model / "transformer")
    changed = export_json(cli, model, tmp_path / "c")
    assert origins(changed) == {**dict.fromkeys(COMPONENTS, "cached"), "transformer": "built"}


def test_pixart_roles_are_registered_beside_clip(tiny_model):
    assert role_of("text_encoder", "pixart-sigma").module_path == "neuron_export.roles.t5"
    assert role_of("text_encoder", "sd").module_path == "neuron_export.roles.text_encoder"
    assert role_of("transformer", "pixart-alpha").sharded is False and role_of("text_encoder", "pixart-alpha").sharded


@pytest.mark.parametrize(
    ("family", "example", "message"),
    [
        ("sd", "pixart-sigma", "export it with `neuron-export pixart`"),
        ("pixart", "sd", "is not a PixArt pipeline"),
    ],
)
def test_the_wrong_command_names_the_right_one(cli, tiny_model, tmp_path, family, example, message):
    result = cli(family, "-m", tiny_model(example), "--backend", "cpu", "-o", tmp_path / "x")
    assert result.exit_code != 0 and message in result.stderr, result
    assert "Traceback" not in result.stderr


def test_sequence_length_is_refused_by_clip_families(cli, tiny_model, tmp_path):
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "--sequence-length", "12", "-o", tmp_path / "x")
    assert result.exit_code != 0 and "--sequence-length" in result.stderr + result.stdout, result


# --- runtime: the export equals diffusers' eager pipeline ------------------------------------------------

PROMPTS = ["a photo of an astronaut riding a horse on mars", "a cat"]
STEPS = 3
ATOL = 1e-4  # as the SD runtime tests (tests/test_generate.py)


def eager_images(model, **extra):
    import diffusers
    import torch

    pipe = diffusers.DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPTS,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        max_sequence_length=16,
        use_resolution_binning=False,
        height=64,
        width=64,
        **extra,
    ).images


@pytest.fixture(scope="module")
def alpha_export(tiny_model, tmp_path_factory):
    from helpers import run_cli

    out = tmp_path_factory.mktemp("pixart") / "alpha"
    result = run_cli("pixart", "-m", tiny_model("pixart-alpha"), "--backend", "cpu", "-o", out, "--batch-size", "2")
    assert result.exit_code == 0, result
    return out


@pytest.mark.parametrize("variant", ["sigma", "alpha"])
def test_load_runs_the_export_equal_to_the_eager_pipeline(variant, sigma_export, alpha_export, tiny_model):
    import diffusers
    import numpy as np
    import torch

    import neuron_export

    export_dir = sigma_export if variant == "sigma" else alpha_export
    pipe = neuron_export.load(export_dir)
    assert isinstance(pipe, getattr(diffusers, f"PixArt{variant.capitalize()}Pipeline"))
    # one prompt at a time on Σ (compiled at batch 1: the adapters run it per chunk), both at once on α (batch 2)
    ours = pipe(PROMPTS, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    reference = eager_images(tiny_model(f"pixart-{variant}"))
    assert ours.images.shape == reference.shape == (2, 64, 64, 3)
    difference = float(np.abs(ours.images - reference).max())
    assert difference < ATOL, difference
    compiled = read_shapes(export_dir)
    assert set(pipe.text_encoder.runner.calls) == {compiled["text_encoder"]}
    assert set(pipe.transformer.runner.calls) == {compiled["transformer"]}


def read_shapes(export_dir):
    from neuron_export.manifest import read_manifest

    manifest = read_manifest(export_dir)
    return {name: tuple(tuple(t.shape) for t in record.inputs) for name, record in manifest.components.items()}


def test_generate_writes_the_image_of_the_eager_pipeline(cli, sigma_export, tiny_model, tmp_path):
    import numpy as np
    from PIL import Image

    out = tmp_path / "out.png"
    done = cli("generate", sigma_export, "--prompt", PROMPTS[0], "--steps", STEPS, "--seed", 0, "-o", out)
    assert done.exit_code == 0, done
    import diffusers
    import torch

    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_model("pixart-sigma"))
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        PROMPTS[0],
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(0),
        max_sequence_length=16,
        use_resolution_binning=False,
    ).images[0]
    ours = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    assert np.abs(ours - np.asarray(reference.convert("RGB")).astype(np.int16)).max() <= 1


# --- --torch-dtype bfloat16, and whether PixArt-Σ 512 fits inf2.xlarge ------------------------------------

BF16_ATOL = 5e-2  # a bf16 export against diffusers' bf16 pipeline: the same casts, applied in another order


def test_a_bfloat16_export_is_traced_held_and_run_in_bfloat16(cli, tiny_model, tmp_path):
    import diffusers
    import numpy as np
    import torch
    from safetensors import safe_open

    import neuron_export

    out = tmp_path / "bf16"
    export_json(cli, tiny_model("pixart-sigma"), out, "--torch-dtype", "bfloat16")
    for component in COMPONENTS:
        assert json.loads((out / component / "config.json").read_text())["neuron"]["float_dtype"] == "bf16"
    with safe_open(str(out / T5_SHARD), framework="pt") as shard:
        assert {shard.get_slice(key).get_dtype() for key in shard.keys()} == {"BF16"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["torch_dtype"] == "bfloat16"
    assert [t["dtype"] for t in manifest["components"]["transformer"]["inputs"]] == ["bfloat16"] * 3 + ["int64"]
    pipe = neuron_export.load(out)
    ours = pipe(PROMPTS, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    reference = diffusers.DiffusionPipeline.from_pretrained(tiny_model("pixart-sigma"), dtype=torch.bfloat16)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(
        PROMPTS,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        max_sequence_length=16,
        use_resolution_binning=False,
    ).images
    assert float(np.abs(ours.images - theirs).max()) < BF16_ATOL


def test_torch_dtype_is_refused_by_the_unet_families(cli, tiny_model, tmp_path):
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "--torch-dtype", "bfloat16", "-o", tmp_path / "x")
    assert result.exit_code != 0 and "--torch-dtype" in result.stderr + result.stdout, result


# Parameter counts of PixArt-Σ XL-2 512 (its transformer config instantiated on the meta device: 0.61B, as published)
# and of its T5 v1.1 XXL encoder (4.76B, as published); the VAE is SD's.
PIXART_SIGMA_512 = {
    "text_encoder": 4_762_310_656,
    "transformer": 610_856_096,
    "vae_encoder": 34_163_664,
    "vae_decoder": 49_490_199,
}
AWS_PIXART = "AWS Neuron documentation, Inf2 inference performance: PixArt-α 512 on inf2.xlarge, 1.77 s per image"


@pytest.mark.parametrize(("torch_dtype", "smallest"), [("bfloat16", "inf2.xlarge"), ("float32", None)])
def test_verify_fits_pixart_sigma_512_on_inf2_xlarge_in_bfloat16(cli, sigma_export, tmp_path, torch_dtype, smallest):
    """AWS_PIXART runs PixArt 512 on inf2.xlarge; in float32 the T5-XXL alone (19 GB) exceeds its 16 GiB host RAM
    and a NeuronCore's 16 GiB (the T5 compiles without auto-cast), so only a bfloat16 export fits."""
    directory = Path(shutil.copytree(sigma_export, tmp_path / "full"))
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["config"]["torch_dtype"] = torch_dtype
    data["pipeline"].update(height=512, width=512)
    for name, record in data["components"].items():
        record.update(backend="neuron", compiler_type="neuronx-cc", compiler_version="2.21.18209.0")
        record["compiler_args"] = record["neuron_compiler_args"]
        record["parameter_count"] = PIXART_SIGMA_512[name]
        for tensor in record["inputs"]:
            if tensor["name"] in ("sample", "latent_sample"):
                scale = 1 if name == "vae_encoder" else 8
                tensor["shape"][2:] = [512 // scale, 512 // scale]
            elif tensor["name"] in ("input_ids", "encoder_attention_mask"):
                tensor["shape"][1] = 120
            elif tensor["name"] == "encoder_hidden_states":
                tensor["shape"][1:] = [120, 4096]
    data["environment"].update(torch="2.8.0", torch_neuronx="2.8.0.2.10.0", neuronx_cc="2.21.18209.0")
    path.write_text(json.dumps(data, indent=2))
    code, out, _ = cli("verify", directory, "--instance", "inf2.xlarge", "--json")
    fit = json.loads(out)["checks"]["fit"]
    assert json.loads(out)["checks"]["integrity"]["verdict"] == "ok", out
    assert fit["details"]["smallest_fit"] == smallest, fit
    if smallest:
        assert code == 0 and fit["verdict"] == "ok" and not fit["summary"].startswith("fits, tight"), fit
    else:
        assert code != 0 and "host RAM" in fit["summary"], fit


def test_a_remote_cache_carries_the_t5_shard_to_another_host(cli, tiny_model, tmp_path):
    """Built once with a file:// remote cache (signed), then assembled on a host with an empty cache: every
    component is downloaded, the T5's weights/ shard included, and the export is the same file for file."""
    from helpers import run_cli

    key = tmp_path / "key"
    made = run_cli("cache", "keygen", key)
    assert made.exit_code == 0, made
    remote = ["--remote-cache", f"file://{tmp_path / 'shared'}"]
    first = export_json(cli, tiny_model("pixart-sigma"), tmp_path / "a", *remote, "--remote-cache-signing-key", key)
    assert origins(first) == dict.fromkeys(COMPONENTS, "built")
    trusted = ["--remote-cache-trusted-key", made.stdout.strip(), "--cache-dir", tmp_path / "empty-cache"]
    second = export_json(cli, tiny_model("pixart-sigma"), tmp_path / "b", *remote, *trusted)
    assert origins(second) == dict.fromkeys(COMPONENTS, "downloaded")
    assert (tmp_path / "b" / T5_SHARD).read_bytes() == (tmp_path / "a" / T5_SHARD).read_bytes()
