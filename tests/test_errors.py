"""Bad input: one sentence naming field, value and fix; non-zero exit; no traceback; nothing written."""

from __future__ import annotations

import json
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
    "height-not-multiple-of-8": (["--height", "513"], ["--height 513", "multiple of 8", "512"]),
    "width-out-of-range": (["--width", "8192"], ["width", "8192", "between"]),
    "batch-size-zero": (["--batch-size", "0"], ["--batch-size 0", "1 or more"]),
    "auto-cast-type-with-none": (
        ["--auto-cast", "none", "--auto-cast-type", "bf16"],
        ["auto_cast_type", "bf16", "--auto-cast"],
    ),
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


@pytest.mark.parametrize(
    "command,kind,hint",
    [
        ("sd", "sdxl", "neuron-export sd-xl"),
        ("sd-xl", "sd", "neuron-export sd"),
        ("sd", "lcm", "neuron-export lcm"),
        ("lcm", "sd", "neuron-export sd"),
    ],
)
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
    assert (
        cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "vae_decoder").exit_code
        == 0
    )
    before = {p.relative_to(output): p.read_bytes() for p in output.rglob("*") if p.is_file()}
    # The UNet's CPU trace differs from eager by ~1e-6; an absurd tolerance makes its check fail.
    result = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        output,
        "--components",
        "unet",
        "--atol",
        "1e-30",
        "--force",
    )
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
        [
            sys.executable,
            "-m",
            "neuron_export",
            "sd-xl",
            "-m",
            str(tiny_model("sdxl")),
            "--backend",
            "cpu",
            "-o",
            str(output),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
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
    from neuron_export.store.cache import ComponentCache

    cache = ComponentCache(isolated_cache)
    assert cache.verify() == [] and len(list(cache.entries())) >= 1


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder (None) under `directory`, by relative path."""
    return {
        p.relative_to(directory).as_posix(): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


def one_line(result) -> str:
    assert "Traceback" not in result.stderr + result.stdout, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("contents", ["user files", "a manifest.json that is not ours"])
def test_force_never_replaces_a_directory_that_is_not_an_export(contents, cli, tiny_model, tmp_path):
    output = tmp_path / "photos"
    (output / "2024").mkdir(parents=True)
    (output / "2024" / "beach.jpg").write_bytes(bytes(range(256)))
    if contents == "user files":
        (output / "notes.txt").write_text("my notes")
    else:
        (output / "manifest.json").write_text('{"name": "my-web-app", "version": "1.0"}')
    before = tree(output)
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--force")
    assert result.exit_code == 2
    line = one_line(result)
    assert str(output) in line and "not a neuron-export export" in line
    assert tree(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_force_uses_an_empty_directory(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    result = cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "vae_decoder", "--force"
    )
    assert result.exit_code == 0, result
    assert (output / "vae_decoder" / "model.neuron").is_file()


@pytest.mark.parametrize("protected", ["model", "cache"])
@pytest.mark.parametrize("relation", ["is", "contains", "is inside"])
def test_output_never_overlaps_the_model_or_the_cache(protected, relation, cli, tiny_model, tmp_path):
    model = tmp_path / "models" / "my-sd"
    shutil.copytree(tiny_model("sd"), model)  # the shared fixture must not be the one put at risk
    cache = tmp_path / "caches" / "neuron"
    (cache / "components" / "ab").mkdir(parents=True)
    (cache / "components" / "ab" / "record.json").write_text('{"an": "entry"}')
    directory = model if protected == "model" else cache
    output = {"is": directory, "contains": directory.parent, "is inside": directory / "exports" / "out"}[relation]
    before = tree(tmp_path)
    result = cli("sd", "-m", model, "--backend", "cpu", "--cache-dir", cache, "-o", output, "--force")
    assert result.exit_code == 2
    line = one_line(result)
    assert f"--output {output} {relation} the " in line and str(directory) in line
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "component,entry,words",
    [
        ("unet", ["my_pkg", "MyUNet"], ["unet", "my_pkg.MyUNet", "custom code"]),
        (
            "unet",
            ["diffusers", "UNet2DConditionModelPlus"],
            ["unet", "diffusers.UNet2DConditionModelPlus", "UNet2DConditionModel"],
        ),
        (
            "text_encoder",
            ["transformers", "MyTextEncoder"],
            ["text_encoder", "transformers.MyTextEncoder", "CLIPTextModel"],
        ),
        ("scheduler", ["scheduler", "MyScheduler"], ["scheduler", "scheduler.MyScheduler", "custom code"]),
        ("scheduler", ["diffusers", "NoSuchScheduler"], ["scheduler", "diffusers.NoSuchScheduler"]),
    ],
)
def test_a_class_that_is_not_the_library_own_is_refused(component, entry, words, cli, tiny_model, tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(tiny_model("sd"), model)
    index = json.loads((model / "model_index.json").read_text())
    index[component] = entry
    (model / "model_index.json").write_text(json.dumps(index))
    output = tmp_path / "out"
    result = cli("sd", "-m", model, "--backend", "cpu", "-o", output)
    assert_clean_failure(result, output, *words)


def test_a_replacement_unet_of_a_custom_class_is_refused(cli, tiny_model, tmp_path):
    unet = tmp_path / "my-unet"
    shutil.copytree(tiny_model("lcm-sdxl-unet"), unet)
    (config_file,) = unet.rglob("config.json")
    config = json.loads(config_file.read_text())
    config["_class_name"] = "MyUNet"
    config_file.write_text(json.dumps(config))
    output = tmp_path / "out"
    result = cli("sd-xl", "-m", tiny_model("sdxl"), "--unet", unet, "--backend", "cpu", "-o", output)
    assert_clean_failure(result, output, "--unet", "MyUNet", "UNet2DConditionModel")


class TinyDisk:
    """A real tmpfs of a few MiB, mounted in a private mount namespace and reached from here through
    /proc/PID/root: real ENOSPC and EROFS, even as root (for whom chmod blocks nothing)."""

    def __init__(self, holder: subprocess.Popen, mount_point: Path) -> None:
        self.holder = holder
        self.path = Path(f"/proc/{holder.pid}/root") / mount_point.relative_to("/")

    def make_read_only(self) -> None:
        self.holder.stdin.write("\n")
        self.holder.stdin.flush()
        assert self.holder.stdout.readline().strip() == "read-only"


@pytest.fixture
def tiny_disk(tmp_path):
    """Factory: ``tiny_disk("1m")`` -> a TinyDisk of that size, unmounted when the test ends."""
    holders = []

    def make(size: str) -> TinyDisk:
        mount_point = tmp_path / f"disk{len(holders)}"
        mount_point.mkdir()
        script = (
            'mount -t tmpfs -o size="$1" tmpfs "$2" && echo ready && read _ && mount -o remount,ro "$2" '
            "&& echo read-only && exec sleep 3600"
        )
        try:
            holder = subprocess.Popen(
                ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", size, str(mount_point)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except FileNotFoundError:
            pytest.skip("needs unshare(1) to mount a small filesystem")
        holders.append(holder)
        if holder.stdout.readline().strip() != "ready":
            pytest.skip(f"cannot mount a tmpfs in a user namespace here: {holder.communicate()[1].strip()}")
        return TinyDisk(holder, mount_point)

    yield make
    for holder in holders:
        holder.kill()
        holder.wait()


def test_a_full_disk_fails_in_one_sentence_and_keeps_the_earlier_export(cli, tiny_model, tiny_disk):
    disk = tiny_disk("1m")  # room for the VAE decoder's export (0.4 MiB), not for the UNet's (3.5 MiB)
    output = disk.path / "out"
    assert (
        cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "vae_decoder").exit_code
        == 0
    )
    before = tree(output)
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet", "--force")
    assert result.exit_code == 7
    line = one_line(result)
    assert str(output) in line and "no space" in line and "MiB needed" in line and "free space" in line
    assert tree(output) == before
    assert [p.name for p in disk.path.iterdir()] == ["out"]  # no staging sibling left


def test_a_full_disk_leaves_no_output(cli, tiny_model, tiny_disk):
    disk = tiny_disk("1m")
    output = disk.path / "out"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet")
    assert result.exit_code == 7
    assert_clean_failure(result, output, str(output), "no space", "MiB needed")
    assert list(disk.path.iterdir()) == []


def test_a_read_only_output_fails_before_building_and_keeps_the_earlier_export(
    cli, tiny_model, tiny_disk, isolated_cache
):
    disk = tiny_disk("8m")
    output = disk.path / "out"
    assert (
        cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "vae_decoder").exit_code
        == 0
    )
    before = tree(output)
    disk.make_read_only()
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet", "--force")
    assert result.exit_code == 7
    line = one_line(result)
    assert str(output) in line and "read-only" in line and "pass a writable --output" in line
    assert tree(output) == before
    built = [json.loads(p.read_text())["name"] for p in isolated_cache.glob("components/*/*/record.json")]
    assert built == ["vae_decoder"]  # refused before the UNet was built


def test_a_full_cache_disk_fails_in_one_sentence(cli, tiny_model, tmp_path, tiny_disk):
    disk = tiny_disk("1m")  # the UNet's artifact (3.5 MiB) cannot be saved into the cache
    cache = disk.path / "cache"
    output = tmp_path / "out"
    result = cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet", "--cache-dir", cache
    )
    assert result.exit_code == 7
    assert_clean_failure(result, output, "unet", str(cache), "no space", "MiB needed")
    assert list((cache / "tmp").iterdir()) == [] and not list(cache.glob("components/*/*"))


def _model_whose_vae_cannot_load(source: Path, tmp_path: Path) -> Path:
    """A pipeline whose VAE config asks for wider layers than its weights hold: plans fine, crashes in the worker."""
    model = tmp_path / "model"
    shutil.copytree(source, model)
    config_path = model / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [width * 2 for width in config["block_out_channels"]]
    config_path.write_text(json.dumps(config))
    return model


def test_a_worker_crash_is_one_sentence_and_debug_shows_both_tracebacks(cli, tiny_model, tmp_path, monkeypatch):
    model = _model_whose_vae_cannot_load(tiny_model("sd"), tmp_path)
    args = ("sd", "-m", model, "--backend", "cpu", "--components", "vae_decoder", "-o", tmp_path / "out")
    result = cli(*args)
    assert_clean_failure(result, tmp_path / "out", "Building vae_decoder crashed", "nothing was written")
    assert result.exit_code == 1

    monkeypatch.setenv("NEURON_EXPORT_DEBUG", "1")
    result = cli(*args)
    assert result.exit_code == 1
    ours, _, worker = result.stderr.partition("The worker's traceback:")
    assert "Traceback" in ours and "run_export" in ours  # the exporter's side
    assert "Traceback" in worker and "build_component" in worker  # the worker's side, where it crashed
    assert result.stderr.rstrip().splitlines()[-1].startswith("neuron-export: error: Building vae_decoder crashed")


def test_debug_shows_the_traceback_of_a_user_error(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_EXPORT_DEBUG", "1")
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", "--height", "513")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "ExportError" in result.stderr
