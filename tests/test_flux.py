"""Flux on the CPU backend: optimum-neuron 0.4.5's layout (CLIP text_encoder, T5 text_encoder_2 and transformer with a
weight shard per tensor-parallel rank, both VAE halves), each config.json's neuron block, the manifest, the cache,
and the refusals (a tp that does not divide the heads, Kontext, the flag on other families)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuron_export.roles.registry import T5_FLAGS, role_of

COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae_encoder", "vae_decoder")
SHARDED = ("text_encoder_2", "transformer")
SIZE = ("--height", "64", "--width", "64")  # Flux's default is 1024 px; the tiny tests run 64 px


def shard(component: str, rank: int) -> str:
    return f"{component}/weights/tp{rank}_sharded_checkpoint.safetensors"


def export_json(cli, model, out, *extra):
    result = cli("flux", "-m", model, "--backend", "cpu", "-o", out, "--json", *SIZE, *extra)
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def origins(result: dict) -> dict[str, str]:
    return {name: component["origin"] for name, component in result["components"].items()}


@pytest.fixture(scope="module")
def flux_export(tiny_model, tmp_path_factory):
    from helpers import run_cli

    out = tmp_path_factory.mktemp("flux") / "tp2"
    result = run_cli(
        "flux", "-m", tiny_model("flux"), "--backend", "cpu", "--tensor-parallel-size", "2", *SIZE, "-o", out
    )
    assert result.exit_code == 0, result
    return out


def test_the_export_has_optimums_folders_and_a_shard_per_rank(flux_export, tiny_model):
    files = {p.relative_to(flux_export).as_posix() for p in flux_export.rglob("*") if p.is_file()}
    for component in COMPONENTS:
        assert {f"{component}/model.neuron", f"{component}/config.json"} <= files
    weights = {name for name in files if "/weights/" in name}
    assert weights == {shard(component, rank) for component in SHARDED for rank in (0, 1)}
    assert {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json"} <= files
    assert "tokenizer_2/tokenizer.json" in files
    assert not any(name.startswith(("unet/", "vae/")) for name in files)
    # every rank's shard holds the component's weights as the source has them, under the traced wrapper's names
    # (`model.` + the source's), as the Neuron backend's ModelBuilder shards do; the module holds none of them
    for component, weights_file in (
        ("text_encoder_2", "model.safetensors"),
        ("transformer", "diffusion_pytorch_model.safetensors"),
    ):
        source = load_file(str(tiny_model("flux") / component / weights_file))
        for rank in (0, 1):
            tensors = load_file(str(flux_export / shard(component, rank)))
            for key, tensor in source.items():
                name = f"model.{key}"
                assert name in tensors and bool((tensors[name] == tensor).all()), (component, rank, key)
        module = torch.jit.load(str(flux_export / component / "model.neuron"))
        assert hasattr(module, "nxd_model")
        assert sum(t.numel() for t in module.state_dict().values()) == 0


def test_each_config_has_the_neuron_block_optimum_writes(flux_export):
    def neuron(component: str) -> dict:
        return json.loads((flux_export / component / "config.json").read_text())["neuron"]

    assert (neuron("text_encoder")["model_type"], neuron("text_encoder")["static_sequence_length"]) == (
        "clip-text-model",
        77,
    )
    t5 = neuron("text_encoder_2")
    assert (t5["model_type"], t5["task"], t5["static_sequence_length"]) == ("t5-encoder", "feature-extraction", 16)
    transformer = neuron("transformer")
    assert (transformer["model_type"], transformer["task"]) == ("flux-transformer-2d", "semantic-segmentation")
    statics = {key: value for key, value in transformer.items() if key.startswith("static_")}
    assert statics == {
        "static_batch_size": 1,
        "static_sequence_length": 16,  # the T5 tokenizer's model_max_length
        "static_num_channels": 4,
        "static_height": 8,
        "static_width": 8,
        "static_vae_scale_factor": 8,
        "static_encoder_hidden_size": 32,
        "static_rotary_axes_dim": 16,
    }
    assert {name: neuron(name)["tensor_parallel_size"] for name in COMPONENTS} == {
        "text_encoder": 1,
        "text_encoder_2": 2,
        "transformer": 2,
        "vae_encoder": 1,
        "vae_decoder": 1,
    }
    assert neuron("vae_decoder")["static_num_channels"] == 1  # Flux's latents before 2x2 packing


def test_the_manifest_records_flux_its_inputs_and_the_shards(flux_export):
    manifest = json.loads((flux_export / "manifest.json").read_text())
    pipeline = manifest["pipeline"]
    assert (pipeline["diffusers_pipeline"], pipeline["optimum_pipeline"]) == ("FluxPipeline", "NeuronFluxPipeline")
    assert (pipeline["architecture"], pipeline["data_parallel_mode"]) == ("flux", "none")
    transformer = manifest["components"]["transformer"]
    assert [(t["name"], t["shape"]) for t in transformer["inputs"]] == [
        ("hidden_states", [1, 16, 4]),
        ("encoder_hidden_states", [1, 16, 32]),
        ("pooled_projections", [1, 32]),
        ("timestep", [1]),
        ("guidance", [1]),
        ("image_rotary_emb", [32, 16, 2]),  # S + N positions, sum(axes_dims_rope), cos and sin; no batch
    ]
    assert transformer["outputs"] == ["out_hidden_states"]
    for component in SHARDED:
        paths = [f["path"] for f in manifest["components"][component]["files"]]
        assert [shard(component, 0), shard(component, 1)] == paths[1:]
    assert manifest["components"]["text_encoder_2"]["neuron_compiler_args"] == list(T5_FLAGS)
    assert all(component["validation"]["status"] == "passed" for component in manifest["components"].values())


def test_a_rerun_builds_nothing_and_another_tp_rebuilds_only_the_sharded(cli, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("flux"), model)
    first = export_json(cli, model, tmp_path / "a", "--tensor-parallel-size", "2")
    assert origins(first) == dict.fromkeys(COMPONENTS, "built")
    again = export_json(cli, model, tmp_path / "b", "--tensor-parallel-size", "2")
    assert origins(again) == dict.fromkeys(COMPONENTS, "cached")
    for component in SHARDED:
        for rank in (0, 1):
            name = shard(component, rank)
            assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    single = export_json(cli, model, tmp_path / "c")  # optimum-cli's default: tp 1
    assert origins(single) == {**dict.fromkeys(COMPONENTS, "cached"), **dict.fromkeys(SHARDED, "built")}
    assert not (tmp_path / "c" / shard("transformer", 1)).exists()


def test_flux_roles_are_registered_beside_the_others():
    assert role_of("text_encoder", "flux").module_path == "neuron_export.roles.text_encoder"  # CLIP, plain trace
    assert role_of("text_encoder_2", "flux").module_path == "neuron_export.roles.t5"
    assert role_of("text_encoder_2", "sdxl").module_path == "neuron_export.roles.text_encoder"
    assert role_of("transformer", "flux").module_path == "neuron_export.roles.flux"
    assert role_of("transformer", "flux").sharded and role_of("text_encoder_2", "flux").sharded


def refused(cli, *args) -> str:
    result = cli(*args)
    assert result.exit_code != 0, result
    assert "Traceback" not in result.stderr
    return result.stderr + result.stdout


def test_a_tensor_parallel_size_that_does_not_divide_the_heads_is_refused(cli, tiny_model, tmp_path):
    message = refused(
        cli, "flux", "-m", tiny_model("flux"), "--backend", "cpu", "--tensor-parallel-size", "3", "-o", tmp_path / "x"
    )
    assert "--tensor-parallel-size 3" in message and "num_attention_heads (2)" in message
    assert not (tmp_path / "x").exists()


def test_kontext_is_recognised_and_refused_in_one_sentence(cli, tiny_model, tmp_path):
    model = tmp_path / "kontext"
    shutil.copytree(tiny_model("flux"), model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    message = refused(cli, "flux", "-m", model, "--backend", "cpu", "-o", tmp_path / "x")
    assert "FluxKontextPipeline" in message and "cannot export yet" in message


@pytest.mark.parametrize(
    ("family", "example", "message"),
    [("sd", "flux", "export it with `neuron-export flux`"), ("flux", "sd", "is not a Flux pipeline")],
)
def test_the_wrong_command_names_the_right_one(cli, tiny_model, tmp_path, family, example, message):
    assert message in refused(cli, family, "-m", tiny_model(example), "--backend", "cpu", "-o", tmp_path / "x")


def test_tensor_parallel_size_is_refused_by_the_other_families(cli, tiny_model, tmp_path):
    message = refused(
        cli,
        "pixart",
        "-m",
        tiny_model("pixart-sigma"),
        "--backend",
        "cpu",
        "--tensor-parallel-size",
        "2",
        "-o",
        tmp_path / "x",
    )
    assert "--tensor-parallel-size" in message


# --- runtime: the export equals diffusers' eager pipeline ------------------------------------------------

PROMPTS = ["a photo of an astronaut riding a horse on mars", "a cat"]
STEPS = 3
ATOL = 1e-4  # as the other runtime tests


def eager_images(model, prompts, **extra):
    import diffusers
    import torch

    pipe = diffusers.FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompts,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(0),
        height=64,
        width=64,
        max_sequence_length=16,
        **extra,
    ).images


def test_load_runs_the_export_equal_to_the_eager_pipeline(flux_export, tiny_model):
    import diffusers
    import numpy as np
    import torch

    import neuron_export
    from neuron_export.manifest import read_manifest

    pipe = neuron_export.load(flux_export)
    assert isinstance(pipe, diffusers.FluxPipeline)
    # the export's size and sequence length are the call's defaults (FluxPipeline's own are 1024 px, 512 tokens)
    ours = pipe(PROMPTS, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
    reference = eager_images(tiny_model("flux"), PROMPTS, output_type="np")
    assert ours.images.shape == reference.shape == (2, 64, 64, 3)
    difference = float(np.abs(ours.images - reference).max())
    assert difference < ATOL, difference
    manifest = read_manifest(flux_export)
    compiled = {name: tuple(tuple(t.shape) for t in record.inputs) for name, record in manifest.components.items()}
    assert set(pipe.text_encoder_2.runner.calls) == {compiled["text_encoder_2"]}
    assert set(pipe.transformer.runner.calls) == {compiled["transformer"]}  # the rotary input whole, per chunk


def test_generate_writes_the_image_of_the_eager_pipeline(cli, flux_export, tiny_model, tmp_path):
    import numpy as np
    from PIL import Image

    out = tmp_path / "out.png"
    done = cli("generate", flux_export, "--prompt", PROMPTS[0], "--steps", STEPS, "--seed", 0, "-o", out)
    assert done.exit_code == 0, done
    reference = eager_images(tiny_model("flux"), PROMPTS[0])[0]
    ours = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    assert np.abs(ours - np.asarray(reference.convert("RGB")).astype(np.int16)).max() <= 1


# --- the shards are what the artifacts compute with ------------------------------------------------------

CHANGED = "model.proj_out.weight"  # the transformer's last projection: any change shows in the image


def rewrite_shard(path: Path, change) -> None:
    """The shard at `path` rewritten with `change(tensors)` applied (its header metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def flux_images(export: Path):
    import torch

    import neuron_export

    pipe = neuron_export.load(export)
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(PROMPTS[0], num_inference_steps=STEPS, generator=generator, output_type="np").images


def test_a_changed_shard_changes_what_load_computes_and_verify_names_it(flux_export, tmp_path, cli):
    """Our load computes with rank 0's shard as it is on disk (it does not check hashes: `verify` does)."""
    import numpy as np

    changed = tmp_path / "changed"
    shutil.copytree(flux_export, changed)
    rewrite_shard(changed / shard("transformer", 0), lambda tensors: tensors[CHANGED].mul_(-1.0))
    difference = float(np.abs(flux_images(changed) - flux_images(flux_export)).max())
    assert difference > 0.01, difference

    code, out, _ = cli("verify", changed, "--json")
    assert code == 3
    problems = json.loads(out)["checks"]["integrity"]["problems"]
    assert len(problems) == 1 and problems[0].startswith(f"{shard('transformer', 0)}: sha256"), problems


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda tensors: tensors.pop(CHANGED), f"has no tensor {CHANGED}"),
        (lambda tensors: tensors.__setitem__(CHANGED, torch.zeros(3)), f"{CHANGED} has shape [3]"),
        (lambda tensors: tensors.__setitem__(CHANGED, tensors[CHANGED].half()), f"{CHANGED} is not float32"),
        (lambda tensors: tensors.__setitem__("model.extra.weight", torch.zeros(1)), "model.extra.weight"),
    ],
    ids=["missing", "shape", "dtype", "unexpected"],
)
def test_a_shard_that_does_not_fit_its_module_is_refused_naming_the_tensor(flux_export, tmp_path, cli, change, named):
    broken = tmp_path / "broken"
    shutil.copytree(flux_export, broken)
    rewrite_shard(broken / shard("transformer", 0), change)
    done = cli("generate", broken, "--prompt", "a cat", "--steps", 1, "-o", tmp_path / "x.png")
    assert done.exit_code != 0
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert "transformer/weights/" in message and named in message, message


