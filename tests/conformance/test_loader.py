"""Loader conformance: optimum-neuron 0.4.5's own pipeline classes load our CPU exports unchanged, and
generate the same pixels as diffusers' eager pipeline on the source at the same seed, scheduler and guidance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conformance import venv
from conformance.conftest import Case, Sources, export_ours, manifest

PROMPT = "a lighthouse on a cliff at dusk"
MAX_PIXEL_DIFF = 1e-4  # pixels are in [0, 1]; TorchScript on the CPU repeats eager arithmetic (~1e-6 seen)

CASES = [
    Case(
        "sd",
        "sd",
        "sd",
        pipeline="NeuronStableDiffusionPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 3, "guidance_scale": 7.5},
    ),
    Case(
        "sd-image-to-image",
        "sd",
        "sd",
        task="image-to-image",
        pipeline="NeuronStableDiffusionImg2ImgPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 4, "strength": 0.75, "image": "init"},
    ),
    Case(
        "sd-inpainting",
        "sd-inpaint",
        "sd",
        task="inpainting",
        pipeline="NeuronStableDiffusionInpaintPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 3, "image": "init", "mask_image": "mask"},
    ),
    Case(
        "sdxl",
        "sdxl",
        "sd-xl",
        pipeline="NeuronStableDiffusionXLPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 3, "guidance_scale": 5.0},
    ),
    Case(
        "sdxl-image-to-image",
        "sdxl",
        "sd-xl",
        task="image-to-image",
        pipeline="NeuronStableDiffusionXLImg2ImgPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 4, "strength": 0.5, "image": "init"},
    ),
    # A turbo checkpoint is an SDXL pipeline run without guidance in one step (its model card's call).
    Case(
        "turbo",
        "sdxl",
        "sd-xl",
        pipeline="NeuronStableDiffusionXLPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 1, "guidance_scale": 0.0},
    ),
    Case(
        "lcm",
        "lcm",
        "lcm",
        pipeline="NeuronLatentConsistencyModelPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 2, "guidance_scale": 8.5},
    ),
    # optimum-neuron decides LCM from the UNet config's name: a folder name must not decide it either way.
    Case(
        "lcm-plain-folder",
        "lcm",
        "lcm",
        source_folder="dreamshaper-v7",
        pipeline="NeuronLatentConsistencyModelPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 2, "guidance_scale": 8.5},
    ),
    Case(
        "sd-in-lcm-named-folder",
        "sd",
        "sd",
        source_folder="lcm-experiments",
        pipeline="NeuronStableDiffusionPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 2, "guidance_scale": 7.5},
    ),
    Case(
        "lcm-sdxl",
        "sdxl",
        "sd-xl",
        unet="lcm-sdxl-unet",
        pipeline="NeuronStableDiffusionXLPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 2, "guidance_scale": 8.0},
    ),
    Case(
        "batch-2",
        "sd",
        "sd",
        batch_size=2,
        pipeline="NeuronStableDiffusionPipeline",
        call={"prompt": [PROMPT, "a red fox in snow"], "num_inference_steps": 2},
    ),
    Case(
        "2-images-per-prompt",
        "sd",
        "sd",
        num_images_per_prompt=2,
        pipeline="NeuronStableDiffusionPipeline",
        call={"prompt": PROMPT, "num_images_per_prompt": 2, "num_inference_steps": 2},
    ),
    Case(
        "non-square",
        "sd",
        "sd",
        height=64,
        width=96,
        pipeline="NeuronStableDiffusionPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 2},
    ),
    Case(
        "dynamic-batch",
        "sd",
        "sd",
        dynamic_batch_size=True,
        pipeline="NeuronStableDiffusionPipeline",
        call={"prompt": [PROMPT, "a red fox in snow"], "num_inference_steps": 2},
    ),
    # Two LoRAs fused at their scales; the reference is diffusers after load_lora_weights, set_adapters, fuse_lora.
    Case(
        "sd-two-loras",
        "sd",
        "sd",
        loras=(("sd-style", "style", 0.8), ("sd-detail", "detail", -0.6)),
        pipeline="NeuronStableDiffusionPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 2},
    ),
    Case(
        "sdxl-non-square-2-images",
        "sdxl",
        "sd-xl",
        height=96,
        width=64,
        num_images_per_prompt=2,
        pipeline="NeuronStableDiffusionXLPipeline",
        call={"prompt": PROMPT, "num_images_per_prompt": 2, "num_inference_steps": 2},
    ),
    # ControlNet, IP-Adapter and InstructPix2Pix: the control / prompt / edited image is the call's "image".
    # Three ControlNets: on ext4 the loader's listing order is a hash order, so some pairing differs from ours.
    Case(
        "sd-multi-controlnet",
        "sd",
        "sd",
        controlnets=("sd-controlnet", "sd-controlnet@1", "sd-controlnet@2"),
        pipeline="NeuronStableDiffusionControlNetPipeline",
        call={
            "prompt": PROMPT,
            "num_inference_steps": 2,
            "image": ["init", "init-2", "init-3"],
            "controlnet_conditioning_scale": [1.0, 0.8, 0.6],
        },
    ),
    Case(
        "sdxl-controlnet",
        "sdxl",
        "sd-xl",
        controlnets=("sdxl-controlnet",),
        pipeline="NeuronStableDiffusionXLControlNetPipeline",
        call={
            "prompt": PROMPT,
            "num_inference_steps": 2,
            "image": "init",
            "guidance_scale": 5.0,
            "controlnet_conditioning_scale": 0.7,
        },
    ),
    Case(
        "sd-instruct-pix2pix",
        "sd-pix2pix",
        "sd",
        task="instruct-pix2pix",
        dynamic_batch_size=True,
        pipeline="NeuronStableDiffusionInstructPix2PixPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 2, "image": "init", "image_guidance_scale": 1.5},
    ),
    Case(
        "sd-ip-adapter",
        "sd",
        "sd",
        ip_adapter=True,
        pipeline="NeuronStableDiffusionPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 2, "ip_adapter_image": "init-2"},
    ),
]
REFINER = Case(
    "sdxl-refiner",
    "sdxl-refiner",
    "sd-xl",
    task="image-to-image",
    pipeline="NeuronStableDiffusionXLImg2ImgPipeline",
    call={"prompt": PROMPT, "num_inference_steps": 4, "strength": 0.5, "image": "init"},
)


def _image(value: Any, images: dict[str, Path]) -> Any:
    return [str(images[name]) for name in value] if isinstance(value, list) else str(images[value])


def generate_request(case: Case, sources: Sources, export: Path, images: dict[str, Path]) -> dict[str, Any]:
    kwargs = {key: _image(value, images) if key.endswith("image") else value for key, value in case.call.items()}
    compiled = {
        name: [tensor["shape"] for tensor in record["inputs"]]
        for name, record in manifest(export)["components"].items()
    }
    request = {
        "name": case.name,
        "export_dir": export,
        "pipeline": case.pipeline,
        "source_dir": sources.path(case),
        "kwargs": kwargs,
        "seed": 0,
        "compiled_inputs": compiled,
        "dynamic_batch": case.dynamic_batch_size,
    }
    if case.unet:
        request["source_unet"] = sources.get(case.unet)
    if case.loras:
        request["loras"] = case.reference_loras(sources)
    if case.controlnets:  # the reference runs them in --controlnet order; optimum's loader is reordered to it
        request.update(source_controlnets=[sources.get(name) for name in case.controlnets], order_controlnets=True)
    if case.ip_adapter:
        request["source_ip_adapter"] = case.ip_adapter_options(sources)
    return request


@pytest.fixture(scope="module")
def loaded(sources: Sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each case exported by us (cpu backend), then loaded and run by optimum-neuron: {name: its result}."""
    root = tmp_path_factory.mktemp("loader")
    images = {
        "init": venv.write_test_image(root / "init.png", 64, 64),
        "init-2": venv.write_test_image(root / "init-2.png", 64, 64, seed=2),
        "mask": venv.write_test_image(root / "mask.png", 64, 64, mask=True),
        "init-3": venv.write_test_image(root / "init-3.png", 64, 64, seed=3),
    }
    requests, exports = [], {}
    for case in [*CASES, REFINER]:
        exports[case.name] = export_ours(case, sources, root / case.name, backend="cpu")
        requests.append(generate_request(case, sources, exports[case.name], images))
    results = venv.generate(requests)["results"]
    return {result["name"]: {**result, "manifest": manifest(exports[result["name"]])} for result in results}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_optimum_neuron_loads_our_export_and_matches_diffusers(case: Case, loaded: dict[str, dict[str, Any]]):
    result = loaded[case.name]
    assert result["ok"], result.get("error")
    assert result["shape_errors"] == []  # every component was called at the shapes it was compiled for
    assert result["optimum_shape"] == result["reference_shape"]
    assert result["max_abs_diff"] <= MAX_PIXEL_DIFF, result
    # The core placement optimum-neuron chose is the one our manifest states.
    assert result["data_parallel_mode"] == result["manifest"]["pipeline"]["data_parallel_mode"]


