"""Bad input: one sentence naming field, value and fix; non-zero exit; no traceback; nothing written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def assert_clean_failure(result, output: Path, *words: str) -> None:
    assert result.exit_code != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


BAD_FLAGS = {
    "height-not-multiple-of-8": (["--height", "513"], ["height", "513", "multiple of 8", "512"]),
    "width-out-of-range": (["--width", "8192"], ["width", "8192", "between"]),
    "batch-size-zero": (["--batch-size", "0"], ["batch_size", "0", "1 or more"]),
    "auto-cast-type-with-none": (["--auto-cast", "none", "--auto-cast-type", "bf16"], ["auto_cast_type", "bf16", "--auto-cast"]),
    "unknown-task": (["--task", "text2img"], ["task", "text2img", "text-to-image"]),
    "unknown-component": (["--components", "vae"], ["components", "vae", "vae_decoder"]),
    "height-not-a-number": (["--height", "big"], ["height", "big", "whole number"]),
    "unknown-flag": (["--heigth", "512"], ["--heigth"]),
}


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_fail_before_anything_loads(case, cli, tiny_model, tmp_path):
    flags, words = BAD_FLAGS[case]
    output = tmp_path / "out"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, *flags)
    assert_clean_failure(result, output, *words)
    assert result.exit_code == 2


def test_task_the_model_cannot_do(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--task", "inpainting")
    assert_clean_failure(result, output, "--task inpainting", "9 input channels", "4")


def test_inpainting_model_without_inpainting_task(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    result = cli("sd", "-m", tiny_model("sd-inpaint"), "--backend", "cpu", "-o", output)
    assert_clean_failure(result, output, "--task inpainting")


@pytest.mark.parametrize("command,kind,hint", [
    ("sd", "sdxl", "neuron-export sd-xl"),
    ("sd-xl", "sd", "neuron-export sd"),
    ("sd", "lcm", "neuron-export lcm"),
    ("lcm", "sd", "neuron-export sd"),
])
def test_command_that_does_not_fit_the_model(command, kind, hint, cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    result = cli(command, "-m", tiny_model(kind), "--backend", "cpu", "-o", output)
    assert_clean_failure(result, output, hint)


def test_refiner_cannot_do_text_to_image(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    result = cli("sd-xl", "-m", tiny_model("sdxl-refiner"), "--backend", "cpu", "-o", output)
    assert_clean_failure(result, output, "refiner", "--task image-to-image")


def test_missing_model_directory(cli, tmp_path):
    output = tmp_path / "out"
    result = cli("sd", "-m", tmp_path / "no-such-model", "--backend", "cpu", "-o", output)
    assert_clean_failure(result, output, "no-such-model", "does not exist")


def test_model_directory_without_unet(cli, tiny_model, tmp_path):
    broken = tmp_path / "no-unet"
    shutil.copytree(tiny_model("sd"), broken)
    shutil.rmtree(broken / "unet")
    output = tmp_path / "out"
    result = cli("sd", "-m", broken, "--backend", "cpu", "-o", output)
    assert_clean_failure(result, output, "no UNet", "unet")


def test_truncated_safetensors_file(cli, tiny_model, tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(tiny_model("sd"), broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    output = tmp_path / "out"
    result = cli("sd", "-m", broken, "--backend", "cpu", "-o", output)
    assert_clean_failure(result, output, "truncated", "diffusion_pytorch_model.safetensors", "re-download")


def test_existing_output_is_not_touched(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("earlier work")
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output)
    assert result.exit_code == 2 and "--force" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert (output / "keep.txt").read_text() == "earlier work"


def test_neuron_backend_without_the_sdk(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)  # import fails, like PyPI's placeholder
    for backend in ("neuron", "auto"):
        output = tmp_path / backend
        result = cli("sd", "-m", tiny_model("sd"), "--backend", backend, "-o", output)
        assert_clean_failure(result, output, f"--backend {backend}", "Neuron SDK", "--backend cpu")


def test_misspelled_key_in_yaml_config(cli, tiny_model, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(f"family: sd\nmodel: {tiny_model('sd')}\nhieght: 512\n")
    output = tmp_path / "out"
    result = cli("build", config, "-o", output, "--backend", "cpu")
    assert_clean_failure(result, output, "hieght", "did you mean 'height'")


def test_misspelled_key_in_set_option(cli, tiny_model, tmp_path):
    config = tmp_path / "ok.yaml"
    config.write_text(f"family: sd\nmodel: {tiny_model('sd')}\n")
    output = tmp_path / "out"
    result = cli("build", config, "-o", output, "--backend", "cpu", "--set", "batchsize=2")
    assert_clean_failure(result, output, "batchsize", "did you mean 'batch_size'")


def test_json_mode_reports_errors_as_one_object(cli, tiny_model, tmp_path):
    import json

    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", "--height", "100", "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and "height" in payload["error"]


def test_failed_validation_fails_the_export_and_keeps_the_earlier_one(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    assert cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "vae_decoder").exit_code == 0
    before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    # The UNet's CPU trace differs from eager by ~1e-6; an absurd tolerance makes its check fail.
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet",
                 "--atol", "1e-30", "--force")
    assert result.exit_code == 1
    assert "Validation of unet failed" in result.stderr and "Traceback" not in result.stderr
    assert {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_ctrl_c_leaves_no_partial_directory(tiny_model, tmp_path, isolated_cache):
    """A real interrupt in the middle of a build: exit 130, no output directory (hidden or not), and no
    half-built cache entry; the components finished before the interrupt stay cached, intact."""
    output = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "neuron_export", "sd-xl", "-m", str(tiny_model("sdxl")), "--backend", "cpu", "-o", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.time() + 180
    while time.time() < deadline and not list(isolated_cache.glob("components/*/*/record.json")):
        time.sleep(0.02)  # at least one component finished, others still building
    assert process.poll() is None, "the export finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []
    assert not [p for p in (isolated_cache / "tmp").iterdir()]  # no half-built entry left
    from neuron_export.cache import ComponentCache

    cache = ComponentCache(isolated_cache)
    assert cache.verify() == [] and len(list(cache.entries())) >= 1
