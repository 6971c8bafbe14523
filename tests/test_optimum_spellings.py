"""optimum-cli's spellings mean what they mean there: --cache_dir is the Hub download cache, --instance_type the
target; a LoRA option given for some adapters only belongs to the --lora it follows."""

from __future__ import annotations

import json
import shutil


def test_cache_dir_is_the_hub_cache_and_instance_type_the_target():
    from neuron_export.cli.spellings import expand_list_options

    assert expand_list_options(["--cache_dir", "hf", "--instance_type=trn1n"]) == [
        "--hub-cache-dir",
        "hf",
        "--target",
        "trn1",
    ]


def test_cache_dir_does_not_become_the_component_cache(cli, tiny_model, tmp_path, isolated_cache):
    result = cli(
        "plan",
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "--cache_dir",
        tmp_path / "hf",
        "--instance_type",
        "inf2",
        "--json",
    )
    assert result.exit_code == 0, result
    assert not (tmp_path / "hf").exists() and (isolated_cache / "weight-hashes.json").is_file()


def test_an_unknown_instance_type_is_refused(cli, tiny_model):
    result = cli("plan", "sd", "-m", tiny_model("sd"), "--backend", "cpu", "--instance_type", "inf1")
    assert result.exit_code == 2 and "--instance_type inf1 is not one of" in result.stderr, result


def test_lora_options_pair_with_the_lora_they_follow():
    from neuron_export.cli.spellings import expand_list_options, pair_lora_options

    argv = [
        "sd-xl",
        "--lora",
        "a",
        "--lora-weight-name",
        "w.safetensors",
        "--lora-scale",
        "0.9",
        "--lora",
        "b",
        "--lora-scale",
        "0.5",
    ]
    assert pair_lora_options(argv) == [
        "sd-xl",
        "--lora",
        "a",
        "--lora-scale",
        "0.9",
        "--lora",
        "b",
        "--lora-scale",
        "0.5",
        "--lora-weight-name",
        "w.safetensors",
        "--lora-weight-name",
        "",
    ]
    second_only = ["--lora", "a", "--lora", "b", "--lora-adapter-name=style"]
    assert pair_lora_options(second_only) == [
        "--lora",
        "a",
        "--lora",
        "b",
        "--lora-adapter-name",
        "",
        "--lora-adapter-name",
        "style",
    ]
    in_order = ["--lora_model_ids", "a", "b", "--lora_weight_names", "x.safetensors", "y.safetensors"]
    assert pair_lora_options(expand_list_options(in_order)) == expand_list_options(in_order)


def test_the_readme_two_lora_example_runs(cli, tiny_model, tmp_path):
    from neuron_export.testing.lora import build_lora

    sdxl = tiny_model("sdxl")
    build_lora(sdxl, tmp_path / "cereal", weight_name="cereal_box_sdxl_v1.safetensors")
    build_lora(sdxl, tmp_path / "cereal", weight_name="cereal_box_sdxl_v1_alt.safetensors", seed=1)
    build_lora(sdxl, tmp_path / "my-style-lora", seed=2)
    result = cli(
        "plan",
        "sd-xl",
        "-m",
        sdxl,
        "--backend",
        "cpu",
        "--lora",
        tmp_path / "cereal",
        "--lora-weight-name",
        "cereal_box_sdxl_v1.safetensors",
        "--lora-scale",
        "0.9",
        "--lora",
        tmp_path / "my-style-lora",
        "--lora-scale",
        "0.5",
        "--json",
    )
    assert result.exit_code == 0, result
    unet = next(c for c in json.loads(result.stdout)["components"] if c["component"] == "unet")
    assert unet["loras"] == ["default_0", "default_1"]
    shutil.rmtree(tmp_path / "my-style-lora")
    (tmp_path / "my-style-lora").mkdir()
    build_lora(sdxl, tmp_path / "my-style-lora", weight_name="a.safetensors")
    build_lora(sdxl, tmp_path / "my-style-lora", weight_name="b.safetensors")
    # The second adapter has no weight name, so it must hold exactly one file: refused naming it.
    again = cli(
        "plan",
        "sd-xl",
        "-m",
        sdxl,
        "--backend",
        "cpu",
        "--lora",
        tmp_path / "cereal",
        "--lora-weight-name",
        "cereal_box_sdxl_v1.safetensors",
        "--lora",
        tmp_path / "my-style-lora",
    )
    assert again.exit_code == 2 and f"--lora {tmp_path / 'my-style-lora'}" in again.stderr, again
