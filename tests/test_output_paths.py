"""Where an export goes: its default name, a bad --output, OUTPUT with -o, and what "up to date" means."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest


def plan_json(cli, *args):
    result = cli("plan", *args, "--backend", "cpu", "--json")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def test_an_output_under_a_file_is_one_sentence(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", "afile/sub")
    assert (result.exit_code, result.stderr) == (
        2,
        "neuron-export: error: --output afile/sub: afile is a file, not a directory; choose another --output.\n",
    )


def test_an_output_where_no_directory_can_be_made_is_one_sentence(cli, tiny_model):
    result = cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "--components", "vae_decoder", "-o", "/proc/neuron-x"
    )
    assert result.exit_code == 2, result
    assert result.stderr.startswith(
        "neuron-export: error: --output /proc/neuron-x: a directory cannot be created there"
    )
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_any_os_error_on_a_path_becomes_one_sentence():
    from neuron_export.cli.app import exit_status

    code, message = exit_status(OSError(errno.EIO, "Input/output error", "/mnt/x/out"))
    assert code == 2 and message.startswith("Cannot use /mnt/x/out: input/output error;")


def test_the_default_output_names_model_family_task_and_shapes(cli, tiny_model):
    sd = tiny_model("sd")
    assert plan_json(cli, "sd", "-m", sd)["output"] == f"{sd.name}-sd-neuron-64x64-b1"
    assert (
        plan_json(cli, "sd", "-m", f"{sd}/", "--task", "image-to-image", "--batch-size", "2")["output"]
        == f"{sd.name}-sd-img2img-neuron-64x64-b2"
    )
    unet = tiny_model("lcm-sdxl-unet")  # a --unet names the export: LCM-SDXL is not the SDXL base
    assert (
        plan_json(cli, "sd-xl", "-m", tiny_model("sdxl"), "--unet", unet, "--num-images-per-prompt", "2")["output"]
        == f"{unet.name}-sd-xl-neuron-64x64-b1-n2"
    )
    assert plan_json(cli, "sd", "-m", sd, "--unet", sd / "unet")["output"] == f"{sd.name}-sd-neuron-64x64-b1"


def test_several_configs_get_their_own_outputs_and_o_is_their_parent(cli, tiny_model, tmp_path):
    configs = []
    for name in ("sd", "lcm"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"family: {name}\nmodel: {tiny_model(name)}\n")
        configs.append(path)
    names = [f"{tiny_model('sd').name}-sd-neuron-64x64-b1", f"{tiny_model('lcm').name}-lcm-neuron-64x64-b1"]
    assert [p["output"] for p in plan_json(cli, "build", *configs)["plans"]] == names
    assert [p["output"] for p in plan_json(cli, "build", *configs, "-o", tmp_path / "exports")["plans"]] == [
        str(tmp_path / "exports" / name) for name in names
    ]


def test_output_argument_and_option_together_are_refused(cli, tiny_model, tmp_path):
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", tmp_path / "a", "-o", tmp_path / "b")
    assert result.exit_code == 2 and "OUTPUT" in result.stderr and "--output" in result.stderr, result
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_up_to_date_compares_the_resolved_export(cli, tiny_model, tmp_path, monkeypatch):
    model = tiny_model("sd")
    monkeypatch.chdir(model.parent)
    first = cli("sd", "-m", model.name, "--backend", "cpu", "--components", "vae_decoder", "-o", tmp_path / "out")
    assert first.exit_code == 0, first
    same = [
        (model.parent, "-m", f"{model.name}/"),
        (tmp_path, "-m", model, "--height", "64", "--width", "64"),
        (tmp_path, "-m", os.path.relpath(model, tmp_path)),
    ]
    for cwd, *flags in same:  # a trailing slash, the native size spelled out, a path relative to another folder
        monkeypatch.chdir(cwd)
        rerun = cli(
            "sd", *flags[:2], "--backend", "cpu", *flags[2:], "--components", "vae_decoder", "-o", tmp_path / "out"
        )
        assert rerun.exit_code == 0 and "is up to date" in rerun.stdout, (flags, rerun)
    other = cli(
        "sd", "-m", model, "--backend", "cpu", "--components", "vae_decoder", "--height", "128", "-o", tmp_path / "out"
    )
    assert other.exit_code == 2 and "holds a different export (its --height is 64, this one's 128)" in other.stderr, (
        other
    )


def test_a_damaged_export_is_incomplete_not_different(cli, tiny_model, tmp_path):
    args = ("sd", "-m", tiny_model("sd"), "--backend", "cpu", "--components", "vae_decoder", "-o", tmp_path / "out")
    assert cli(*args).exit_code == 0
    (tmp_path / "out" / "vae_decoder" / "config.json").unlink()
    result = cli(*args)
    assert (
        result.exit_code == 2
        and (
            f"--output {tmp_path / 'out'} is incomplete: vae_decoder/config.json missing; "
            "--force rebuilds it from the cache"
        )
        in result.stderr
    ), result


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_images_follow_the_umask(tmp_path, umask):
    from PIL import Image

    from neuron_export.cli.generate import write_image

    previous = os.umask(umask)
    try:
        write_image(Image.new("RGB", (8, 8)), tmp_path / "image.png")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "image.png").stat().st_mode) == 0o666 & ~umask
