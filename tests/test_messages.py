"""Messages name the option as the user gave it: the flag typed, the --set pair, or the YAML key and its file."""

from __future__ import annotations

import pytest
from helpers import run_cli


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--height", "513"], "--height 513 is not valid: must be a multiple of 8; use 512."),
        (["--atol", "-1"], "--atol -1.0 is not valid: must be greater than 0."),
        (["--max-memory", "lots"], "--max-memory lots is not valid: write a memory size like 16GiB or 24G."),
        (["--set", "height=100"], "--set height=100 is not valid: must be a multiple of 8; use 96."),
    ],
)
def test_a_bad_value_names_the_flag_typed(tiny_model, tmp_path, flags, expected):
    result = (
        run_cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", *flags)
        if flags[0] != "--set"
        else run_cli("build", _config(tmp_path, f"model: {tiny_model('sd')}\n"), *flags, "--backend", "cpu")
    )
    assert result.exit_code == 2, result
    assert result.stderr.strip() == f"neuron-export: error: {expected}"


def _config(tmp_path, extra: str = ""):
    path = tmp_path / "job.yaml"
    path.write_text(f"family: sd\n{extra}")
    return path


def test_a_bad_value_from_yaml_names_the_key_and_the_file(tmp_path):
    path = _config(tmp_path, "height: 513\n")
    result = run_cli("build", path, "--backend", "cpu")
    assert result.exit_code == 2, result
    assert (
        result.stderr.strip()
        == f"neuron-export: error: height: 513 in {path} is not valid: must be a multiple of 8; use 512."
    )
