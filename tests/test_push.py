"""`neuron-export push`: verified exports only, exactly the manifest's files, a model card that says how to load it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import export_tiny as export

from neuron_export.deploy import hub


@pytest.fixture(scope="module")
def sd_export(tiny_model, tmp_path_factory) -> Path:
    return export(tiny_model("sd"), tmp_path_factory.mktemp("push") / "sd", "sd")


@pytest.fixture
def copy(tmp_path):
    def make(source: Path) -> Path:
        return Path(shutil.copytree(source, tmp_path / source.name))

    return make


class Commit:
    def __init__(self, url: str) -> None:
        self.commit_url = url


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records each call and what upload_folder would send."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.uploaded: dict[str, bytes] = {}
        self.fail_at = fail_at

    def _record(self, name: str, kwargs: dict[str, Any]) -> None:
        self.calls.append((name, kwargs))
        if name == self.fail_at:
            raise RuntimeError("401 Client Error: Unauthorized for url\nmore detail")

    def create_repo(self, **kwargs: Any) -> str:
        self._record("create_repo", kwargs)
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_branch(self, **kwargs: Any) -> None:
        self._record("create_branch", kwargs)

    def upload_folder(self, **kwargs: Any) -> Commit:
        from huggingface_hub.utils import filter_repo_objects  # the filter upload_folder applies

        self._record("upload_folder", kwargs)
        root = Path(kwargs["folder_path"])
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        for rel in filter_repo_objects(
            files, allow_patterns=kwargs.get("allow_patterns"), ignore_patterns=kwargs.get("ignore_patterns")
        ):
            self.uploaded[rel] = (root / rel).read_bytes()
        return Commit("https://huggingface.co/commit/1")

    def upload_file(self, **kwargs: Any) -> Commit:
        self._record("upload_file", kwargs)
        self.uploaded[kwargs["path_in_repo"]] = kwargs["path_or_fileobj"]
        return Commit("https://huggingface.co/commit/2")


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_push_uploads_exactly_the_manifest_files_and_a_card(sd_export, copy):
    directory = copy(sd_export)
    (directory / "notes.txt").write_text("not part of the export\n")  # harmless for verify, but not ours to upload
    before = tree(directory)
    api = FakeHub()
    result = hub.push_export(directory, "acme/tiny-sd-neuron", private=True, api=api)

    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder", "upload_file"]
    create = api.calls[0][1]
    assert create == {"repo_id": "acme/tiny-sd-neuron", "repo_type": "model", "private": True, "exist_ok": True}
    manifest = json.loads((directory / "manifest.json").read_text())
    listed = {f["path"] for r in manifest["components"].values() for f in r["files"]} | {
        f["path"] for f in manifest["files"]
    }
    assert set(api.uploaded) == listed | {"manifest.json", "README.md"}
    assert all(api.uploaded[p] == before[p] for p in listed)
    assert api.calls[2][1]["path_in_repo"] == "README.md" and api.calls[2][1]["repo_id"] == "acme/tiny-sd-neuron"
    assert tree(directory) == before  # the export was not modified (no README.md written into it)
    assert result["files"] == sorted(listed | {"manifest.json"}) and result["private"] is True
    assert result["repo_url"] == "https://huggingface.co/acme/tiny-sd-neuron"


def test_card_names_shapes_flags_validation_and_loading_code(sd_export):
    api = FakeHub()
    hub.push_export(sd_export, "acme/tiny-sd-neuron", api=api)
    card = api.uploaded["README.md"].decode()
    assert card.startswith("---\ntags:\n") and "pipeline_tag: text-to-image" in card
    assert "base_model" not in card  # the source was a local directory, not a hub id
    assert "64x64 pixels" in card and "1 prompt(s) x 1 image(s) per prompt" in card
    assert "sample [1, 4, 8, 8] float32" in card and "input_ids [1, 77] int64" in card
    assert "latent_sample [1, 4, 8, 8] float32" in card
    assert "--auto-cast matmult --auto-cast-type bf16 --optlevel 2 --target inf2" in card
    assert "passed for every component" in card and "passed (max diff" in card
    assert "from optimum.neuron import NeuronStableDiffusionPipeline" in card
    assert 'NeuronStableDiffusionPipeline.from_pretrained("acme/tiny-sd-neuron", data_parallel_mode="unet")' in card
    assert (
        'neuron-export generate ./tiny-sd-neuron --prompt "a photo of an astronaut riding a horse on mars" --output image.png'
        in card
        and "neuron-export verify ./tiny-sd-neuron --instance" in card
    )
    assert "Not for NeuronCores" in card  # a --backend cpu export says so loudly


def test_revision_creates_the_branch_and_uploads_to_it(sd_export):
    api = FakeHub()
    hub.push_export(sd_export, "acme/tiny", revision="bf16-512", api=api)
    names = [name for name, _ in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder", "upload_file"]
    assert api.calls[1][1] == {"repo_id": "acme/tiny", "branch": "bf16-512", "repo_type": "model", "exist_ok": True}
    assert api.calls[2][1]["revision"] == "bf16-512" and api.calls[3][1]["revision"] == "bf16-512"
    assert 'revision="bf16-512"' in api.uploaded["README.md"].decode()


def test_corrupted_export_is_refused_before_any_upload(sd_export, copy, cli, monkeypatch):
    broken = copy(sd_export)
    artifact = broken / "vae_decoder" / "model.neuron"
    data = bytearray(artifact.read_bytes())
    data[100] ^= 0xFF
    artifact.write_bytes(bytes(data))
    api = FakeHub()
    monkeypatch.setattr(hub, "_default_api", lambda token: api)
    code, out, err = cli("push", broken, "--repo-id", "acme/tiny")
    assert code == 3
    assert "vae_decoder/model.neuron" in err and "refusing" in err and len(err.strip().splitlines()) == 1
    assert api.calls == []


def test_cli_push_uses_the_hub_api_and_reports(sd_export, cli, monkeypatch):
    seen: dict[str, Any] = {}
    api = FakeHub()

    def make(token: str | None) -> FakeHub:
        seen["token"] = token
        return api

    monkeypatch.setattr(hub, "_default_api", make)
    code, out, err = cli("push", sd_export, "--repo-id", "acme/tiny", "--private", "--token", "hf_test")
    assert code == 0, err
    assert seen["token"] == "hf_test" and api.calls[0][1]["private"] is True
    on_disk = sum(1 for f in sd_export.rglob("*") if f.is_file())  # the stack decides how many tokenizer files
    assert f"Pushed {on_disk} files and README.md to https://huggingface.co/acme/tiny" in out
    code, out, _ = cli("push", sd_export, "--repo-id", "acme/tiny", "--json")
    assert code == 0 and json.loads(out)["card"] == "README.md"


def test_default_api_is_the_real_huggingface_hub_client():
    from huggingface_hub import HfApi

    api = hub._default_api("hf_abc")
    assert isinstance(api, HfApi) and api.token == "hf_abc"


def test_real_client_offline_gives_one_sentence_and_exit_1(sd_export, cli):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest before huggingface_hub was imported
    code, _, err = cli("push", sd_export, "--repo-id", "acme/tiny", "--token", "hf_not_a_real_token")
    assert code == 1
    assert "failed at create_repo (OfflineModeIsEnabled" in err and len(err.strip().splitlines()) == 1


def test_hub_errors_become_one_sentence(sd_export, cli, monkeypatch):
    api = FakeHub(fail_at="upload_folder")
    monkeypatch.setattr(hub, "_default_api", lambda token: api)
    code, _, err = cli("push", sd_export, "--repo-id", "acme/tiny")
    assert code == 1 and "failed at upload_folder (RuntimeError: 401 Client Error" in err
    assert len(err.strip().splitlines()) == 1 and "more detail" not in err


@pytest.mark.parametrize("repo_id", ["tiny", "acme/", "/tiny", "acme/tiny/extra", "acme/ti ny", "acme/../x"])
def test_bad_repo_ids_are_user_errors(sd_export, cli, monkeypatch, repo_id):
    api = FakeHub()
    monkeypatch.setattr(hub, "_default_api", lambda token: api)
    code, _, err = cli("push", sd_export, "--repo-id", repo_id)
    assert code == 2 and "--repo-id" in err and api.calls == []


def test_card_for_a_hub_source_names_the_base_model(sd_export):
    from neuron_export.manifest import read_manifest

    manifest = read_manifest(sd_export)
    manifest.source.model_id = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    manifest.source.commit = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
    card = hub.model_card(manifest, "acme/sd15-neuron")
    assert "base_model: stable-diffusion-v1-5/stable-diffusion-v1-5" in card
    assert "commit `451f4fe16113bff5a5d2269ed5ad43b0592e9a14`" in card


def test_card_loading_code_follows_the_task_and_components(sd_export):
    from neuron_export.manifest import read_manifest

    manifest = read_manifest(sd_export)
    manifest.pipeline.task = "inpainting"
    manifest.pipeline.optimum_pipeline = "NeuronStableDiffusionInpaintPipeline"
    manifest.pipeline.data_parallel_mode = "all"
    card = hub.model_card(manifest, "acme/inpaint")
    assert "from PIL import Image" in card and "mask_image=mask" in card
    assert 'NeuronStableDiffusionInpaintPipeline.from_pretrained("acme/inpaint", data_parallel_mode="all")' in card
    assert "--image input.png --mask mask.png --output image.png" in card
    assert "pipeline_tag: image-to-image" in card and "cannot load a pipeline without `text_encoder`" not in card
    del manifest.components["text_encoder"]  # what an SDXL refiner export looks like
    assert "optimum-neuron 0.4.5 cannot load a pipeline without `text_encoder`" in hub.model_card(
        manifest, "acme/inpaint"
    )
