"""A cache key holds exactly what decides a component's bytes: weights, traced inputs and shapes, compiler
arguments, traced library versions, fused add-ons. Not the pipeline around the component (its architecture,
LCM-ness), not the tolerance and not whether to validate: validation results are stored beside the artifact."""

from __future__ import annotations

import json
from pathlib import Path

XL = ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"]


def origins(result) -> dict[str, str]:
    """component -> where a --json export took it from: built, cached (or downloaded)."""
    assert result.exit_code == 0, result
    return {name: component["origin"] for name, component in json.loads(result.stdout)["components"].items()}


def validation(result, component: str) -> dict:
    assert result.exit_code == 0, result
    return json.loads(result.stdout)["components"][component]["validation"]


def plan_caches(cli, *args) -> dict[str, str]:
    result = cli("plan", *args, "--json")
    assert result.exit_code == 0, result
    return {c["component"]: c["cache"] for c in json.loads(result.stdout)["components"]}


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def test_an_lcm_unet_after_sdxl_builds_only_the_unet(cli, tiny_model, tmp_path):
    sdxl, lcm_unet = tiny_model("sdxl"), tiny_model("lcm-sdxl-unet")
    assert origins(cli("sd-xl", "-m", sdxl, "--backend", "cpu", "-o", tmp_path / "base", "--json")) == dict.fromkeys(
        XL, "built"
    )

    base_args = ["sd-xl", "-m", sdxl, "--backend", "cpu", "-o", tmp_path / "strict"]
    assert plan_caches(cli, *base_args, "--atol", "1e-5") == dict.fromkeys(XL, "hit")  # 5 hits: the tolerance is no key
    assert plan_caches(cli, *base_args, "--disable-validation") == dict.fromkeys(XL, "hit")

    lcm = ["sd-xl", "-m", sdxl, "--unet", lcm_unet, "--backend", "cpu", "-o", tmp_path / "lcm"]
    assert plan_caches(cli, *lcm) == {**dict.fromkeys(XL, "hit"), "unet": "miss"}  # 4 hits, 1 build
    assert origins(cli(*lcm, "--json")) == {**dict.fromkeys(XL, "cached"), "unet": "built"}

    # The shared components' configs are written for each pipeline at assembly: no pipeline's facts leak into another's.
    base, lcm_export = tmp_path / "base", tmp_path / "lcm"
    assert manifest(lcm_export)["pipeline"]["is_lcm"] is True and manifest(base)["pipeline"]["is_lcm"] is False
    assert "lcm" in json.loads((lcm_export / "unet" / "config.json").read_text())["_name_or_path"].lower()
    assert "_name_or_path" not in json.loads((base / "unet" / "config.json").read_text())
    for name in ("text_encoder", "text_encoder_2", "vae_encoder", "vae_decoder"):
        assert (lcm_export / name / "config.json").read_text() == (base / name / "config.json").read_text()
        assert (lcm_export / name / "model.neuron").read_bytes() == (base / name / "model.neuron").read_bytes()