def test_an_artifact_without_its_shards_is_refused_and_never_computes_uninitialized(flux_export, tmp_path, cli):
    broken = tmp_path / "broken"
    shutil.copytree(flux_export, broken)
    shutil.rmtree(broken / "text_encoder_2" / "weights")
    done = cli("generate", broken, "--prompt", "a cat", "--steps", 1, "-o", tmp_path / "x.png")
    assert done.exit_code != 0 and "text_encoder_2/weights/" in done.stderr, done
    module = torch.jit.load(str(flux_export / "text_encoder_2" / "model.neuron"))
    with pytest.raises(torch.jit.Error, match="nxd_model.initialize"):
        module(torch.zeros(1, 16, dtype=torch.int64))


# --- a LoRA is fused into the weights that are written ---------------------------------------------------

LORA_TENSOR = "transformer_blocks.0.attn.to_q.weight"  # one of the layers the tiny LoRA touches


@pytest.fixture(scope="module")
def flux_lora(tiny_model, tmp_path_factory):
    """A random LoRA for the tiny Flux in diffusers' format (`transformer.<layer>.lora_A.weight`, and the CLIP
    `text_encoder.` layers), shaped from its headers."""
    from neuron_export.testing.lora import build_lora

    return build_lora(
        tiny_model("flux"), tmp_path_factory.mktemp("flux-lora"), components=("transformer", "text_encoder")
    )


