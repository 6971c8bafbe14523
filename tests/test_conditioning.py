"""ControlNet, IP-Adapter and InstructPix2Pix exports: bad input refused in one sentence before anything is built,
optimum-cli's spellings, cache keys, and `generate` through our own runtime against diffusers' eager pipelines.
(optimum-neuron's own pipelines loading these exports: tests/conformance.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from neuron_export.testing.adapters import IP_ADAPTER_SUBFOLDER, IP_ADAPTER_WEIGHT_NAME


def ip_adapter_args(tiny_model, scale: float = 0.6) -> list:
    return [
        "--ip-adapter",
        tiny_model("sd-ip-adapter"),
        "--ip-adapter-subfolder",
        IP_ADAPTER_SUBFOLDER,
        "--ip-adapter-weight-name",
        IP_ADAPTER_WEIGHT_NAME,
        "--ip-adapter-scale",
        scale,
    ]


def controlnet_with(tiny_model, tmp_path: Path, **changes) -> Path:
    """The tiny SD ControlNet with some config values changed (its weights untouched: only configs are read)."""
    folder = tmp_path / "changed-controlnet"
    shutil.copytree(tiny_model("sd-controlnet"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


BAD_INPUT = {
    "an SDXL ControlNet on SD": (
        lambda m, t: ["-m", m("sd"), "--controlnet", m("sdxl-controlnet")],
        ["--controlnet", "SDXL ControlNet", "SD 1.x/2.x"],
    ),
    "another cross_attention_dim": (
        lambda m, t: ["-m", m("sd"), "--controlnet", controlnet_with(m, t, cross_attention_dim=64)],
        ["cross_attention_dim is 64", "UNet's is 32"],
    ),
    "another block_out_channels": (
        lambda m, t: ["-m", m("sd"), "--controlnet", controlnet_with(m, t, block_out_channels=[32, 32])],
        ["block_out_channels is [32, 32]", "UNet's is [32, 64]"],
    ),
    "no IP-Adapter weight name": (
        lambda m, t: ["-m", m("sd"), "--ip-adapter", m("sd-ip-adapter")],
        ["ip_adapter_weight_name", "--ip-adapter-weight-name"],
    ),
    "IP-Adapter scale out of range": (
        lambda m, t: ["-m", m("sd"), *ip_adapter_args(m, scale=1.5)],
        ["ip_adapter_scale = 1.5 is out of range", "from 0", "to 1"],
    ),
    "a missing IP-Adapter file": (
        lambda m, t: [
            "-m",
            m("sd"),
            "--ip-adapter",
            m("sd-ip-adapter"),
            "--ip-adapter-weight-name",
            "nope.safetensors",
        ],
        ["--ip-adapter-weight-name nope.safetensors: no such file"],
    ),
    "a pix2pix model as text-to-image": (
        lambda m, t: ["-m", m("sd-pix2pix")],
        ["InstructPix2Pix model", "--task instruct-pix2pix"],
    ),
    "an IP-Adapter on SDXL": (
        lambda m, t: ["--family", "sd-xl", "-m", m("sdxl"), *ip_adapter_args(m)],
        ["--ip-adapter is not available for `neuron-export sd-xl`", "only `neuron-export sd` takes it"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT), ids=sorted(BAD_INPUT))
def test_bad_add_on_input_is_one_sentence_and_writes_nothing(cli, tiny_model, tmp_path, case):
    make_args, words = BAD_INPUT[case]
    out = tmp_path / "out"
    args = [str(arg) for arg in make_args(tiny_model, tmp_path)]
    family = args[1] if args[0] == "--family" else "sd"
    result = cli(family, *args[2 if args[0] == "--family" else 0 :], "--backend", "cpu", "-o", out)
    assert result.exit_code == 2, result
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert all(word in message for word in words), message
    assert not out.exists()


def plan_json(cli, *args) -> dict:
    result = cli("plan", "sd", *args, "--backend", "cpu", "--json")
    assert result.exit_code == 0, result
    return {job["component"]: job["cache_key"] for job in json.loads(result.stdout)["components"]}


def test_optimum_cli_list_spellings_plan_the_same_export(cli, tiny_model):
    controlnets = [tiny_model("sd-controlnet"), tiny_model("sd-controlnet")]
    ours = plan_json(
        cli, "-m", tiny_model("sd"), "--controlnet", controlnets[0], "--controlnet", controlnets[1], "--batch-size", "1"
    )
    theirs = plan_json(cli, "-m", tiny_model("sd"), "--controlnet_ids", *controlnets, "--batch_size", "1")
    assert ours == theirs and {"controlnet_0", "controlnet_1"} <= set(ours)
    ip = plan_json(cli, "-m", tiny_model("sd"), *ip_adapter_args(tiny_model))
    ip_theirs = plan_json(
        cli,
        "-m",
        tiny_model("sd"),
        "--ip_adapter_ids",
        tiny_model("sd-ip-adapter"),
        "--ip_adapter_subfolders",
        IP_ADAPTER_SUBFOLDER,
        "--ip_adapter_weight_names",
        IP_ADAPTER_WEIGHT_NAME,
        "--ip_adapter_scales",
        "0.6",
    )
    assert ip == ip_theirs and "image_encoder" in ip


def test_add_ons_change_only_the_components_they_touch(cli, tiny_model):
    plain = plan_json(cli, "-m", tiny_model("sd"))
    half = plan_json(cli, "-m", tiny_model("sd"), *ip_adapter_args(tiny_model, scale=0.5))
    full = plan_json(cli, "-m", tiny_model("sd"), *ip_adapter_args(tiny_model, scale=1.0))
    controlled = plan_json(cli, "-m", tiny_model("sd"), "--controlnet", tiny_model("sd-controlnet"))
    # The IP-Adapter's layers and scale are traced into the UNet; the ControlNet's residuals are UNet inputs.
    assert {name for name in plain if plain[name] != half[name]} == {"unet"}
    assert {name for name in half if half[name] != full[name]} == {"unet"}
    assert {name for name in plain if plain[name] != controlled[name]} == {"unet"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    paths = {}
    for seed, name in enumerate(("control-a", "control-b", "photo")):
        pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{name}.png")
        paths[name] = root / f"{name}.png"
    return paths


def _reference(kind: str, tiny_model, pipeline: str):
    import diffusers

    extra = {}
    if kind == "multi-controlnet":
        extra["controlnet"] = [
            diffusers.ControlNetModel.from_pretrained(tiny_model(name)) for name in ("sd-controlnet", "sd-controlnet-b")
        ]
    reference = getattr(diffusers, pipeline).from_pretrained(
        tiny_model("sd-pix2pix" if kind == "pix2pix" else "sd"), **extra
    )
    if kind == "ip-adapter":
        reference.load_ip_adapter(
            str(tiny_model("sd-ip-adapter")), subfolder=IP_ADAPTER_SUBFOLDER, weight_name=IP_ADAPTER_WEIGHT_NAME
        )
        reference.set_ip_adapter_scale(0.6)
    reference.set_progress_bar_config(disable=True)
    return reference


def export_by_api(m, out: Path) -> None:  # the Python API, a list of ControlNets
    import neuron_export

    neuron_export.export(
        "sd",
        model=str(m("sd")),
        controlnet=[str(m("sd-controlnet")), str(m("sd-controlnet-b"))],
        backend="cpu",
        disable_validation=True,
        output=str(out),
    )


def export_by_yaml(m, out: Path) -> None:  # a YAML config, as configs/ holds them
    import neuron_export

    config = out.parent / "pix2pix.yaml"
    config.write_text(
        f"family: sd\nmodel: {m('sd-pix2pix')}\ntask: instruct-pix2pix\ndynamic_batch_size: true\n"
        "backend: cpu\ndisable_validation: true\n"
    )
    neuron_export.export(str(config), overrides=[f"output={out}"])


def export_by_cli(m, out: Path) -> None:  # the command line
    from helpers import run_cli

    result = run_cli("sd", "-m", m("sd"), *ip_adapter_args(m), "--backend", "cpu", "--disable-validation", "-o", out)
    assert result.exit_code == 0, result


GENERATE = {  # how it is exported, generate options (image names), the diffusers call's image arguments
    "multi-controlnet": (
        export_by_api,
        {"control_images": ["control-a", "control-b"], "controlnet_scale": [1.0, 0.5]},
        {"image": ["control-a", "control-b"], "controlnet_conditioning_scale": [1.0, 0.5]},
    ),
    "pix2pix": (
        export_by_yaml,
        {"image": "photo", "image_guidance_scale": 1.3},
        {"image": "photo", "image_guidance_scale": 1.3},
    ),
    "ip-adapter": (export_by_cli, {"ip_adapter_image": "photo"}, {"ip_adapter_image": "photo"}),
}


@pytest.fixture(scope="module")
def tiny_with_second_controlnet(tiny_model, tmp_path_factory):
    """tiny_model, plus "sd-controlnet-b": the same ControlNet shape with other random weights."""
    from neuron_export.testing.examples import build_example

    second = build_example("sd-controlnet", tmp_path_factory.mktemp("controlnet-b"), seed=1)
    return lambda kind: second if kind == "sd-controlnet-b" else tiny_model(kind)


@pytest.mark.parametrize("kind", sorted(GENERATE))
def test_generate_runs_the_export_like_diffusers_eager(tiny_with_second_controlnet, images, tmp_path, kind):
    """Exported from the Python API, a YAML config and the command line. Our runtime: ControlNets in --controlnet order with their scales, InstructPix2Pix's three-way guidance batch
    through a batch-1 UNet, and the IP-Adapter's image encoder and UNet image embeds."""
    import torch
    from PIL import Image

    from neuron_export.runtime.generation import generate_images

    export, ours_kwargs, their_kwargs = GENERATE[kind]
    m = tiny_with_second_controlnet
    export(m, tmp_path / "export")

    def image(name):
        return [images[n] for n in name] if isinstance(name, list) else images[name]

    ours = generate_images(
        tmp_path / "export",
        "a red fox",
        steps=2,
        seed=0,
        output_type="np",
        **{
            key: image(value) if "image" in key and key != "image_guidance_scale" else value
            for key, value in ours_kwargs.items()
        },
    )
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    reference = _reference(kind, m, manifest["pipeline"]["diffusers_pipeline"])

    def opened(name):
        if isinstance(name, list):
            return [opened(n) for n in name]
        with Image.open(images[name]) as picture:
            return picture.convert("RGB")

    with torch.no_grad():
        theirs = reference(
            "a red fox",
            num_inference_steps=2,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="np",
            **{
                key: opened(value) if "image" in key and key != "image_guidance_scale" else value
                for key, value in their_kwargs.items()
            },
        ).images
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-4
    if kind == "multi-controlnet":  # refused before anything loads
        from neuron_export import ExportError

        for wrong, words in (
            ({"control_images": [images["control-a"]]}, "--control-image was given 1 time(s)"),
            ({"control_images": [images["control-a"]] * 2, "controlnet_scale": 2.5}, "out of range"),
        ):
            with pytest.raises(ExportError, match=words.replace("(", r"\(").replace(")", r"\)")):
                generate_images(tmp_path / "export", "a red fox", **wrong)


