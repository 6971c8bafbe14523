"""End to end: build a tiny pipeline, run `neuron-export ... --backend cpu`, look at what came out.

Each artifact is reloaded with torch.jit.load and compared with the eager model loaded straight from the
source pipeline with diffusers / transformers (not through neuron_export's own wrappers).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

# (case id, example kind, command, extra flags, expected component folders)
CASES = {
    "sd-text-to-image": ("sd", "sd", [], {"text_encoder", "unet", "vae_encoder", "vae_decoder"}),
    "sd-image-to-image": (
        "sd",
        "sd",
        ["--task", "image-to-image"],
        {"text_encoder", "unet", "vae_encoder", "vae_decoder"},
    ),
    "sd-inpainting": (
        "sd-inpaint",
        "sd",
        ["--task", "inpainting"],
        {"text_encoder", "unet", "vae_encoder", "vae_decoder"},
    ),
    "sdxl-text-to-image": (
        "sdxl",
        "sd-xl",
        [],
        {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"},
    ),
    "sdxl-image-to-image": (
        "sdxl",
        "sd-xl",
        ["--task", "image-to-image", "--batch-size", "2"],
        {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"},
    ),
    "sdxl-turbo-shape": (
        "sdxl",
        "sd-xl",
        ["--height", "128", "--width", "96"],
        {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"},
    ),
    "sdxl-refiner": (
        "sdxl-refiner",
        "sd-xl",
        ["--task", "image-to-image"],
        {"text_encoder_2", "unet", "vae_encoder", "vae_decoder"},
    ),
    "lcm": ("lcm", "lcm", ["--num-images-per-prompt", "2"], {"text_encoder", "unet", "vae_encoder", "vae_decoder"}),
    "lcm-sdxl": (
        "sdxl",
        "sd-xl",
        ["--unet", "LCM_SDXL_UNET"],
        {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"},
    ),
}

NEURON_KEYS = {
    "compiler_type",
    "compiler_version",
    "inline_weights_to_neff",
    "dynamic_batch_size",
    "tensor_parallel_size",
    "optlevel",
    "auto_cast",
    "auto_cast_type",
    "int_dtype",
    "float_dtype",
    "model_type",
    "output_attentions",
    "output_hidden_states",
    "task",
}
STATIC_KEYS = {
    "text_encoder": {"static_batch_size", "static_sequence_length"},
    "text_encoder_2": {"static_batch_size", "static_sequence_length"},
    "unet": {
        "static_batch_size",
        "static_sequence_length",
        "static_num_channels",
        "static_height",
        "static_width",
        "static_vae_scale_factor",
    },
    "vae_encoder": {"static_batch_size", "static_num_channels", "static_height", "static_width"},
    "vae_decoder": {"static_batch_size", "static_num_channels", "static_height", "static_width"},
}
MODEL_TYPES = {
    "text_encoder": "clip-text-model",
    "text_encoder_2": "clip-text-with-projection",
    "unet": "unet",
    "vae_encoder": "vae-encoder",
    "vae_decoder": "vae-decoder",
}


@pytest.fixture(scope="module")
def exported(tiny_model, cli, tmp_path_factory):
    """Export each case once per module; returns case -> (source dir, export dir, CLI JSON result)."""
    results = {}

    def get(case: str):
        if case not in results:
            kind, command, flags, _ = CASES[case]
            flags = [str(tiny_model("lcm-sdxl-unet")) if f == "LCM_SDXL_UNET" else f for f in flags]
            output = tmp_path_factory.mktemp(case) / "export"
            result = cli(command, "-m", tiny_model(kind), "--backend", "cpu", "-o", output, "--json", *flags)
            assert result.exit_code == 0, result
            results[case] = (tiny_model(kind), output, json.loads(result.stdout))
        return results[case]

    return get


def eager_component(source: Path, name: str, unet_dir: Path | None = None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name == "text_encoder":
        return CLIPTextModel.from_pretrained(source / "text_encoder").eval()
    if name == "text_encoder_2":
        return CLIPTextModelWithProjection.from_pretrained(source / "text_encoder_2").eval()
    if name == "unet":
        return UNet2DConditionModel.from_pretrained(unet_dir or source / "unet").eval()
    return AutoencoderKL.from_pretrained(source / "vae").eval()


def fresh_inputs(manifest_inputs: list[dict], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in manifest_inputs:
        if spec["dtype"] == "int64":
            tensors.append(torch.randint(0, 500, spec["shape"], generator=generator))
        elif spec["name"] == "timestep":
            tensors.append(torch.randint(0, 1000, spec["shape"], generator=generator).float())
        else:
            tensors.append(torch.randn(spec["shape"], generator=generator))
    return tensors


# The outputs optimum-neuron reads from each artifact; SDXL text encoders also return every hidden state.
EXPECTED_OUTPUTS = {
    "text_encoder": ["last_hidden_state", "pooler_output"],
    "text_encoder_2": ["text_embeds", "last_hidden_state"],
    "unet": ["sample"],
    "vae_encoder": ["latent_parameters"],
    "vae_decoder": ["sample"],
}


def eager_outputs(model, name: str, inputs: list[torch.Tensor], input_names: list[str]) -> dict[str, torch.Tensor]:
    """Every output the eager model gives, by name (hidden states as hidden_states.0, .1, ...)."""
    named = dict(zip(input_names, inputs))
    if name.startswith("text_encoder"):
        out = model(named["input_ids"], output_hidden_states=True)
        first = {"text_embeds": out.text_embeds} if name == "text_encoder_2" else {"pooler_output": out.pooler_output}
        return {
            **first,
            "last_hidden_state": out.last_hidden_state,
            **{f"hidden_states.{i}": t for i, t in enumerate(out.hidden_states)},
        }
    if name == "unet":
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}
        out = model(
            named["sample"],
            named["timestep"],
            encoder_hidden_states=named["encoder_hidden_states"],
            timestep_cond=named.get("timestep_cond"),
            added_cond_kwargs=added or None,
        )
        return {"sample": out.sample}
    if name == "vae_encoder":
        return {"latent_parameters": model.encode(named["sample"]).latent_dist.parameters}
    return {"sample": model.decode(named["latent_sample"]).sample}


def artifact_outputs(outputs, names: list[str]) -> dict[str, torch.Tensor]:
    """An artifact's outputs by name: a dict's keys, or a tuple in the manifest's order (no more, no fewer);
    a nested tuple of hidden states becomes hidden_states.0, hidden_states.1, ..."""
    pairs = outputs.items() if isinstance(outputs, dict) else zip(names, outputs, strict=True)
    found = {}
    for name, value in pairs:
        if isinstance(value, (list, tuple)):
            found.update({f"{name}.{i}": t for i, t in enumerate(value)})
        else:
            found[name] = value
    return found


def flat(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, dict):
        return [t for v in outputs.values() for t in flat(v)]
    if isinstance(outputs, (list, tuple)):
        return [t for v in outputs for t in flat(v)]
    return [outputs]


@pytest.mark.parametrize("case", list(CASES))
def test_export_has_the_optimum_neuron_layout(case, exported):
    source, output, result = exported(case)
    expected_components = CASES[case][3]
    folders = {p.name for p in output.iterdir() if p.is_dir()}
    processors = {
        name for name in ("tokenizer", "tokenizer_2", "scheduler", "feature_extractor") if (source / name).is_dir()
    }
    assert folders == expected_components | processors
    assert "vae" not in folders
    assert sorted(p.name for p in output.iterdir() if p.is_file()) == ["manifest.json", "model_index.json"]
    index, source_index = (json.loads((d / "model_index.json").read_text()) for d in (output, source))
    if case == "lcm-sdxl":  # the swapped-in LCM UNet needs the LCM scheduler
        assert (
            index.pop("scheduler") == ["diffusers", "LCMScheduler"]
            and source_index.pop("scheduler")[1] != "LCMScheduler"
        )
    assert index == source_index
    for name in expected_components:
        assert sorted(p.name for p in (output / name).iterdir()) == ["config.json", "model.neuron"]
    assert result["ok"] is True
    assert set(result["components"]) == expected_components
    # nothing left beside the export
    assert [p.name for p in output.parent.iterdir()] == ["export"]


@pytest.mark.parametrize("case", list(CASES))
def test_component_configs_carry_the_neuron_section(case, exported):
    source, output, _ = exported(case)
    manifest = json.loads((output / "manifest.json").read_text())
    pipeline = manifest["pipeline"]
    for name in CASES[case][3]:
        config = json.loads((output / name / "config.json").read_text())
        neuron = config["neuron"]
        assert NEURON_KEYS <= set(neuron), name
        assert {k for k in neuron if k.startswith("static_")} == STATIC_KEYS[name]
        assert neuron["model_type"] == MODEL_TYPES[name]
        assert neuron["task"] == ("feature-extraction" if name.startswith("text_encoder") else "semantic-segmentation")
        assert neuron["dynamic_batch_size"] is False
        assert neuron["auto_cast"] == "matmul" and neuron["auto_cast_type"] == "bf16" and neuron["optlevel"] == "2"
        batch = (
            pipeline["batch_size"]
            if name.startswith("text_encoder")
            else pipeline["batch_size"] * pipeline["num_images_per_prompt"]
        )
        assert neuron["static_batch_size"] == batch
        if name == "unet":
            assert (neuron["static_height"], neuron["static_width"]) == (
                pipeline["height"] // 8,
                pipeline["width"] // 8,
            )
            assert neuron["static_vae_scale_factor"] == 8
        if name == "vae_encoder":
            assert (neuron["static_height"], neuron["static_width"], neuron["static_num_channels"]) == (
                pipeline["height"],
                pipeline["width"],
                3,
            )
        if name == "vae_decoder":
            assert (neuron["static_height"], neuron["static_width"], neuron["static_num_channels"]) == (
                pipeline["height"] // 8,
                pipeline["width"] // 8,
                4,
            )
        if name.startswith("text_encoder"):
            # optimum-neuron names the outputs from the top-level key; its neuron key is the exporter option.
            assert config["output_hidden_states"] is (pipeline["architecture"] != "sd")
            assert neuron["output_hidden_states"] is False


@pytest.mark.parametrize("case", list(CASES))
def test_every_artifact_matches_eager_on_fresh_inputs(case, exported, tiny_model):
    source, output, _ = exported(case)
    manifest = json.loads((output / "manifest.json").read_text())
    unet_dir = tiny_model("lcm-sdxl-unet") if case == "lcm-sdxl" else None
    for name, record in manifest["components"].items():
        assert record["validation"]["status"] == "passed"
        artifact = torch.jit.load(str(output / name / "model.neuron"))
        eager = eager_component(source, name, unet_dir)
        inputs = fresh_inputs(record["inputs"], seed=1234)
        with torch.no_grad():
            got = artifact_outputs(artifact(*inputs), record["outputs"])
            want = eager_outputs(eager, name, inputs, [i["name"] for i in record["inputs"]])
        hidden = (
            [key for key in want if key.startswith("hidden_states.")]
            if manifest["pipeline"]["architecture"] != "sd"
            else []
        )
        assert sorted(got) == sorted(EXPECTED_OUTPUTS[name] + hidden), name  # none dropped, none extra
        for key, tensor in got.items():
            assert tensor.shape == want[key].shape, (name, key)
            assert torch.allclose(tensor, want[key], atol=1e-4, rtol=0), (
                f"{name}.{key}: max diff {(tensor - want[key]).abs().max()}"
            )


@pytest.mark.parametrize("case", ["sd-text-to-image", "sdxl-refiner", "lcm-sdxl"])
def test_manifest_hashes_match_the_files(case, exported):
    source, output, _ = exported(case)
    manifest = json.loads((output / "manifest.json").read_text())
    listed = [f for c in manifest["components"].values() for f in c["files"]] + manifest["files"]
    on_disk = {p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file()} - {"manifest.json"}
    assert {f["path"] for f in listed} == on_disk
    for record in listed:
        data = (output / record["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        assert len(data) == record["size"]
    for name, component in manifest["components"].items():
        assert component["source_files"], name
        for source_file in component["source_files"]:
            assert len(source_file["sha256"]) == 64
    assert (
        manifest["environment"]["torch"] == torch.__version__.split("+")[0]
        or manifest["environment"]["torch"] == torch.__version__
    )
    assert manifest["config"]["backend"] == "cpu" and "token" not in manifest["config"]


def test_lcm_unet_artifact_uses_timestep_cond(exported):
    _, output, _ = exported("lcm")
    record = json.loads((output / "manifest.json").read_text())["components"]["unet"]
    assert [i["name"] for i in record["inputs"]] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    artifact = torch.jit.load(str(output / "unet" / "model.neuron"))
    inputs = fresh_inputs(record["inputs"], seed=7)
    changed = list(inputs)
    changed[3] = inputs[3] + 1.0
    with torch.no_grad():
        assert not torch.allclose(flat(artifact(*inputs))[0], flat(artifact(*changed))[0])
    config = json.loads((output / "unet" / "config.json").read_text())
    assert "lcm" in config["_name_or_path"].lower()  # optimum-neuron's loader picks its LCM runtime from it


def test_lcm_sdxl_unet_takes_timestep_cond_before_the_sdxl_extras(exported):
    _, output, result = exported("lcm-sdxl")
    record = json.loads((output / "manifest.json").read_text())["components"]["unet"]
    assert [i["name"] for i in record["inputs"]] == [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "timestep_cond",
        "text_embeds",
        "time_ids",
    ]
    assert result["pipeline"]["is_lcm"] is True and result["pipeline"]["data_parallel_mode"] == "all"
    scheduler = json.loads((output / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler"


def test_refiner_has_five_time_ids_and_no_text_encoder(exported):
    _, output, result = exported("sdxl-refiner")
    record = json.loads((output / "manifest.json").read_text())["components"]["unet"]
    shapes = {i["name"]: i["shape"] for i in record["inputs"]}
    assert shapes["time_ids"] == [1, 5]
    assert not (output / "text_encoder").exists()
    assert result["pipeline"]["architecture"] == "sdxl-refiner"


def test_inpainting_unet_takes_nine_channels(exported):
    _, output, _ = exported("sd-inpainting")
    record = json.loads((output / "manifest.json").read_text())["components"]["unet"]
    assert record["inputs"][0]["shape"] == [1, 9, 8, 8]


def test_unet_batch_is_batch_times_images_per_prompt(exported):
    _, output, _ = exported("lcm")
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["components"]["text_encoder"]["inputs"][0]["shape"] == [1, 77]
    assert manifest["components"]["unet"]["inputs"][0]["shape"][0] == 2
    assert manifest["components"]["vae_decoder"]["inputs"][0]["shape"][0] == 2


def test_components_subset_builds_only_those(tiny_model, cli, tmp_path):
    result = cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", "--components", "unet,vae_decoder"
    )
    assert result.exit_code == 0, result
    assert {p.name for p in (tmp_path / "out").iterdir() if (p / "model.neuron").exists()} == {"unet", "vae_decoder"}


def test_force_replaces_an_existing_export(tiny_model, cli, tmp_path):
    output = tmp_path / "out"
    assert (
        cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "vae_decoder").exit_code
        == 0
    )
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet", "--force")
    assert result.exit_code == 0, result
    assert (output / "unet" / "model.neuron").exists() and not (output / "vae_decoder").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_plain_progress_lines_when_not_a_terminal(tiny_model, cli, tmp_path):
    result = cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", "--components", "vae_decoder"
    )
    assert result.exit_code == 0, result
    assert "[1/1] vae_decoder: tracing" in result.stdout
    assert "validation passed" in result.stdout
    assert "\x1b[" not in result.stdout  # no terminal control codes in logs


def test_disable_validation_is_recorded_not_passed(tiny_model, cli, tmp_path):
    result = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        tmp_path / "out",
        "--components",
        "unet",
        "--disable-validation",
        "--json",
    )
    assert result.exit_code == 0, result
    validation = json.loads(result.stdout)["components"]["unet"]["validation"]
    assert validation["status"] == "skipped" and "disable-validation" in validation["reason"]


def test_default_output_is_derived_from_model_family_and_shapes(tiny_model, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli(
        "sd-xl", "-m", tiny_model("sdxl"), "--backend", "cpu", "--components", "vae_decoder", "--batch-size", "2"
    )
    assert result.exit_code == 0, result
    assert (tmp_path / f"{tiny_model('sdxl').name}-sd-xl-neuron-64x64-b2" / "vae_decoder" / "model.neuron").exists()


def test_optimum_cli_spellings_and_positional_output(tiny_model, cli, tmp_path):
    result = cli(
        "sd",
        "--model",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "--batch_size",
        "2",
        "--auto_cast",
        "all",
        "--auto_cast_type",
        "fp16",
        "--components",
        "unet",
        "--json",
        tmp_path / "sd_neuron",
    )
    assert result.exit_code == 0, result
    neuron = json.loads((tmp_path / "sd_neuron" / "unet" / "config.json").read_text())["neuron"]
    assert (neuron["static_batch_size"], neuron["auto_cast"], neuron["auto_cast_type"]) == (2, "all", "fp16")
