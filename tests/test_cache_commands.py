"""`neuron-export cache ls | rm | prune | du | verify`: which model an entry belongs to, removing one entry,
what pruning really frees, and the remote cache only with --remote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def export(cli, model: Path, family: str, output: Path, components: str, *extra) -> None:
    result = cli(family, "-m", model, "--backend", "cpu", "-o", output, "--components", components, *extra)
    assert result.exit_code == 0, result


def entries(cli, *args) -> list[dict]:
    result = cli("cache", "ls", "--json", *args)
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


def test_cache_ls_names_the_model_of_each_entry_and_filters_by_it(cli, tiny_model, tmp_path):
    sd, sdxl = tiny_model("sd"), tiny_model("sdxl")
    export(cli, sd, "sd", tmp_path / "sd", "unet")
    export(cli, sdxl, "sd-xl", tmp_path / "xl", "vae_decoder,text_encoder_2")
    listed = entries(cli)
    assert sorted((e["component"], e["model"]) for e in listed) == sorted(
        [("unet", str(sd)), ("vae_decoder", str(sdxl)), ("text_encoder_2", str(sdxl))]
    )
    assert all(len(e["key"]) == 64 and e["size_bytes"] > 0 and e["backend"] == "cpu" for e in listed)

    lines = cli("cache", "ls").stdout.splitlines()
    assert len(lines) == 3 and any("unet" in line and str(sd) in line for line in lines)
    only_xl = entries(cli, "--model", sdxl.name.upper())  # a case-insensitive part of the hub id or path
    assert sorted(e["component"] for e in only_xl) == ["text_encoder_2", "vae_decoder"]
    assert entries(cli, "--model", "no-such-model") == []


def test_cache_rm_removes_the_entries_named_by_key(cli, tiny_model, tmp_path, isolated_cache):
    export(cli, tiny_model("sd"), "sd", tmp_path / "out", "unet,vae_decoder")
    listed = {e["component"]: e["key"] for e in entries(cli)}
    before = sorted(isolated_cache.glob("components/*/*"))

    for key, problem in (("ffffffffffff0", "matches no entry"), ("", "matches 2 entries")):
        refused = cli("cache", "rm", key, listed["unet"][:12])
        assert refused.exit_code == 2 and problem in refused.stderr and "cache ls" in refused.stderr, refused
        assert len(refused.stderr.strip().splitlines()) == 1
        assert sorted(isolated_cache.glob("components/*/*")) == before  # all resolved before anything goes

    removed = cli("cache", "rm", listed["unet"][:12])
    assert removed.exit_code == 0 and removed.stdout.startswith(f"removed {listed['unet'][:12]}  unet"), removed
    assert [e["component"] for e in entries(cli)] == ["vae_decoder"]
    rebuilt = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "cpu",
        "-o",
        tmp_path / "again",
        "--components",
        "unet,vae_decoder",
        "--json",
    )
    assert {k: v["origin"] for k, v in json.loads(rebuilt.stdout)["components"].items()} == {
        "unet": "built",
        "vae_decoder": "cached",
    }


def test_prune_says_which_bytes_exports_still_hard_link(cli, tiny_model, tmp_path, isolated_cache):
    from neuron_export.format import human_bytes

    export(cli, tiny_model("sd"), "sd", tmp_path / "out", "vae_decoder")
    artifact_size = (tmp_path / "out" / "vae_decoder" / "model.neuron").stat().st_size
    dry = cli("cache", "prune", "--all", "--dry-run").stdout.splitlines()
    assert "still hard-linked by an export" in dry[0]
    assert f"0 B would be freed, {human_bytes(artifact_size)} stays in use by exports" in dry[-1], dry

    shutil.rmtree(tmp_path / "out")
    dry = cli("cache", "prune", "--all", "--dry-run").stdout.splitlines()
    assert "hard-link" not in "\n".join(dry) and dry[-1].startswith(
        f"would remove 1 entries ({human_bytes(artifact_size)}) from {isolated_cache}"
    )


def test_a_remote_cache_url_alone_does_not_make_cache_commands_act_on_the_remote(
    cli, tiny_model, tmp_path, monkeypatch
):
    url = f"file://{tmp_path / 'shared'}"
    export(
        cli,
        tiny_model("sd"),
        "sd",
        tmp_path / "out",
        "vae_decoder",
        "--remote-cache",
        url,
        "--remote-cache-allow-unsigned",
    )  # a private bucket: this host uploads without a signing key
    shutil.rmtree(tmp_path / "out")
    assert len(entries(cli, "--remote", "--remote-cache", url)) == 1

    pruned = cli("cache", "prune", "--all", "--remote-cache", url)
    assert pruned.exit_code == 0 and "removed 1 entries" in pruned.stdout, pruned
    assert "local cache" in pruned.stderr and "add --remote" in pruned.stderr
    assert entries(cli) == []
    assert len(entries(cli, "--remote", "--remote-cache", url)) == 1  # the shared cache is untouched
    monkeypatch.setenv("NEURON_EXPORT_REMOTE_CACHE", url)
    for command in (["ls"], ["du"], ["verify"], ["prune", "--all"]):
        result = cli("cache", *command)
        assert result.exit_code == 0 and url not in result.stdout, result
    assert len(entries(cli, "--remote")) == 1
    pruned = cli("cache", "prune", "--all", "--remote")
    assert pruned.stdout.splitlines()[-1].startswith("removed 1 entries") and url in pruned.stdout
    assert entries(cli, "--remote") == []
