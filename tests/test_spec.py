"""What is built (ExportSpec) apart from how (BuildOptions): the manifest records the spec whole and nothing of how,
neither value is changed once made, and a flag the user typed counts even when it equals its default."""

from __future__ import annotations

import json
from pathlib import Path

from neuron_export.planning.config import BuildOptions, ExportSpec, make_config

PACKAGE = Path(__file__).resolve().parents[1] / "neuron_export"


def test_the_manifest_records_the_spec_whole_and_nothing_of_how(cli, tiny_model, tmp_path):
    key = tmp_path / "signing-key"
    assert cli("cache", "keygen", key).exit_code == 0
    output = tmp_path / "out"
    how = [
        "--jobs",
        "2",
        "--max-memory",
        "8GiB",
        "--cache-dir",
        tmp_path / "cache",
        "--hub-cache-dir",
        tmp_path / "hub",
    ]
    how += ["--token", "hf_secret_token", "--remote-cache", f"file://{tmp_path / 'remote'}"]
    how += ["--remote-cache-signing-key", key, "--offline", "--force"]
    what = ["sd", "-m", tiny_model("sd"), "--backend", "cpu", "--components", "vae_decoder", "-o", output]
    assert cli(*what, *how).exit_code == 0

    text = (output / "manifest.json").read_text()
    recorded = json.loads(text)["config"]
    assert set(recorded) == set(ExportSpec.model_fields)  # every field of what is built, and only those
    assert not set(ExportSpec.model_fields) & set(BuildOptions.model_fields)
    assert "hf_secret_token" not in text and str(key) not in text and str(tmp_path / "cache") not in text
    assert ExportSpec.model_validate(recorded).model_dump(mode="json") == recorded  # the spec, whole and valid

    # How it is built does not make it another export: other options, the same export, up to date.
    rerun = cli(*what, "--jobs", "1")
    assert rerun.exit_code == 0 and "is up to date" in rerun.stdout, rerun

    # A manifest written before recorded the output too: still this export.
    manifest = json.loads(text)
    manifest["config"]["output"] = str(output)
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    rerun = cli(*what)
    assert rerun.exit_code == 0 and "is up to date" in rerun.stdout, rerun


def test_nothing_in_the_package_changes_a_frozen_value():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "__setattr__" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def test_derived_values_are_made_while_constructing_and_leave_the_options_as_given(monkeypatch, tmp_path):
    monkeypatch.setenv("NEURON_EXPORT_REMOTE_CACHE", f"file://{tmp_path}")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    pix2pix = {"family": "sd", "task": "instruct-pix2pix", "auto_cast": "all"}
    ip_adapter = {"family": "sd", "ip_adapter": "h94/IP-Adapter", "ip_adapter_weight_name": "ip.safetensors"}
    given = json.dumps([pix2pix, ip_adapter])

    options = {"remote_cache_trusted_keys": []}
    halves = [
        ExportSpec.model_validate(pix2pix),
        ExportSpec.model_validate(ip_adapter),
        BuildOptions.model_validate(options),
    ]
    first, second = make_config(pix2pix), make_config(ip_adapter)
    assert json.dumps([pix2pix, ip_adapter]) == given and options == {"remote_cache_trusted_keys": []}  # as given
    assert halves == [first.spec, second.spec, first.options]
    assert (first.spec.model, first.spec.auto_cast_type, first.spec.dynamic_batch_size) == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "bf16",
        True,
    )
    assert second.spec.ip_adapter_scale == 1.0 and second.spec.dynamic_batch_size is False
    assert (first.options.remote_cache, first.options.ray_address) == (f"file://{tmp_path}", "10.0.0.1:6379")
    for config in (first, second):  # deriving again from a derived value changes nothing
        assert ExportSpec(**config.spec.model_dump()) == config.spec
        assert BuildOptions(**config.options.model_dump()) == config.options


def test_a_flag_given_equal_to_its_default_still_overrides_the_yaml_file(cli, tiny_model, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        f"family: sd\nmodel: {tiny_model('sd')}\nbackend: cpu\ncomponents: [vae_decoder]\n"
        "jobs: 2\ndisable_validation: true\n"
    )

    def planned(*flags: str) -> dict:
        result = cli("plan", "build", path, "-o", tmp_path / "out", *flags, "--json")
        assert result.exit_code == 0, result
        return json.loads(result.stdout)

    default = BuildOptions.model_fields["jobs"].default
    assert planned("--jobs", str(default))["jobs"] == default == 1  # typed: it counts, though it is the default
    assert planned("--disable-validation")["builds"][0]["config"]["disable_validation"] is True
    kept = planned()  # not typed: the file's values stand
    assert kept["jobs"] == 2 and kept["builds"][0]["config"]["disable_validation"] is True
