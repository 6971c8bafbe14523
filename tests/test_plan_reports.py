"""`plan` reports rather than refuses: a Neuron plan on a host without the SDK, and an output that exists.
What it reports, an export of the same flags still refuses."""

from __future__ import annotations

import json

import pytest


def plan_json(cli, *args) -> dict:
    result = cli("plan", *args, "--json")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def test_a_neuron_plan_needs_no_sdk_and_says_it_is_not_installed(cli, tiny_model, tmp_path):
    from neuron_export.compiler import neuron_sdk_error

    assert neuron_sdk_error() is not None  # this host has no torch_neuronx
    args = ["sd", "-m", tiny_model("sd"), "--backend", "neuron", "-o", tmp_path / "out"]
    plan = plan_json(cli, *args)
    assert plan["backend"] == "neuron" and plan["notes"][0].startswith("SDK not installed")
    unet = next(c for c in plan["components"] if c["component"] == "unet")
    assert (
        unet["compiler_args"][:2] == ["--auto-cast", "matmult"]
        and "--model-type=unet-inference" in unet["compiler_args"]
    )
    shown = cli("plan", *args)
    assert shown.exit_code == 0 and "note: SDK not installed" in shown.stdout, shown

    refused = cli(*args)  # exporting still needs the SDK
    assert refused.exit_code == 2 and "--backend neuron needs the AWS Neuron SDK" in refused.stderr
    assert not (tmp_path / "out").exists()


def test_a_plan_reports_what_an_export_would_do_with_an_existing_output(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    args = ["sd", "-m", tiny_model("sd"), "--backend", "cpu", "--components", "vae_decoder", "-o", output]
    assert cli(*args).exit_code == 0
    same = plan_json(cli, *args)
    assert same["up_to_date"] is True and same["notes"] == []

    other = plan_json(cli, *args, "--height", "128")
    assert other["up_to_date"] is False and [c["cache"] for c in other["components"]] == ["miss"]
    (note,) = other["notes"]
    assert note.startswith("an export would be refused: --output") and "--force" in note
    assert plan_json(cli, *args, "--height", "128", "--force")["notes"] == [
        f"--output {output} exists; an export would replace it (--force)."
    ]
    assert cli(*args, "--height", "128").exit_code == 2  # the export refuses what the plan reported

    stranger = tmp_path / "not-an-export"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    (note,) = plan_json(cli, *args[:-1], stranger)["notes"]
    assert "is not a neuron-export export" in note


def test_the_python_api_plans_an_existing_output_and_exports_refuse_it(tiny_model, tmp_path):
    import neuron_export

    options = {
        "model": str(tiny_model("sd")),
        "backend": "cpu",
        "components": ["vae_decoder"],
        "output": str(tmp_path / "out"),
    }
    neuron_export.export("sd", **options)
    plan = neuron_export.plan("sd", height=128, **options)
    assert plan.notes and "would be refused" in plan.notes[0]
    with pytest.raises(neuron_export.ExportError, match="already exists"):
        neuron_export.export(plan)
