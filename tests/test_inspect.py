"""`neuron-export inspect`: the manifest as a readable summary, or as one JSON object; clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import export_tiny as export


@pytest.fixture(scope="module")
def sd_export(tiny_model, tmp_path_factory) -> Path:
    return export(tiny_model("sd"), tmp_path_factory.mktemp("inspect") / "sd", "sd")


@pytest.fixture(scope="module")
def sdxl_export(tiny_model, tmp_path_factory) -> Path:
    return export(tiny_model("sdxl"), tmp_path_factory.mktemp("inspect") / "sdxl", "sd-xl")


def test_summary_names_every_component_with_its_shapes_and_dtypes(sd_export, cli):
    code, out, err = cli("inspect", sd_export)
    assert code == 0, err
    manifest = json.loads((sd_export / "manifest.json").read_text())
    for name, record in manifest["components"].items():
        assert name in out and record["model_type"] in out
        for tensor in record["inputs"]:
            assert f"{tensor['name']} {tuple(tensor['shape'])} {tensor['dtype']}" in out
    # the tiny SD pipeline at its default 64x64: latents are 8x8
    assert "sample (1, 4, 8, 8) float32" in out and "input_ids (1, 77) int64" in out
    assert "latent_sample (1, 4, 8, 8) float32" in out and "sample (1, 3, 64, 64) float32" in out


def test_summary_shows_pipeline_source_flags_versions_sizes_validation_and_times(sd_export, cli):
    _, out, _ = cli("inspect", sd_export)
    manifest = json.loads((sd_export / "manifest.json").read_text())
    assert "NeuronStableDiffusionPipeline" in out and "StableDiffusionPipeline" in out
    assert "64x64 pixels (height x width), batch 1" in out and "data-parallel mode unet" in out
    assert manifest["source"]["model_id"] in out
    assert "--model-type=unet-inference" in out and "--auto-cast matmult" in out  # compiler flags
    assert (
        f"torch {manifest['environment']['torch']}" in out
        and f"diffusers {manifest['environment']['diffusers']}" in out
    )
    assert "passed (max diff" in out  # validation
    assert "peak RSS" in out and "KiB" in out and "MiB" in out  # sizes, RSS
    assert "backend cpu" in out and "torchscript-cpu" in out


def test_sdxl_summary_includes_the_second_text_encoder_and_added_conditioning(sdxl_export, cli):
    code, out, _ = cli("inspect", sdxl_export)
    assert code == 0
    assert "text_encoder_2" in out and "NeuronStableDiffusionXLPipeline" in out
    assert "text_embeds (1, 32) float32" in out and "time_ids (1, 6) float32" in out


def test_json_is_the_manifest_as_one_object(sd_export, cli):
    code, out, _ = cli("inspect", sd_export, "--json")
    assert code == 0
    assert json.loads(out) == json.loads((sd_export / "manifest.json").read_text())


def test_summary_data_has_totals(sd_export):
    from neuron_export.deploy.inspection import summary
    from neuron_export.manifest import read_manifest

    manifest = read_manifest(sd_export)
    info = summary(manifest, sd_export)
    assert [c["name"] for c in info["components"]] == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    assert info["totals"]["artifact_bytes"] == sum(
        (sd_export / c / "model.neuron").stat().st_size for c in ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    )
    assert info["totals"]["files"] == sum(1 for p in sd_export.rglob("*") if p.is_file())


@pytest.mark.parametrize("problem", ["missing-dir", "no-manifest", "truncated", "wrong-schema", "a-file"])
def test_bad_export_dirs_give_one_sentence_and_exit_2(sd_export, tmp_path, cli, problem):
    target = tmp_path / "export"
    if problem == "no-manifest":
        target.mkdir()
    elif problem == "truncated":
        target.mkdir()
        (target / "manifest.json").write_text((sd_export / "manifest.json").read_text()[:500])
    elif problem == "wrong-schema":
        target.mkdir()
        data = json.loads((sd_export / "manifest.json").read_text())
        del data["pipeline"]
        (target / "manifest.json").write_text(json.dumps(data))
    elif problem == "a-file":
        target.write_text("x")
    for extra in ([], ["--json"]):
        code, out, err = cli("inspect", target, *extra)
        assert code == 2
        text = out if extra else err
        assert "Traceback" not in text and len(text.strip().splitlines()) == 1
        if extra:
            assert json.loads(out)["ok"] is False
        else:
            assert str(target) in err
            if problem == "wrong-schema":
                assert "(pipeline: Field required)" in err


def test_shapes_stay_whole_when_validation_was_measured_earlier(tiny_model, tmp_path, cli):
    """A second export takes its components from the cache; the longer validation text must not wrap the shapes."""
    export(tiny_model("sd"), tmp_path / "first", "sd")
    second = export(tiny_model("sd"), tmp_path / "second", "sd")
    code, out, err = cli("inspect", second)
    assert code == 0, err
    assert "earlier" in out  # the cached components' validation was reused
    assert "encoder_hidden_states (1, 77, 32) float32" in out
