"""`plan`, `inspect` and the cache on the diffusion transformers, as the README uses them: the tiny PixArt-Σ and Flux
examples exported with `neuron-export pixart` / `neuron-export flux --tensor-parallel-size 2`, then looked at.

What a cache key holds (tests/test_cache_keys.py) is checked here on the plans alone (no build): only the sharded
roles' keys move with --tensor-parallel-size; --sequence-length moves the T5's and the transformer's, never a VAE's
or CLIP's; new transformer weights move the transformer's key alone. The exports then show each of these facts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

FLUX = ["text_encoder", "vae_encoder", "vae_decoder", "text_encoder_2", "transformer"]
FLUX_SHARDED = ["text_encoder_2", "transformer"]
PIXART = ["text_encoder", "vae_encoder", "vae_decoder", "transformer"]
SIZE = ["--height", "64", "--width", "64"]  # Flux's default is 1024 px


def shard(component: str, rank: int) -> str:
    return f"{component}/weights/tp{rank}_sharded_checkpoint.safetensors"


def plan(cli, family: str, model: Path, *extra: object) -> dict:
    result = cli("plan", family, "-m", model, "--backend", "cpu", *SIZE, *extra, "--json")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def keys(summary: dict) -> dict[str, str]:
    return {c["component"]: c["cache_key"] for c in summary["components"]}


def moved(before: dict[str, str], after: dict[str, str]) -> set[str]:
    """The components whose cache key changed."""
    assert before.keys() == after.keys()
    return {name for name in before if before[name] != after[name]}


# --- plan: the jobs name the sharded roles and their tp; the keys move only where the bytes would ---------------


def test_a_flux_plan_names_the_sharded_roles_and_their_tp(cli, tiny_model, tmp_path):
    summary = plan(cli, "flux", tiny_model("flux"), "--tensor-parallel-size", "2", "-o", tmp_path / "out")
    jobs = {c["component"]: c for c in summary["components"]}
    assert sorted(jobs) == sorted(FLUX)
    assert {name: (job["sharded"], job["tensor_parallel_size"]) for name, job in jobs.items()} == {
        "text_encoder": (False, 1),  # CLIP: a plain trace
        "vae_encoder": (False, 1),
        "vae_decoder": (False, 1),
        "text_encoder_2": (True, 2),
        "transformer": (True, 2),
    }
    assert all(job["estimated_peak_bytes"] > 0 and job["estimated_seconds"] > 0 for job in jobs.values())
    assert {b["component"] for b in summary["builds"]} == set(FLUX)  # one CI build per key, nothing cached yet
    shown = cli("plan", "flux", "-m", tiny_model("flux"), "--backend", "cpu", *SIZE, "--tensor-parallel-size", "2")
    assert shown.exit_code == 0, shown
    assert shown.stdout.count("(sharded, tp 2)") == 2, shown.stdout


def test_a_pixart_plan_names_its_t5_as_sharded_at_tp_1(cli, tiny_model, tmp_path):
    summary = plan(cli, "pixart", tiny_model("pixart-sigma"), "-o", tmp_path / "out")
    sharded = {c["component"]: c["tensor_parallel_size"] for c in summary["components"] if c["sharded"]}
    assert sharded == {"text_encoder": 1}  # the T5 through ModelBuilder at tp 1; the transformer is a plain trace
    shown = cli("plan", "pixart", "-m", tiny_model("pixart-sigma"), "--backend", "cpu", *SIZE)
    assert shown.exit_code == 0 and shown.stdout.count("(sharded, tp 1)") == 1, shown


def test_tensor_parallel_size_moves_only_the_sharded_roles_keys(cli, tiny_model, tmp_path):
    model = tiny_model("flux")
    two = keys(plan(cli, "flux", model, "--tensor-parallel-size", "2", "-o", tmp_path / "a"))
    one = keys(plan(cli, "flux", model, "-o", tmp_path / "b"))
    assert moved(one, two) == set(FLUX_SHARDED)


@pytest.mark.parametrize(
    ("family", "example", "encoders"),
    [("flux", "flux", {"text_encoder_2", "transformer"}), ("pixart", "pixart-sigma", {"text_encoder", "transformer"})],
)
def test_sequence_length_moves_the_t5_and_transformer_keys_not_the_vaes(
    cli, tiny_model, tmp_path, family, example, encoders
):
    model = tiny_model(example)
    default = keys(plan(cli, family, model, "-o", tmp_path / "a"))  # the tokenizer's model_max_length: 16
    longer = keys(plan(cli, family, model, "--sequence-length", "12", "-o", tmp_path / "b"))
    assert moved(default, longer) == encoders
    same = keys(plan(cli, family, model, "--sequence-length", "16", "-o", tmp_path / "c"))
    assert moved(default, same) == set()  # stating the default is the default


@pytest.mark.parametrize(("family", "example"), [("flux", "flux"), ("pixart", "pixart-sigma")])
def test_new_transformer_weights_move_only_the_transformers_key(cli, tiny_model, tmp_path, family, example):
    from neuron_export.testing.examples import build_example

    model = Path(shutil.copytree(tiny_model(example), tmp_path / "model"))
    before = keys(plan(cli, family, model, "-o", tmp_path / "a"))
    other = build_example(example, tmp_path / "other", seed=1)
    shutil.copy(other / "transformer" / "diffusion_pytorch_model.safetensors", model / "transformer")
    assert moved(before, keys(plan(cli, family, model, "-o", tmp_path / "b"))) == {"transformer"}


# --- exports: the plan's promises kept; inspect shows the shards, tp, dtype and data-parallel mode ---------------


@pytest.fixture(scope="module")
def flux_export(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flux") / "tp2"
    result = run_cli(
        "flux", "-m", tiny_model("flux"), "--backend", "cpu", *SIZE, "--tensor-parallel-size", "2", "-o", out
    )
    assert result.exit_code == 0, result
    return out


@pytest.fixture(scope="module")
def pixart_export(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pixart") / "bf16"
    result = run_cli(
        "pixart", "-m", tiny_model("pixart-sigma"), "--backend", "cpu", "--torch-dtype", "bfloat16", "-o", out
    )
    assert result.exit_code == 0, result
    return out


def test_inspect_shows_a_flux_exports_shards_tp_dtype_and_placement(cli, flux_export):
    code, out, err = cli("inspect", flux_export)
    assert code == 0, err
    assert "flux text-to-image: NeuronFluxPipeline (diffusers FluxPipeline)" in out
    assert "torch dtype float32" in out
    assert "data-parallel mode none, tensor parallel size 2" in out  # one sharded copy over the cores
    for component in FLUX_SHARDED:
        assert f"  {component}: tp 2, {shard(component, 0)}, {shard(component, 1)}" in out
    assert "  text_encoder: tp" not in out and "vae_decoder: tp" not in out  # plain traces hold no shard
    assert "image_rotary_emb (32, 16, 2) float32" in out and "input_ids (1, 16) int64" in out  # T5: 16 tokens


def test_inspect_shows_a_pixart_exports_t5_shard_dtype_and_placement(cli, pixart_export):
    code, out, err = cli("inspect", pixart_export)
    assert code == 0, err
    assert "pixart-sigma text-to-image: NeuronPixArtSigmaPipeline (diffusers PixArtSigmaPipeline)" in out
    assert "torch dtype bfloat16" in out
    assert "data-parallel mode transformer, tensor parallel size 1" in out
    assert f"  text_encoder: tp 1, {shard('text_encoder', 0)}\n" in out
    assert "  transformer: tp" not in out
    assert "encoder_attention_mask (1, 16) int64" in out and "sample (1, 4, 8, 8) bfloat16" in out


def test_inspect_summary_data_names_each_sharded_component(flux_export):
    from neuron_export.deploy.inspection import summary
    from neuron_export.manifest import read_manifest

    info = summary(read_manifest(flux_export), flux_export)
    assert info["build"]["tensor_parallel_size"] == 2 and info["build"]["torch_dtype"] == "float32"
    assert {c["name"]: c["sharding"] for c in info["components"]} == {
        "text_encoder": None,
        "vae_encoder": None,
        "vae_decoder": None,
        **{name: {"tensor_parallel_size": 2, "shards": [shard(name, 0), shard(name, 1)]} for name in FLUX_SHARDED},
    }


def test_the_plans_keys_are_the_exports_keys(cli, tiny_model, flux_export):
    """What `plan` promised is what the export recorded: the same key per component."""
    summary = plan(cli, "flux", tiny_model("flux"), "--tensor-parallel-size", "2", "-o", flux_export)
    recorded = json.loads((flux_export / "manifest.json").read_text())["components"]
    assert keys(summary) == {name: record["cache_key"] for name, record in recorded.items()}
    assert summary["up_to_date"] is True


@pytest.mark.slow
def test_a_new_transformer_reuses_the_flux_vae_clip_and_t5(cli, tiny_model, tmp_path):
    from neuron_export.testing.examples import build_example

    model = Path(shutil.copytree(tiny_model("flux"), tmp_path / "model"))
    args = ["flux", "-m", model, "--backend", "cpu", *SIZE, "--tensor-parallel-size", "2", "--json"]
    first = cli(*args, "-o", tmp_path / "a")
    assert first.exit_code == 0, first
    other = build_example("flux", tmp_path / "other", seed=1)
    shutil.copy(other / "transformer" / "diffusion_pytorch_model.safetensors", model / "transformer")
    changed = cli(*args, "-o", tmp_path / "b")
    assert changed.exit_code == 0, changed
    origins = {name: c["origin"] for name, c in json.loads(changed.stdout)["components"].items()}
    assert origins == {**dict.fromkeys(FLUX, "cached"), "transformer": "built"}
    name = shard("text_encoder_2", 1)
    assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    assert (tmp_path / "b" / shard("transformer", 1)).read_bytes() != (
        tmp_path / "a" / shard("transformer", 1)
    ).read_bytes()


@pytest.mark.slow
def test_a_remote_cache_carries_fluxs_per_rank_shards_to_another_host(cli, tiny_model, tmp_path):
    """Built once with a file:// remote cache (signed), then assembled on a host with an empty cache: every
    component is downloaded, each rank's shard of the T5 and the transformer included, the same file for file."""
    key = tmp_path / "key"
    made = run_cli("cache", "keygen", key)
    assert made.exit_code == 0, made
    args = ["flux", "-m", tiny_model("flux"), "--backend", "cpu", *SIZE, "--tensor-parallel-size", "2", "--json"]
    remote = ["--remote-cache", f"file://{tmp_path / 'shared'}"]
    first = cli(*args, *remote, "--remote-cache-signing-key", key, "-o", tmp_path / "a")
    assert first.exit_code == 0, first
    trusted = ["--remote-cache-trusted-key", made.stdout.strip(), "--cache-dir", tmp_path / "empty-cache"]
    second = cli(*args, *remote, *trusted, "-o", tmp_path / "b")
    assert second.exit_code == 0, second
    assert {c["origin"] for c in json.loads(second.stdout)["components"].values()} == {"downloaded"}
    for component in FLUX_SHARDED:
        for rank in (0, 1):
            name = shard(component, rank)
            assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*") if p.is_file())
    for name in files:
        if name != "manifest.json":  # origins and times differ; every other file is the same
            assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name