@pytest.fixture(scope="module")
def flux_lora_export(tiny_model, flux_lora, tmp_path_factory):
    from helpers import run_cli

    out = tmp_path_factory.mktemp("flux-lora-export") / "tp2"
    result = run_cli(
        "flux", "-m", tiny_model("flux"), "--backend", "cpu", "--tensor-parallel-size", "2", *SIZE,
        "--lora", flux_lora, "--lora-scale", "0.8", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result
    return out


def eager_fused_flux(model: Path, lora: Path, scale: float):
    """diffusers' FluxPipeline after load_lora_weights, set_adapters at `scale` and fuse_lora into both components
    the LoRA has layers for (Flux's fuse_lora fuses only the transformer unless asked; loaded and unfused, the
    pipeline applies the CLIP encoder's layers too, as the export does)."""
    import diffusers

    pipe = diffusers.FluxPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="flux")
    pipe.set_adapters(["flux"], adapter_weights=[scale])
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    return pipe


def test_a_lora_is_in_the_written_shards_and_load_equals_diffusers_fused(
    flux_lora_export, flux_export, flux_lora, tiny_model
):
    import numpy as np

    reference = eager_fused_flux(tiny_model("flux"), flux_lora, 0.8)
    fused = reference.transformer.state_dict()[LORA_TENSOR]
    source = load_file(str(tiny_model("flux") / "transformer" / "diffusion_pytorch_model.safetensors"))[LORA_TENSOR]
    assert not torch.equal(fused, source)
    for rank in (0, 1):
        written = load_file(str(flux_lora_export / shard("transformer", rank)))[f"model.{LORA_TENSOR}"]
        assert torch.allclose(written, fused, atol=1e-6), rank

    generator = torch.Generator("cpu").manual_seed(0)
    expected = reference(
        PROMPTS[0], num_inference_steps=STEPS, generator=generator, height=64, width=64, max_sequence_length=16,
        output_type="np",
    ).images  # fmt: skip
    ours = flux_images(flux_lora_export)
    assert float(np.abs(ours - expected).max()) < ATOL
    assert float(np.abs(ours - flux_images(flux_export)).max()) > 0.01  # the LoRA shows


