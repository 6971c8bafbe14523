"""Model sources: hub ids go through huggingface_hub with only the needed files; local dirs as they are."""

from __future__ import annotations

import shutil

import pytest

from neuron_export.errors import ExportError
from neuron_export.planning.source import check_safetensors, read_facts
from neuron_export.planning.sources import resolve_source


def test_hub_id_downloads_only_what_the_components_need(monkeypatch, tiny_model, tmp_path):
    snapshot = tmp_path / "models--org--sdxl" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model("sdxl"), snapshot)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    source = resolve_source("org/sdxl", "v1", None, ("unet", "vae_decoder"), token="secret", offline=False)
    ((repo_id, kwargs),) = calls
    assert repo_id == "org/sdxl" and kwargs["revision"] == "v1" and kwargs["token"] == "secret"
    patterns = kwargs["allow_patterns"]
    assert "unet/diffusion_pytorch_model.safetensors" in patterns and "vae/config.json" in patterns
    assert not [p for p in patterns if p.startswith(("text_encoder/", "text_encoder_2/"))]
    assert not [p for p in patterns if p.endswith(".bin") or "fp16" in p]
    assert source.commit == "a" * 40 and source.path == snapshot


def test_offline_mode_is_passed_to_the_hub_client(monkeypatch, tiny_model):
    seen = {}

    def fake_snapshot_download(repo_id, **kwargs):
        seen.update(kwargs)
        return str(tiny_model("sd"))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolve_source("org/sd", None, None, ("unet",))
    assert seen["local_files_only"] is True


def test_replacement_unet_from_a_directory(tiny_model):
    source = resolve_source(str(tiny_model("sdxl")), None, str(tiny_model("lcm-sdxl-unet")), ("unet",))
    facts = read_facts(source)
    assert facts.is_lcm and facts.architecture == "sdxl"
    assert source.folder("unet") == tiny_model("lcm-sdxl-unet")


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("sd", ("sd", False, 4)),
        ("sd-inpaint", ("sd", False, 9)),
        ("lcm", ("sd", True, 4)),
        ("sdxl", ("sdxl", False, 4)),
        ("sdxl-refiner", ("sdxl-refiner", False, 4)),
    ],
)
def test_models_are_recognised_from_their_configs(tiny_model, kind, expected):
    facts = read_facts(resolve_source(str(tiny_model(kind)), None, None, ("unet",)))
    assert (facts.architecture, facts.is_lcm, facts.unet_in_channels) == expected
    assert facts.default_side == 64


def test_an_older_checkpoint_with_only_bin_weights_exports(tiny_model, tmp_path, cli):
    import torch
    from safetensors.torch import load_file

    model = tmp_path / "bin"
    shutil.copytree(tiny_model("sd"), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), weights.with_suffix(".bin"))
    weights.unlink()
    result = cli("sd", "-m", model, "--backend", "cpu", "-o", tmp_path / "out", "--components", "unet", "--json")
    assert result.exit_code == 0, result
    import json

    record = json.loads((tmp_path / "out" / "manifest.json").read_text())["components"]["unet"]
    assert [f["path"] for f in record["source_files"]] == ["unet/diffusion_pytorch_model.bin"]
    assert record["validation"]["status"] == "passed"


def test_hub_fetches_bin_weights_only_where_there_are_no_safetensors(monkeypatch, tiny_model, tmp_path):
    snapshot = tmp_path / "snapshots" / ("b" * 40)
    shutil.copytree(tiny_model("sd"), snapshot)
    (snapshot / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs["allow_patterns"])
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolve_source("org/old-sd", None, None, ("unet", "vae_decoder"))
    assert len(calls) == 2
    assert calls[1] == [p for p in calls[1] if p.startswith("unet/")] and "unet/diffusion_pytorch_model.bin" in calls[1]


def test_garbage_is_not_a_safetensors_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\xff" * 100)
    with pytest.raises(ExportError, match="not a valid safetensors"):
        check_safetensors(path)