# --- verify: the shards are part of the export's integrity -------------------------------------------------------


@pytest.mark.parametrize("fault", ["none", "a dropped rank", "a stray rank"])
def test_verify_checks_every_ranks_shard(cli, flux_export, tmp_path, fault):
    copy = Path(shutil.copytree(flux_export, tmp_path / "export"))
    if fault == "a dropped rank":
        (copy / shard("transformer", 1)).unlink()
    elif fault == "a stray rank":  # a third rank the loader would hand to the module
        shutil.copy(copy / shard("transformer", 1), copy / shard("transformer", 2))
    code, out, _ = cli("verify", copy, "--json")
    integrity = json.loads(out)["checks"]["integrity"]
    if fault == "none":
        assert code == 0 and integrity["verdict"] == "ok", out
        fit = json.loads(out)["checks"]["fit"]["summary"]
        assert "2 NeuronCore(s)" in fit, fit  # tp 2: the sharded roles over both cores
        return
    assert code == 3 and integrity["verdict"] == "failed", out
    named = shard("transformer", 1 if fault == "a dropped rank" else 2)
    assert named in integrity["summary"], integrity


# --- a CI matrix: `plan --json` lists the builds, one runner builds each, the last one assembles -----------------


@pytest.mark.slow
def test_ci_runners_build_each_flux_key_from_the_plans_config_and_the_export_downloads_them(
    cli, tiny_model, tmp_path, monkeypatch
):
    """README "Many hosts": each build's config (tp 2 included) makes, on its own runner, exactly the key the plan
    named, sharded roles with a shard per rank; the final export downloads all five."""
    args = ["flux", "-m", tiny_model("flux"), "--backend", "cpu", *SIZE, "--tensor-parallel-size", "2"]
    remote = ["--remote-cache", f"file://{tmp_path / 'remote'}"]
    builds = plan(cli, "flux", tiny_model("flux"), "--tensor-parallel-size", "2", *remote, "-o", tmp_path / "export")[
        "builds"
    ]
    assert sorted(b["component"] for b in builds) == sorted(FLUX) and not any(b["cached"] for b in builds)
    key = tmp_path / "ci-key"
    assert cli("cache", "keygen", key).exit_code == 0
    monkeypatch.setenv("NEURON_EXPORT_REMOTE_CACHE_SIGNING_KEY", str(key))
    for number, build in enumerate(builds):
        monkeypatch.setenv("NEURON_EXPORT_CACHE", str(tmp_path / f"runner-{number}-cache"))
        job = tmp_path / f"job-{number}.yaml"
        job.write_text(json.dumps(build["config"]))
        out = tmp_path / f"runner-{number}"
        result = cli("build", job, *remote, "-o", out, "--json")
        assert result.exit_code == 0, result
        record = json.loads((out / "manifest.json").read_text())["components"][build["component"]]
        assert record["cache_key"] == build["cache_key"] and record["origin"] == "built"
        ranks = 2 if build["component"] in FLUX_SHARDED else 0
        assert [f["path"] for f in record["files"] if "/weights/" in f["path"]] == [
            shard(build["component"], rank) for rank in range(ranks)
        ]
    monkeypatch.delenv("NEURON_EXPORT_REMOTE_CACHE_SIGNING_KEY")
    monkeypatch.setenv("NEURON_EXPORT_REMOTE_CACHE_TRUSTED_KEYS", (tmp_path / "ci-key.pub").read_text())
    monkeypatch.setenv("NEURON_EXPORT_CACHE", str(tmp_path / "assembler-cache"))
    final = cli(*args, *remote, "-o", tmp_path / "export", "--json")
    assert final.exit_code == 0, final
    assert {c["origin"] for c in json.loads(final.stdout)["components"].values()} == {"downloaded"}