def test_the_lora_is_in_the_manifest_and_the_keys_of_what_it_touches(flux_lora_export, flux_export, flux_lora):
    import hashlib

    with_lora = json.loads((flux_lora_export / "manifest.json").read_text())
    without = json.loads((flux_export / "manifest.json").read_text())
    (recorded,) = with_lora["source"]["loras"]
    assert recorded["sha256"] == hashlib.sha256(flux_lora.read_bytes()).hexdigest()
    assert (recorded["scale"], sorted(recorded["components"])) == (0.8, ["text_encoder", "transformer"])
    keys = {
        name: (with_lora["components"][name]["cache_key"], without["components"][name]["cache_key"])
        for name in COMPONENTS
    }
    assert {name for name, (ours, theirs) in keys.items() if ours != theirs} == {"text_encoder", "transformer"}


def _lora_from(tiny_model, root: Path, example: str, components: tuple[str, ...], name: str = "x.safetensors") -> Path:
    from neuron_export.testing.lora import LORA_TARGETS, build_lora

    targets = {**LORA_TARGETS, "text_encoder_2": ("q", "v")} if example == "flux" else None  # Flux's is a T5
    folder = root / name.split(".")[0]
    return build_lora(tiny_model(example), folder, components=components, weight_name=name, targets=targets)


