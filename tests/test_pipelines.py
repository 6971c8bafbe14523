"""One pipelines table: the planner, the runtime and the model card ask it, and the cards' `generate` lines run."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

import neuron_export
from neuron_export.pipelines import FLUX_KONTEXT, PIPELINES

PACKAGE = Path(neuron_export.__file__).parent
PIPELINE_CLASS = re.compile(r"(Neuron)?(StableDiffusion|LatentConsistency|PixArt|Flux)\w*Pipeline")


def test_only_the_pipelines_table_names_pipeline_classes():
    """A pipeline class spelled as a string anywhere else is a second table (the examples import the classes)."""
    spelled = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and PIPELINE_CLASS.fullmatch(node.value):
                spelled.setdefault(path.relative_to(PACKAGE).as_posix(), set()).add(node.value)
    assert set(spelled) == {"pipelines.py"}, spelled
    rows = {kind.diffusers for kind in PIPELINES} | {kind.optimum for kind in PIPELINES}
    assert rows | {FLUX_KONTEXT} == spelled["pipelines.py"]  # Kontext: recognised, to be refused


def card_generate_line(export: Path, repo_id: str) -> str:
    from neuron_export.deploy.hub import model_card
    from neuron_export.manifest import read_manifest

    card = model_card(read_manifest(export), repo_id)
    lines = [line for line in card.splitlines() if line.startswith("neuron-export generate ")]
    assert len(lines) == 1, card
    return lines[0]


def export_controlnet(cli, m, out: Path) -> None:
    result = cli(
        "sd", "-m", m("sd"), "--controlnet", m("sd-controlnet"), "--backend", "cpu", "--disable-validation", "-o", out
    )
    assert result.exit_code == 0, result


def export_pix2pix(cli, m, out: Path) -> None:
    result = cli(
        "sd",
        "-m",
        m("sd-pix2pix"),
        "--task",
        "instruct-pix2pix",
        "--dynamic-batch-size",
        "--backend",
        "cpu",
        "--disable-validation",
        "-o",
        out,
    )
    assert result.exit_code == 0, result


@pytest.mark.parametrize(
    "export, images",
    [(export_controlnet, ["control.png"]), (export_pix2pix, ["input.png"])],
    ids=["controlnet", "pix2pix"],
)
def test_the_model_cards_generate_line_runs(cli, tiny_model, tmp_path, monkeypatch, export, images):
    """The card's line as a user copies it after `hf download`: the export in ./NAME, the images it names made here."""
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    export(cli, tiny_model, tmp_path / "tiny-neuron")
    line = card_generate_line(tmp_path / "tiny-neuron", "acme/tiny-neuron")
    words = shlex.split(line)
    for name in images:
        assert name in words, line  # the card names the image the pipeline needs
        pixels = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / name)

    result = cli(*words[1:])  # the card's line as printed
    assert result.exit_code == 0, result
    with Image.open(tmp_path / words[words.index("--output") + 1]) as image:
        assert image.size == (64, 64)