def test_a_hub_controlnet_is_fetched_once_with_its_weights_then_checked_against_the_unet(
    monkeypatch, cli, tiny_model, tmp_path
):
    import huggingface_hub

    snapshots = {}
    for repo, example in (("org/sdxl-cn", "sdxl-controlnet"), ("org/sd-cn", "sd-controlnet")):
        snapshots[repo] = tmp_path / repo.replace("/", "--") / ("c" * 40)
        shutil.copytree(tiny_model(example), snapshots[repo])
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs["revision"], sorted(kwargs["allow_patterns"])))
        return str(snapshots[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    refused = cli("plan", "sd", "-m", tiny_model("sd"), "--controlnet", "org/sdxl-cn", "--backend", "cpu")
    assert refused.exit_code == 2 and "SDXL ControlNet" in refused.stderr, refused
    # one download per source, configs and weights together (planning/sources.py), before any fact is read
    assert [(repo, revision) for repo, revision, _ in calls] == [("org/sdxl-cn", None)]
    assert {"config.json", "controlnet/config.json", "diffusion_pytorch_model.safetensors"} <= set(calls[0][2])
    calls.clear()
    planned = cli("plan", "sd", "-m", tiny_model("sd"), "--controlnet", "org/sd-cn", "--backend", "cpu")
    assert planned.exit_code == 0, planned
    assert [(repo, revision) for repo, revision, _ in calls] == [("org/sd-cn", None)]
    assert "controlnet_0" in planned.stdout