def test_lcm_runs_on_both_cores_whatever_its_folder_is_called(loaded: dict[str, dict[str, Any]]):
    for name in ("lcm", "lcm-plain-folder", "lcm-sdxl"):
        assert (loaded[name]["data_parallel_mode"], loaded[name]["is_lcm"]) == ("all", True), name
        assert loaded[name]["scheduler"] == "LCMScheduler", name
    assert (loaded["sd-in-lcm-named-folder"]["data_parallel_mode"], loaded["sd-in-lcm-named-folder"]["is_lcm"]) == (
        "unet",
        False,
    )


def test_guidance_pipelines_split_the_doubled_batch_over_the_two_cores(loaded: dict[str, dict[str, Any]]):
    placement = loaded["sd"]["placement"]["unet"]
    assert placement["data_parallel"] and placement["device_ids"] == [0, 1]
    assert {call["core"] for call in placement["core_calls"]} == {0, 1}


def test_the_refiner_fails_in_optimum_neuron_as_documented(loaded: dict[str, dict[str, Any]]):
    """optimum-neuron 0.4.5 cannot load a pipeline without text_encoder; our own runtime can (test_generate)."""
    error = loaded["sdxl-refiner"]["error"]
    assert (error["stage"], error["type"], error["message"]) == ("load", "KeyError", "'text_encoder'")