def test_base_and_refiner_share_their_byte_identical_vae(cli, tiny_model, tmp_path):
    vaes = ["--components", "vae_encoder,vae_decoder"]
    base, refiner = tiny_model("sdxl"), tiny_model("sdxl-refiner")
    assert (base / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        refiner / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert origins(
        cli("sd-xl", "-m", base, "--backend", "cpu", "-o", tmp_path / "base", *vaes, "--json")
    ) == dict.fromkeys(["vae_encoder", "vae_decoder"], "built")
    result = cli(
        "sd-xl",
        "-m",
        refiner,
        "--task",
        "image-to-image",
        "--backend",
        "cpu",
        "-o",
        tmp_path / "refiner",
        *vaes,
        "--json",
    )
    assert origins(result) == dict.fromkeys(["vae_encoder", "vae_decoder"], "cached")
    assert manifest(tmp_path / "refiner")["pipeline"]["architecture"] == "sdxl-refiner"
    # the refiner's manifest names its own weight files
    record = manifest(tmp_path / "refiner")["components"]["vae_decoder"]
    assert record["source_files"][0]["path"] == "vae/diffusion_pytorch_model.safetensors"


def test_a_changed_atol_builds_nothing_and_a_stricter_one_revalidates_the_cached_artifact(cli, tiny_model, tmp_path):
    args = ["sd", "-m", tiny_model("sd"), "--backend", "cpu", "--components", "unet"]
    first = cli(*args, "-o", tmp_path / "a", "--json")
    assert origins(first) == {"unet": "built"}
    built = validation(first, "unet")
    assert built["status"] == "passed" and built["reused"] is False and built["atol"] == 1e-4

    assert plan_caches(cli, *args, "-o", tmp_path / "b", "--atol", "1e-3") == {"unet": "hit"}
    looser = cli(*args, "-o", tmp_path / "b", "--atol", "1e-3", "--json")
    assert origins(looser) == {"unet": "cached"}
    assert validation(looser, "unet") == {**built, "atol": 1e-3, "reused": True}  # the stored measurement

    stricter = cli(*args, "-o", tmp_path / "c", "--atol", "5e-5", "--json")
    assert origins(stricter) == {"unet": "cached"}  # compared with eager again, not rebuilt
    checked = validation(stricter, "unet")
    assert checked["status"] == "passed" and checked["atol"] == 5e-5 and checked["reused"] is False
    assert manifest(tmp_path / "c")["components"]["unet"]["validation"] == checked

    again = cli(*args, "-o", tmp_path / "d", "--atol", "5e-5", "--json")
    assert origins(again) == {"unet": "cached"} and validation(again, "unet")["reused"] is True


def test_a_failed_validation_keeps_the_build_so_a_larger_atol_recompiles_nothing(cli, tiny_model, tmp_path):
    args = ["sd", "-m", tiny_model("sd"), "--backend", "cpu", "--components", "unet"]
    failed = cli(*args, "-o", tmp_path / "a", "--atol", "1e-30")
    assert failed.exit_code == 1 and "Validation of unet failed" in failed.stderr, failed
    assert "raise --atol" in failed.stderr and "without recompiling" in failed.stderr
    assert not (tmp_path / "a").exists()
    retried = cli(*args, "-o", tmp_path / "a", "--json")
    assert origins(retried) == {"unet": "cached"}
    assert validation(retried, "unet")["status"] == "passed"


def test_a_disable_validation_build_is_reused_and_validated_by_a_validating_export(cli, tiny_model, tmp_path):
    args = ["sd", "-m", tiny_model("sd"), "--backend", "cpu", "--components", "unet,vae_decoder"]
    unchecked = cli(*args, "-o", tmp_path / "a", "--disable-validation", "--json")
    assert origins(unchecked) == {"unet": "built", "vae_decoder": "built"}
    assert validation(unchecked, "unet")["status"] == "skipped"

    assert set(plan_caches(cli, *args, "-o", tmp_path / "b").values()) == {"hit"}
    checked = cli(*args, "-o", tmp_path / "b", "--json")
    assert origins(checked) == {"unet": "cached", "vae_decoder": "cached"}
    for name in ("unet", "vae_decoder"):
        result = validation(checked, name)
        assert result["status"] == "passed" and result["reused"] is False and result["max_abs_diff"] is not None

    reused = cli(*args, "-o", tmp_path / "c", "--json")  # the check just made is stored beside the artifact
    assert origins(reused) == {"unet": "cached", "vae_decoder": "cached"}
    assert validation(reused, "unet")["reused"] is True and validation(reused, "unet")["status"] == "passed"

    # and a build that was validated is reused by a --disable-validation export, which says it did not check
    skipped = cli(*args, "-o", tmp_path / "d", "--disable-validation", "--json")
    assert origins(skipped) == {"unet": "cached", "vae_decoder": "cached"}
    assert validation(skipped, "unet")["status"] == "skipped"