FLUX_BAD_LORAS = {
    "an SD LoRA": (lambda tiny, root: _lora_from(tiny, root, "sd", ("unet",)), "has layers for unet"),
    "T5 layers": (
        lambda tiny, root: _lora_from(tiny, root, "flux", ("transformer", "text_encoder_2"), "t5.safetensors"),
        "has layers for text_encoder_2, which diffusers' Flux pipeline does not fuse",
    ),
    "a pickle": (lambda tiny, root: _pickled_lora(root), "safetensors only"),
    "no LoRA keys": (lambda tiny, root: _not_a_lora(root), "has no LoRA layers"),
}


def _pickled_lora(root: Path) -> Path:
    folder = root / "pickled"
    folder.mkdir()
    (folder / "pytorch_lora_weights.bin").write_bytes(b"not read")
    return folder


def _not_a_lora(root: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"transformer.proj_out.weight": torch.zeros(4, 4)}, str(root / "weights.safetensors"))
    return root / "weights.safetensors"


@pytest.mark.parametrize("case", FLUX_BAD_LORAS)
def test_a_bad_flux_lora_is_one_sentence_naming_lora_and_no_output(cli, tiny_model, tmp_path, case):
    make, words = FLUX_BAD_LORAS[case]
    out = tmp_path / "export"
    result = cli(
        "flux", "-m", tiny_model("flux"), "--backend", "cpu", *SIZE, "--lora", make(tiny_model, tmp_path), "-o", out
    )
    assert result.exit_code == 2, result
    message = result.stderr.strip()
    assert "--lora" in message and words in message and message.count("\n") == 0, message
    assert not out.exists()


def test_the_shipped_flux_config_is_the_documented_tp8_export():
    from neuron_export.planning.config import make_config, read_config_file

    path = Path(__file__).parent.parent / "configs" / "flux-dev-1024-tp8.yaml"
    spec = make_config(read_config_file(path)).spec
    assert (spec.family, spec.model, spec.tensor_parallel_size) == ("flux", "black-forest-labs/FLUX.1-dev", 8)
    assert (spec.height, spec.width, spec.sequence_length, spec.torch_dtype) == (1024, 1024, 512, "bfloat16")
    assert (
        24 % spec.tensor_parallel_size == 0 and 64 % spec.tensor_parallel_size == 0
    )  # FLUX.1-dev's and T5-XXL's heads


