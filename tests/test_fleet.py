"""Fanning exports out without Ray: `plan --json` lists one build per cache key, each CI runner builds one into
the shared remote cache, and a last runner assembles the exports from it. And --executor ray's checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MATRIX = ("--backend", "cpu", "--height", "64,128", "--components", "text_encoder,vae_decoder")


def manifests(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/manifest.json"))]


def test_plan_json_lists_each_key_once_and_ci_runners_build_exactly_those(cli, tiny_model, tmp_path, monkeypatch):
    model = tiny_model("sd")
    remote = f"file://{tmp_path / 'remote'}"
    planned = cli("plan", "sd", "-m", model, *MATRIX, "--remote-cache", remote, "--json")
    assert planned.exit_code == 0, planned
    builds = json.loads(planned.stdout)["builds"]
    # two shapes share the text encoder: three keys, none cached anywhere yet
    assert sorted(b["component"] for b in builds) == ["text_encoder", "vae_decoder", "vae_decoder"]
    assert [b["cached"] for b in builds] == [False] * 3
    assert all(b["estimated_peak_bytes"] > 0 and b["estimated_seconds"] > 0 for b in builds)
    assert len(builds[0]["outputs"]) == 2

    key = tmp_path / "ci-key"  # the runners sign with it (a CI secret); the assembler trusts its public key
    assert cli("cache", "keygen", key).exit_code == 0
    monkeypatch.setenv("NEURON_EXPORT_REMOTE_CACHE_SIGNING_KEY", str(key))
    for number, build in enumerate(builds):  # one CI runner per key, each with a fresh local cache
        monkeypatch.setenv("NEURON_EXPORT_CACHE", str(tmp_path / f"runner-{number}-cache"))
        job = tmp_path / f"job-{number}.yaml"
        job.write_text(json.dumps(build["config"]))
        result = cli("build", job, "--remote-cache", remote, "-o", tmp_path / f"runner-{number}", "--json")
        assert result.exit_code == 0, result
        built = json.loads(result.stdout)["components"]
        assert {name: c["origin"] for name, c in built.items()} == {build["component"]: "built"}
        record = json.loads((tmp_path / f"runner-{number}" / "manifest.json").read_text())
        assert record["components"][build["component"]]["cache_key"] == build["cache_key"]

    monkeypatch.setenv("NEURON_EXPORT_CACHE", str(tmp_path / "assembler-cache"))
    monkeypatch.delenv("NEURON_EXPORT_REMOTE_CACHE_SIGNING_KEY")
    monkeypatch.setenv("NEURON_EXPORT_REMOTE_CACHE_TRUSTED_KEYS", (tmp_path / "ci-key.pub").read_text())
    again = json.loads(cli("plan", "sd", "-m", model, *MATRIX, "--remote-cache", remote, "--json").stdout)["builds"]
    assert [(b["cache_key"], b["cached_where"]) for b in again] == [(b["cache_key"], "remote") for b in builds]
    final = cli("sd", "-m", model, *MATRIX, "--remote-cache", remote, "-o", tmp_path / "exports", "--json")
    assert final.exit_code == 0, final
    exports = json.loads(final.stdout)["exports"]
    # nothing built here: the first export downloads both, the second only its own VAE decoder
    assert [{n: c["origin"] for n, c in e["components"].items()} for e in exports] == [
        {"text_encoder": "downloaded", "vae_decoder": "downloaded"},
        {"text_encoder": "cached", "vae_decoder": "downloaded"},
    ]
    assembled = {c["cache_key"] for m in manifests(tmp_path / "exports") for c in m["components"].values()}
    assert assembled == {b["cache_key"] for b in builds}


def test_executor_ray_without_ray_installed_fails_at_once_with_the_install_command(tiny_model, tmp_path):
    hide_ray = (
        "import sys\n"
        "class HideRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, HideRay())\n"
        "from neuron_export.cli.main import main\n"
        "main(sys.argv[1:])\n"
    )
    cache = tmp_path / "cache"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            hide_ray,
            "sd",
            "-m",
            str(tiny_model("sd")),
            "--backend",
            "cpu",
            "--executor",
            "ray",
            "--ray-address",
            "127.0.0.1:1",
            "--remote-cache",
            f"file://{tmp_path / 'remote'}",
            "--cache-dir",
            str(cache),
            "-o",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "neuron-export: error: executor 'ray' needs Ray, which is not installed; run "
        "pip install 'neuron-export[ray]', or use --executor local."
    )
    assert not cache.exists() and not (tmp_path / "out").exists()  # refused before anything was read or written


def test_executor_ray_needs_a_cluster_and_a_remote_cache(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("NEURON_EXPORT_REMOTE_CACHE", raising=False)
    base = ("sd", "-m", tiny_model("sd"), "--backend", "cpu", "--executor", "ray", "-o", tmp_path / "out")
    no_cluster = cli(*base, "--remote-cache", f"file://{tmp_path}")
    assert no_cluster.exit_code == 2 and "executor 'ray' needs a cluster; pass --ray-address" in no_cluster.stderr
    no_remote = cli(*base, "--ray-address", "127.0.0.1:1")
    assert no_remote.exit_code == 2 and "executor 'ray' needs --remote-cache URL" in no_remote.stderr
    monkeypatch.delenv("NEURON_EXPORT_REMOTE_CACHE_SIGNING_KEY", raising=False)
    no_key = cli(*base, "--ray-address", "127.0.0.1:1", "--remote-cache", f"file://{tmp_path}")
    assert no_key.exit_code == 2 and "executor 'ray' needs --remote-cache-signing-key FILE" in no_key.stderr, no_key
    assert not (tmp_path / "out").exists()


def test_several_configs_plan_as_one_set_of_builds(cli, tiny_model, tmp_path):
    model = tiny_model("sd")
    configs = []
    for side in (64, 128):
        config = tmp_path / f"sd-{side}.yaml"
        config.write_text(
            f"family: sd\nmodel: {model}\nbackend: cpu\nheight: {side}\nwidth: {side}\n"
            f"components: [text_encoder, unet]\noutput: {tmp_path / f'out-{side}'}\n"
        )
        configs.append(config)
    planned = cli("plan", "build", *configs, "--json")
    assert planned.exit_code == 0, planned
    builds = json.loads(planned.stdout)["builds"]
    assert [(b["component"], len(b["outputs"])) for b in builds] == [("text_encoder", 2), ("unet", 1), ("unet", 1)]

    clash = tmp_path / "clash.yaml"
    clash.write_text(configs[1].read_text().replace("width: 128", "width: 64"))  # another export, same output
    refused = cli("build", configs[1], clash)
    assert refused.exit_code == 2
    assert f"Two exports would both write --output {tmp_path / 'out-128'}" in refused.stderr
    assert not (tmp_path / "out-128").exists()
