"""One role registry (neuron_export/roles/registry.py): the ControlNet prefix and the list of roles are written once, and a
role registered in one file -- here, this one -- is planned, built and loaded with no other module edited."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from neuron_export.roles.registry import UNET_LIKE, BuildCost, Role, register, unregister
from neuron_export.roles.spec import ComponentSpec, Shapes, TensorSpec

PACKAGE = Path(__file__).resolve().parent.parent / "neuron_export"
# The component-name prefix ("controlnet_" then a number, N or a brace), not identifiers like controlnet_scale.
CONTROLNET_PREFIX = re.compile(r"controlnet_(?![a-z])")


def modules_where(found: Any) -> list[str]:
    """The package's modules (relative paths) for which found(source text, syntax tree) is true."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if found(text, ast.parse(text)):
            hits.append(path.relative_to(PACKAGE.parent).as_posix())
    return hits


def lists_roles(tree: ast.AST) -> bool:
    """A literal tuple, list or set (or the keys of a dict) naming both "unet" and "vae_decoder": a role list."""
    for node in ast.walk(tree):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and items:
            strings = {item.value for item in items if isinstance(item, ast.Constant)}
            if {"unet", "vae_decoder"} <= strings:
                return True
    return False


def test_the_controlnet_prefix_is_written_in_one_module():
    assert modules_where(lambda text, tree: CONTROLNET_PREFIX.search(text)) == ["neuron_export/roles/registry.py"]


def test_the_roles_are_listed_in_one_module():
    assert modules_where(lambda text, tree: lists_roles(tree)) == []  # roles/registry.py registers them one by one
    assert modules_where(lambda text, tree: "register(Role(" in text) == ["neuron_export/roles/registry.py"]


# --- A throwaway role: the VAE's post-quantisation convolution (latents in, latents out), built from vae/ ---
CALLS: list[str] = []  # what the runtime asked this role's adapter for


def describe(name: str, facts: Any, shapes: Shapes) -> ComponentSpec:
    channels, scale = int(facts.vae.get("latent_channels", 4)), facts.vae_scale_factor
    height, width = shapes.height // scale, shapes.width // scale
    return ComponentSpec(
        name=name,
        model_type="vae-post-quant",
        task="semantic-segmentation",
        inputs=(TensorSpec("latent_sample", (shapes.image_batch, channels, height, width)),),
        outputs=("latents",),
        static_shapes={"batch_size": shapes.image_batch, "num_channels": channels, "height": height, "width": width},
    )


def load(folder: Path, spec: ComponentSpec) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(folder).post_quant_conv.eval()


def wrap(model: Any, spec: ComponentSpec) -> Any:
    return model


def reference(model: Any, spec: ComponentSpec, inputs: list[Any]) -> list[Any]:
    return [model(*inputs)]


def adapter(parts: list[Any]) -> Any:
    (part,) = parts
    CALLS.append(part.name)
    return part.runner


POST_QUANT = Role(
    "vae_post_quant",
    __name__,
    "vae",
    "vae_post_quant",
    f"{__name__}:adapter",
    {"cpu": BuildCost(1.10, 3600, 1.3e-4), "neuron": BuildCost(8.0, 24000, 6.6e-4)},
    UNET_LIKE,
    tensor_prefixes=("post_quant_conv.",),
)


@pytest.fixture
def post_quant_role():
    register(POST_QUANT)
    CALLS.clear()
    try:
        yield POST_QUANT
    finally:
        unregister(POST_QUANT.name)


def test_a_role_registered_in_one_file_is_planned_built_and_loaded(post_quant_role, tiny_model, cli, tmp_path):
    import torch

    from neuron_export.runtime.loading import CpuArtifactLoader, load_components, load_pipeline
    from neuron_export.runtime.reading import read_export

    model, out = tiny_model("sd"), tmp_path / "out"
    planned = cli("plan", "sd", "-m", model, "--backend", "cpu", "--json")
    assert planned.exit_code == 0, planned
    jobs = {job["component"]: job for job in json.loads(planned.stdout)["components"]}
    assert jobs["vae_post_quant"]["inputs"][0]["name"] == "latent_sample"

    built = cli("sd", "-m", model, "--backend", "cpu", "-o", out)
    assert built.exit_code == 0, built
    manifest = read_export(out)
    record = manifest.components["vae_post_quant"]
    assert record.validation.status == "passed"
    assert (out / "vae_post_quant" / "model.neuron").is_file()
    # the plan counted its own tensors (the prefix) in vae/'s shared weight file, not the whole VAE's
    assert record.parameter_count == jobs["vae_post_quant"]["parameters"] < jobs["vae_decoder"]["parameters"]

    load_pipeline(out)  # the runtime loads every role's artifacts, this one included
    assert CALLS == ["vae_post_quant"]
    runner = load_components(out, manifest, CpuArtifactLoader())["vae_post_quant"]
    latents = torch.randn(record.inputs[0].shape)
    assert runner(latents).shape == latents.shape