def test_tensor_parallel_size_in_a_config_of_another_family_is_refused():
    from neuron_export.errors import ExportError
    from neuron_export.planning.config import make_config

    with pytest.raises((ExportError, ValueError), match="tensor_parallel_size = 2 is for `neuron-export flux`"):
        make_config({"family": "sd", "tensor_parallel_size": 2})


# --- verify: FLUX.1-dev at 1024 px, tp 8, as optimum-neuron documents it ------------------------------------------
FLUX_DEV = {  # parameter counts of black-forest-labs/FLUX.1-dev's components (safetensors headers)
    "text_encoder": 123_060_480,
    "text_encoder_2": 4_762_310_656,
    "transformer": 11_901_408_320,
    "vae_encoder": 34_163_592,
    "vae_decoder": 49_490_179,
}
FLUX_DEV_INPUTS = {"vae_encoder": ((1, 3, 1024, 1024),), "vae_decoder": ((1, 16, 128, 128),)}


def flux_dev_footprint(tp: int):
    from neuron_export.deploy.footprint import ComponentFootprint, estimate

    components = [ComponentFootprint(name, count, 0, FLUX_DEV_INPUTS.get(name, ())) for name, count in FLUX_DEV.items()]
    return estimate(components, "none", torch_dtype="bfloat16", architecture="flux", tensor_parallel_size=tp)


def test_flux_dev_tp8_fits_inf2_24xlarge_48xlarge_and_trn1_32xlarge_not_smaller():
    """optimum-neuron's Flux guide exports FLUX.1-dev with --tensor_parallel_size 8 for inf2.24xlarge/48xlarge and
    trn1.32xlarge: 8 NeuronCores, each with an eighth of the T5 and transformer weights."""
    from neuron_export.deploy.footprint import fits, smallest_fit
    from neuron_export.deploy.instances import INSTANCES

    footprint = flux_dev_footprint(8)
    assert footprint.cores_needed == 8
    verdicts = {instance.name: fits(footprint, instance).fits for instance in INSTANCES}
    assert verdicts["inf2.24xlarge"] and verdicts["inf2.48xlarge"] and verdicts["trn1.32xlarge"]
    assert not verdicts["inf2.xlarge"] and not verdicts["inf2.8xlarge"]  # 2 NeuronCores
    assert smallest_fit(footprint, "inf2").name == "inf2.24xlarge"
    # unsharded, the transformer alone outgrows one NeuronCore's 16 GiB
    assert not fits(flux_dev_footprint(1), next(i for i in INSTANCES if i.name == "inf2.48xlarge")).fits


def test_inpainting_reuses_the_components_and_runs_equal_to_the_eager_pipeline(cli, tiny_model, tmp_path):
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    import neuron_export

    out = tmp_path / "inpaint"
    export_json(cli, tiny_model("flux"), out, "--task", "inpainting", "--tensor-parallel-size", "2")
    pipeline = json.loads((out / "manifest.json").read_text())["pipeline"]
    assert (pipeline["diffusers_pipeline"], pipeline["optimum_pipeline"]) == (
        "FluxInpaintPipeline",
        "NeuronFluxInpaintPipeline",
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.fromarray(((np.arange(64 * 64).reshape(64, 64) // 64 > 32) * 255).astype(np.uint8)).convert("RGB")
    call = {"image": image, "mask_image": mask, "num_inference_steps": STEPS, "strength": 0.8, "output_type": "np"}
    pipe = neuron_export.load(out)
    assert isinstance(pipe, diffusers.FluxInpaintPipeline)
    ours = pipe(PROMPTS[1], generator=torch.Generator("cpu").manual_seed(0), **call).images
    eager = diffusers.FluxInpaintPipeline.from_pretrained(tiny_model("flux"))
    eager.set_progress_bar_config(disable=True)
    reference = eager(
        PROMPTS[1], generator=torch.Generator("cpu").manual_seed(0), height=64, width=64, max_sequence_length=16, **call
    ).images
    assert ours.shape == reference.shape == (1, 64, 64, 3)
    assert float(np.abs(ours - reference).max()) < ATOL