# --- generate: a Flux inpainting export from the command line ---------------------------------------------------


@pytest.mark.slow
def test_generate_inpaints_with_a_flux_export_as_the_eager_pipeline_does(cli, tiny_model, tmp_path):
    import diffusers
    import numpy as np
    import torch
    from PIL import Image

    out = tmp_path / "inpaint"
    args = ["flux", "-m", tiny_model("flux"), "--backend", "cpu", *SIZE, "--task", "inpainting"]
    exported = cli(*args, "--tensor-parallel-size", "2", "-o", out)
    assert exported.exit_code == 0, exported
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    rows = np.arange(64 * 64).reshape(64, 64) // 64
    Image.fromarray(((rows > 32) * 255).astype(np.uint8)).convert("RGB").save(tmp_path / "mask.png")
    done = cli(
        "generate", out, "--prompt", "a cat", "--image", tmp_path / "photo.png", "--mask", tmp_path / "mask.png",
        "--steps", "3", "--seed", "0", "-o", tmp_path / "cat.png",
    )  # fmt: skip
    assert done.exit_code == 0, done
    assert "(defaults: FluxInpaintPipeline.__call__)" in done.stdout + done.stderr
    eager = diffusers.FluxInpaintPipeline.from_pretrained(tiny_model("flux"))
    eager.set_progress_bar_config(disable=True)
    reference = eager(
        "a cat",
        image=Image.open(tmp_path / "photo.png"),
        mask_image=Image.open(tmp_path / "mask.png"),
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(0),
        height=64,
        width=64,
        max_sequence_length=16,
    ).images[0]
    ours = np.asarray(Image.open(tmp_path / "cat.png").convert("RGB")).astype(np.int16)
    assert np.abs(ours - np.asarray(reference.convert("RGB")).astype(np.int16)).max() <= 1
