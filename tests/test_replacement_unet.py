"""--unet is checked against the model it goes into, before any weight is read, and the error names --unet."""

from __future__ import annotations

import json
import shutil


def test_an_sd_unet_in_sdxl_is_refused_naming_unet(cli, tiny_model, tmp_path):
    result = cli(
        "sd-xl",
        "-m",
        tiny_model("sdxl"),
        "--unet",
        tiny_model("sd") / "unet",
        "--backend",
        "cpu",
        "-o",
        tmp_path / "out",
    )
    assert result.exit_code == 2, result
    assert result.stderr.startswith(f"neuron-export: error: --unet {tiny_model('sd') / 'unet'} is an SD 1.x/2.x UNet")
    assert "cross_attention_dim 32" in result.stderr and "with 64" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_sdxl_unet_in_sd_suggests_sd_xl(cli, tiny_model, tmp_path):
    unet = tiny_model("lcm-sdxl-unet")
    result = cli("sd", "-m", tiny_model("sd"), "--unet", unet, "--backend", "cpu", "-o", tmp_path / "out")
    assert result.exit_code == 2, result
    assert f"--unet {unet} is an SDXL LCM UNet" in result.stderr and "--model" not in result.stderr.split(";")[0][:30]
    assert f"`neuron-export sd-xl --unet {unet}`" in result.stderr
    # The suggested family takes it (with an SDXL model).
    assert cli("plan", "sd-xl", "-m", tiny_model("sdxl"), "--unet", unet, "--backend", "cpu", "--json").exit_code == 0


def test_an_lcm_unet_in_sd_names_unet_and_lcm_takes_it(cli, tiny_model):
    unet = tiny_model("lcm") / "unet"
    result = cli("plan", "sd", "-m", tiny_model("sd"), "--unet", unet, "--backend", "cpu")
    assert result.exit_code == 2, result
    assert f"--unet {unet} is an LCM UNet" in result.stderr and "`neuron-export lcm`" in result.stderr
    assert cli("plan", "lcm", "-m", tiny_model("sd"), "--unet", unet, "--backend", "cpu", "--json").exit_code == 0


def test_another_sample_size_or_channel_count_is_refused(cli, tiny_model, tmp_path):
    for key, value in (("sample_size", 16), ("out_channels", 8)):
        unet = tmp_path / key
        shutil.copytree(tiny_model("sd") / "unet", unet)
        config = json.loads((unet / "config.json").read_text())
        (unet / "config.json").write_text(json.dumps({**config, key: value}))
        result = cli("plan", "sd", "-m", tiny_model("sd"), "--unet", unet, "--backend", "cpu")
        assert result.exit_code == 2, result
        assert f"--unet {unet} is an SD 1.x/2.x UNet with {key} {value}" in result.stderr
