"""Call and config conformance: optimum-neuron 0.4.5's exporter and ours run on the same model with the same
options and the same recording torch_neuronx double; per component they must make the same calls, and every
config.json key optimum-neuron's loader reads must hold the value its own export writes there.

The differences we keep on purpose are the README's table ("Conformance"); INTENDED below is that table as
data, and each test asserts exactly those differences, no more and no fewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from conformance import calls, venv
from conformance.conftest import (
    Case,
    Sources,
    component_configs,
    export_ours,
    manifest,
    neuron_sdk_doubles,
    our_trace_calls,
)

CASES = [
    Case("sd", "sd", "sd"),
    Case("sd-image-to-image", "sd", "sd", task="image-to-image"),
    Case("sd-inpainting", "sd-inpaint", "sd", task="inpainting"),
    Case("sdxl", "sdxl", "sd-xl"),
    Case("sdxl-image-to-image", "sdxl", "sd-xl", task="image-to-image"),
    Case("sdxl-refiner", "sdxl-refiner", "sd-xl", task="image-to-image"),
    Case("lcm", "lcm", "lcm"),
    Case("lcm-sdxl", "sdxl", "sd-xl", unet="lcm-sdxl-unet"),
    Case("batch-2-2-images", "sd", "sd", batch_size=2, num_images_per_prompt=2),
    Case("non-square", "sdxl", "sd-xl", height=96, width=64),
    Case("dynamic-batch", "sd", "sd", dynamic_batch_size=True),
    Case("sd-one-lora", "sd", "sd", loras=(("sd-style", "style", 0.9),)),
    Case("sd-two-loras", "sd", "sd", loras=(("sd-style", "style", 0.8), ("sd-detail", "detail", -0.6))),
    Case("sd-multi-controlnet", "sd", "sd", controlnets=("sd-controlnet", "sd-controlnet@1")),
    Case("sdxl-controlnet", "sdxl", "sd-xl", controlnets=("sdxl-controlnet",)),
    Case("sd-instruct-pix2pix", "sd-pix2pix", "sd", task="instruct-pix2pix", dynamic_batch_size=True),
    Case("sd-ip-adapter", "sd", "sd", ip_adapter=True),
]
LCM_CASES = {"lcm", "lcm-sdxl"}


@pytest.fixture(scope="module")
def pairs(sources: Sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """{case: {"ours": export, "optimum": export, "our_calls", "optimum_calls"}} for every case."""
    root = tmp_path_factory.mktemp("calls")
    requests, pairs = [], {}
    for case in CASES:  # built before the doubles are importable: diffusers must not import against them
        case.our_args(sources)
    with neuron_sdk_doubles():
        for case in CASES:
            ours = export_ours(case, sources, root / case.name / "ours" / "export", backend="neuron")
            requests.append(case.optimum_request(sources, root / case.name / "optimum" / "export"))
            pairs[case.name] = {"ours": ours, "our_calls": our_trace_calls(ours)}
    for case, result in zip(CASES, venv.export(requests)["results"]):
        assert result["ok"], (case.name, result.get("error"))
        assert not result["orphan_after_trace"], case.name
        pairs[case.name].update(optimum=Path(result["output"]), optimum_calls=calls.by_component(result["calls"]))
    return pairs


def call_summary(call: dict[str, Any]) -> dict[str, Any]:
    """What a call decides about the artifact: no paths, ids or pids; flags as neuronx-cc's parser ends up with them
    (an option given twice keeps its last value: optimum passes a ControlNet --model-type twice)."""
    summary = calls.summary(call)
    summary.pop("compiler_flags")
    summary["compiler_options"] = sorted(dict(tuple(option) for option in call["compiler_options"]).items())
    summary["keywords"] = sorted(set(summary["keywords"]) - {"compiler_workdir"})  # where it works, not what
    return summary


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {
        key: (ours.get(key), theirs.get(key))
        for key in sorted(set(ours) | set(theirs))
        if ours.get(key) != theirs.get(key)
    }


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_component_is_compiled_with_the_calls_optimum_neuron_makes(case: Case, pairs: dict[str, dict[str, Any]]):
    pair = pairs[case.name]
    assert sorted(pair["our_calls"]) == sorted(pair["optimum_calls"])
    for component, theirs in pair["optimum_calls"].items():
        ours = pair["our_calls"][component]
        diff = differences(call_summary(ours), call_summary(theirs))
        assert diff == {}, (component, diff)


READ_BY = {  # one optimum-neuron pipeline run per family records which config.json keys its loader reads
    "sd": ("NeuronStableDiffusionPipeline", "sd", {}),
    "sdxl": ("NeuronStableDiffusionXLPipeline", "sdxl", {}),
    "lcm": ("NeuronLatentConsistencyModelPipeline", "lcm", {}),
    "controlnet": ("NeuronStableDiffusionControlNetPipeline", "sd-multi-controlnet", {"image": ["init", "init"]}),
    "sdxl-controlnet": ("NeuronStableDiffusionXLControlNetPipeline", "sdxl-controlnet", {"image": "init"}),
    "pix2pix": ("NeuronStableDiffusionInstructPix2PixPipeline", "sd-instruct-pix2pix", {"image": "init"}),
    "ip-adapter": ("NeuronStableDiffusionPipeline", "sd-ip-adapter", {"ip_adapter_image": "init"}),
}


def lcm_by_name(config: dict[str, Any]) -> bool:
    """How optimum-neuron 0.4.5 decides that a UNet is LCM (NeuronDiffusionPipelineBase.is_lcm)."""
    name = str(config.get("_name_or_path", "")).lower()
    return "lcm" in name or "latent-consistency" in name


@pytest.fixture(scope="module")
def keys_read(
    pairs: dict[str, dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, set[tuple[str, str]]]:
    """{component: {(block, key)}}: what optimum-neuron's loader and pipelines read, recorded while they load
    and run optimum's own exports, plus what its source reads (the runner's static list)."""
    image = str(venv.write_test_image(tmp_path_factory.mktemp("config-reads") / "init.png", 64, 64))
    requests = [
        {
            "export_dir": pairs[case]["optimum"],
            "pipeline": pipeline,
            "call": {
                "prompt": "a photo of a cat",
                "num_inference_steps": 2,
                **{key: [image] * len(value) if isinstance(value, list) else image for key, value in images.items()},
            },
        }
        for pipeline, case, images in READ_BY.values()
    ]
    results = venv.config(requests)["results"]
    read: dict[str, set[tuple[str, str]]] = {}
    for result in results:
        assert result["ok"], result.get("error")
        for component, blocks in result["components"].items():
            keys = read.setdefault(component, set())
            keys |= {("top", key) for key in blocks["top_level"]} | {("neuron", key) for key in blocks["neuron"]}
            if blocks["neuron_iterated"]:  # the loader walked the whole neuron block (static_* keys)
                keys |= {
                    ("neuron", key)
                    for key in result["files"][component]
                    and component_configs(Path(result["export_dir"]))[component]["neuron"]
                }
        for entry in result["static_reads"]:
            components = (
                read if entry["components"] == "all" else {c: read.setdefault(c, set()) for c in entry["components"]}
            )
            for keys in components.values():
                if "*" not in entry["key"] and "/" not in entry["key"]:
                    keys.add((entry["block"], entry["key"]))
    return read


# What the loader sees for a top-level key a config.json leaves out (transformers' PretrainedConfig defaults).
TOP_LEVEL_DEFAULTS = {"output_hidden_states": False}


def config_value(config: dict[str, Any], block: str, key: str) -> Any:
    if block == "top":
        return config.get(key, TOP_LEVEL_DEFAULTS.get(key, "<absent>"))
    return config.get("neuron", {}).get(key, "<absent>")


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_config_key_the_loader_reads_has_the_value_optimum_neuron_writes(
    case: Case, pairs: dict[str, dict[str, Any]], keys_read: dict[str, set[tuple[str, str]]]
):
    pair = pairs[case.name]
    ours, theirs = component_configs(pair["ours"]), component_configs(pair["optimum"])
    assert sorted(ours) == sorted(theirs)
    is_lcm = manifest(pair["ours"])["pipeline"]["is_lcm"]
    for component in theirs:
        diff = {
            f"{block}:{key}": (config_value(ours[component], block, key), config_value(theirs[component], block, key))
            for block, key in sorted(keys_read[component] - {("top", "neuron")})  # its keys are compared one by one
            if config_value(ours[component], block, key) != config_value(theirs[component], block, key)
        }
        if "top:_diffusers_version" in diff:
            # Each side writes the diffusers version it ran with; the pipelines only compare it with 0.9.0.
            assert (
                len({Version(str(version)) >= Version("0.9.0") for version in diff.pop("top:_diffusers_version")}) == 1
            )
        if component == "unet":
            # Intended: our UNet's name says LCM exactly when it is one; optimum's keeps the source path.
            diff.pop("top:_name_or_path", None)
            assert lcm_by_name(ours[component]) == is_lcm
        assert diff == {}, (component, diff)


def test_only_our_lcm_export_keeps_lcm_guidance_and_placement(pairs: dict[str, dict[str, Any]], sources: Sources):
    """Intended: optimum-neuron's own LCM export loses the UNet's LCM name (so it loads on one core per
    guidance half with the source's scheduler) and its UNet wrapper ignores timestep_cond, so its images drift
    from diffusers'; ours, exported from the same source, match."""
    lcm = next(case for case in CASES if case.name == "lcm")
    call = {"prompt": "a lighthouse on a cliff at dusk", "num_inference_steps": 2, "guidance_scale": 8.5}
    requests = [
        {
            "name": side,
            "export_dir": pairs["lcm"][side],
            "pipeline": "NeuronLatentConsistencyModelPipeline",
            "source_dir": sources.path(lcm),
            "kwargs": call,
        }
        for side in ("ours", "optimum")
    ]
    results = {result["name"]: result for result in venv.generate(requests)["results"]}
    assert all(result["ok"] for result in results.values()), results
    assert (results["ours"]["is_lcm"], results["ours"]["data_parallel_mode"]) == (True, "all")
    assert results["ours"]["max_abs_diff"] <= 1e-4
    assert (results["optimum"]["is_lcm"], results["optimum"]["data_parallel_mode"]) == (False, "unet")
    assert results["optimum"]["max_abs_diff"] > 1e-3


LORA_CASES = [case.name for case in CASES if case.loras]


@pytest.mark.parametrize("name", LORA_CASES)
def test_lora_fused_components_compute_what_optimum_neurons_compute(name: str, pairs: dict[str, dict[str, Any]]):
    """optimum-neuron fuses the same adapters at the same scales through its pipeline; the traced modules agree."""
    import torch

    pair = pairs[name]
    records = manifest(pair["ours"])["components"]
    generator = torch.Generator().manual_seed(11)
    for component in ("text_encoder", "unet"):
        inputs = [
            torch.randint(0, 100, tensor["shape"], generator=generator)
            if tensor["dtype"] == "int64"
            else torch.rand(tensor["shape"], generator=generator) * (999 if tensor["name"] == "timestep" else 1)
            for tensor in records[component]["inputs"]
        ]
        with torch.no_grad():
            ours = torch.jit.load(pair["ours"] / component / "model.neuron")(*inputs)
            theirs = torch.jit.load(pair["optimum"] / component / "model.neuron")(*inputs)
            plain = torch.jit.load(pairs["sd"]["ours"] / component / "model.neuron")(*inputs)
        first = [value[0] if isinstance(value, (tuple, list)) else value for value in (ours, theirs, plain)]
        assert (first[0] - first[1]).abs().max() < 1e-5, component
        assert (first[0] - first[2]).abs().max() > 1e-3, component  # the adapters did change it