def test_instruct_pix2pix_runs_its_three_way_guidance_batch_on_both_cores(loaded: dict[str, dict[str, Any]]):
    """Text and image guidance triple the UNet's batch (3 rows for batch 1): with dynamic batch the runtime splits
    them 2 + 1 over the two NeuronCores, each a multiple of the compiled batch (shape_errors checks that)."""
    result = loaded["sd-instruct-pix2pix"]
    placement = result["placement"]["unet"]
    assert placement["data_parallel"] and placement["set_dynamic_batching"]
    assert {(call["core"], call["input_shapes"][0][0]) for call in placement["core_calls"]} == {(0, 2), (1, 1)}
    assert result["shape_errors"] == [] and result["manifest"]["components"]["unet"]["inputs"][0]["shape"][0] == 1


def test_several_controlnets_pair_with_their_images_in_controlnet_order(loaded: dict[str, dict[str, Any]]):
    """optimum-neuron lists the controlnet_* folders in directory order (a hash order on ext4); after
    neuron_export.order_controlnets the pipeline holds them in export order, so images pair as given."""
    result = loaded["sd-multi-controlnet"]
    assert result["controlnet_folders"] == ["controlnet_0", "controlnet_1", "controlnet_2"]
    assert result["max_abs_diff"] <= MAX_PIXEL_DIFF


# --- PixArt-α / -Σ: a T5 encoder (weights/ shard beside it) and a diffusion transformer --------------------
# The tiny transformer's 8x8 latents are in no resolution-binning table, so both pipelines are called without
# binning; optimum-neuron forces max_sequence_length to the export's (16, the tiny tokenizer's), and the reference
# diffusers call is given the same.
PIXART_CALL = {"num_inference_steps": 3, "use_resolution_binning": False, "max_sequence_length": 16}
PIXART_CASES = [
    Case(
        "pixart-sigma",
        "pixart-sigma",
        "pixart",
        pipeline="NeuronPixArtSigmaPipeline",
        call={"prompt": PROMPT, **PIXART_CALL},
    ),
    Case(
        "pixart-alpha-batch-2",
        "pixart-alpha",
        "pixart",
        batch_size=2,
        pipeline="NeuronPixArtAlphaPipeline",
        call={"prompt": [PROMPT, "a red fox in snow"], **PIXART_CALL},
    ),
]


# The sharded roles' artifacts hold no weights: optimum's loader gives them their weights/ shards through
# nxd_model.initialize. A copy of each first export with one tensor of its rank-0 shard negated (PixArt: the T5's
# final norm; Flux: the transformer's last projection) must generate something else: proof that the loader's
# shards are what the artifact computes with.
PLANTED = "-planted-shard"
PLANTED_TENSORS = {
    "pixart": ("text_encoder", "model.encoder.final_layer_norm.weight"),
    "flux": ("transformer", "model.proj_out.weight"),
}
PLANTED_MIN_DIFF = 0.01  # pixels in [0, 1]; an unread shard gives the ~1e-6 of an unchanged export


def planted_request(case: Case, sources: Sources, export: Path, root: Path) -> dict[str, Any]:
    """The case's generate request on a copy of `export` whose rank-0 shard has one tensor negated."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    component, tensor = PLANTED_TENSORS[case.family]
    copy = root / f"{case.name}{PLANTED}"
    shutil.copytree(export, copy)
    shard = copy / component / "weights" / "tp0_sharded_checkpoint.safetensors"
    with safe_open(str(shard), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    tensors[tensor] = -tensors[tensor]
    save_file(tensors, str(shard), metadata=metadata)
    return {**generate_request(case, sources, copy, {}), "name": copy.name}


@pytest.fixture(scope="module")
def loaded_pixart(sources: Sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("loader-pixart")
    exports = {case.name: export_ours(case, sources, root / case.name, backend="cpu") for case in PIXART_CASES}
    requests = [generate_request(case, sources, exports[case.name], {}) for case in PIXART_CASES]
    requests.append(planted_request(PIXART_CASES[0], sources, exports[PIXART_CASES[0].name], root))
    results = venv.generate(requests)["results"]
    return {
        result["name"]: {**result, "manifest": manifest(Path(request["export_dir"]))}
        for result, request in zip(results, requests, strict=True)
    }


@pytest.mark.parametrize("case", PIXART_CASES, ids=[case.name for case in PIXART_CASES])
def test_optimum_neuron_loads_our_pixart_export_and_matches_diffusers(case: Case, loaded_pixart):
    """Equal to diffusers, whose pipelines mask the T5's padding: our T5 artifact takes input_ids alone (all
    optimum's loader passes a `t5-encoder`) and masks the padding inside, where the reference's drifts."""
    result = loaded_pixart[case.name]
    assert result["ok"], result.get("error")
    assert result["shape_errors"] == []
    assert result["optimum_shape"] == result["reference_shape"]
    assert result["max_abs_diff"] <= MAX_PIXEL_DIFF, result
    assert result["data_parallel_mode"] == result["manifest"]["pipeline"]["data_parallel_mode"] == "transformer"
    placement = result["placement"]
    assert placement["transformer"]["data_parallel"] and placement["transformer"]["device_ids"] == [0, 1]
    assert not placement["text_encoder"]["data_parallel"]


# --- Flux at tp 2: CLIP, a T5 (weights/tp0, tp1) and a tensor-parallel transformer (weights/tp0, tp1) --------------
# optimum-neuron's loader reads tp from the transformer's config, sets NEURON_RT_NUM_CORES to it and loads every
# module on its own (data_parallel_mode "none"); both are given the export's size and sequence length.
FLUX_CASES = [
    Case(
        "flux-tp2",
        "flux",
        "flux",
        height=64,
        width=64,
        extra=("--tensor-parallel-size", "2"),
        pipeline="NeuronFluxPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 3, "height": 64, "width": 64, "max_sequence_length": 16},
    ),
    # a LoRA (transformer and CLIP layers) fused into the written weights; the reference fuses it as diffusers does
    Case(
        "flux-tp2-lora",
        "flux",
        "flux",
        height=64,
        width=64,
        extra=("--tensor-parallel-size", "2"),
        loras=(("flux-style", "style", 0.8),),
        pipeline="NeuronFluxPipeline",
        call={"prompt": PROMPT, "num_inference_steps": 3, "height": 64, "width": 64, "max_sequence_length": 16},
    ),
]


@pytest.fixture(scope="module")
def loaded_flux(sources: Sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("loader-flux")
    exports = {case.name: export_ours(case, sources, root / case.name, backend="cpu") for case in FLUX_CASES}
    requests = [generate_request(case, sources, exports[case.name], {}) for case in FLUX_CASES]
    requests.append(planted_request(FLUX_CASES[0], sources, exports[FLUX_CASES[0].name], root))
    results = venv.generate(requests)["results"]
    return {
        result["name"]: {**result, "manifest": manifest(Path(request["export_dir"]))}
        for result, request in zip(results, requests, strict=True)
    }


@pytest.mark.parametrize("case", FLUX_CASES, ids=[case.name for case in FLUX_CASES])
def test_optimum_neuron_loads_our_flux_export_and_matches_diffusers(case: Case, loaded_flux):
    result = loaded_flux[case.name]
    assert result["ok"], result.get("error")
    assert result["shape_errors"] == []
    assert result["optimum_shape"] == result["reference_shape"]
    assert result["max_abs_diff"] <= MAX_PIXEL_DIFF, result
    assert result["data_parallel_mode"] == result["manifest"]["pipeline"]["data_parallel_mode"] == "none"


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_optimum_neurons_loader_computes_with_the_shards_it_reads(family: str, loaded_pixart, loaded_flux):
    """The planted copy (one tensor of a rank-0 shard negated) loads in optimum-neuron and generates something
    else than diffusers, where the untouched export equals it."""
    results = loaded_pixart if family == "pixart" else loaded_flux
    cases = PIXART_CASES if family == "pixart" else FLUX_CASES
    untouched, planted = results[cases[0].name], results[cases[0].name + PLANTED]
    assert planted["ok"], planted.get("error")
    assert untouched["max_abs_diff"] <= MAX_PIXEL_DIFF
    assert planted["max_abs_diff"] > PLANTED_MIN_DIFF, planted["max_abs_diff"]
