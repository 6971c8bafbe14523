"""--executor ray on a real two-node Ray cluster on 127.0.0.1, started and stopped by the module's fixture:
a shape matrix fans out as one set of tasks, each cache key built once, results through a file:// remote
cache; a lost node's task runs again on the other node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import hub_repository
from ray_cluster import LOCAL_ONLY, two_node_cluster

import neuron_export
from neuron_export.events import BuildEvent, Stage


@pytest.fixture(scope="module")
def node_hub_cache(tmp_path_factory) -> Path:
    """The nodes' own Hub cache, offline: what they download from the Hub is what a test puts in it."""
    return tmp_path_factory.mktemp("node-hub-cache")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory, node_hub_cache):
    hub = {"HF_HUB_CACHE": str(node_hub_cache), "HF_HUB_OFFLINE": "1"}
    with two_node_cluster(tmp_path_factory.mktemp("node-caches"), env=hub) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory) -> Path:
    """Nodes sign what they upload with it: every node reads it at the same path (one host here)."""
    from helpers import run_cli

    key = tmp_path_factory.mktemp("key") / "cluster-key"
    assert run_cli("cache", "keygen", key).exit_code == 0
    return key


def entries(cache: Path) -> list[str]:
    return sorted(p.parent.name for p in cache.glob("components/*/*/record.json"))


def test_a_2x2_shape_matrix_builds_each_key_once_over_two_nodes(
    ray_cluster, cli, tiny_model, tmp_path, monkeypatch, signing_key
):
    model = tiny_model("sd")
    matrix = (
        "-m",
        model,
        "--backend",
        "cpu",
        "--height",
        "64,128",
        "--width",
        "64,128",
        "--components",
        "text_encoder,vae_decoder",
    )
    remote = tmp_path / "remote"
    ray_options = (
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster.address,
        "--remote-cache",
        f"file://{remote}",
        "--remote-cache-signing-key",
        signing_key,
    )
    builds = json.loads(cli("plan", "sd", *matrix, *ray_options, "--json").stdout)["builds"]
    assert len(builds) == 5  # one text encoder for all four shapes, four VAE decoders

    events: list[BuildEvent] = []
    neuron_export.export(  # the API the CLI calls, with the same options
        "sd",
        model=str(model),
        backend="cpu",
        height=[64, 128],
        width=[64, 128],
        components=["text_encoder", "vae_decoder"],
        executor="ray",
        ray_address=ray_cluster.address,
        remote_cache=f"file://{remote}",
        remote_cache_signing_key=str(signing_key),
        output=tmp_path / "exports",
        on_event=events.append,
    )
    keys = {b["cache_key"] for b in builds}
    # each key built once, on one node or the other, and handed over through the remote cache
    on_nodes = entries(ray_cluster.caches["head"]) + entries(ray_cluster.caches["worker"])
    assert sorted(on_nodes) == sorted(keys)
    assert {p.parent.name for p in remote.glob("*/record.json")} == keys
    # every task's events name its node, and both nodes took some; none needed a second attempt
    done = [event for event in events if event.stage == Stage.DONE and event.node is not None]
    assert len(done) == 5 and {event.attempt for event in done} == {1}
    assert {event.node for event in done} == {ray_cluster.node_label(n) for n in (ray_cluster.head, ray_cluster.worker)}
    assert [event.stage for event in events].count(Stage.QUEUED) == 5
    exports = sorted((tmp_path / "exports").glob("*/manifest.json"))
    assert len(exports) == 4
    for manifest in map(json.loads, (p.read_text() for p in exports)):
        assert {c["origin"] for c in manifest["components"].values()} == {"downloaded"}

    # the bytes a cluster node built are the bytes a local build makes
    local = cli(
        "sd",
        "-m",
        model,
        "--backend",
        "cpu",
        "--height",
        "64",
        "--width",
        "64",
        "--components",
        "vae_decoder",
        "-o",
        tmp_path / "local",
    )
    assert local.exit_code == 0, local
    assert (tmp_path / "local" / "vae_decoder" / "model.neuron").read_bytes() == (
        tmp_path / "exports" / f"{model.name}-sd-neuron-64x64-b1" / "vae_decoder" / "model.neuron"
    ).read_bytes()


def test_a_task_whose_node_is_lost_runs_again_on_the_other(ray_cluster, tiny_model, tmp_path, signing_key):
    worker_label = ray_cluster.node_label(ray_cluster.worker)
    command = [
        sys.executable,
        "-m",
        "neuron_export",
        "sd",
        "-m",
        str(tiny_model("sd")),
        "--backend",
        "cpu",
        "--height",
        "64,128",
        "--components",
        "unet,vae_encoder",
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster.address,
        "--remote-cache",
        f"file://{tmp_path / 'remote'}",
        "--remote-cache-signing-key",
        str(signing_key),
        "-o",
        str(tmp_path / "exports"),
    ]
    env = {**os.environ, **LOCAL_ONLY, "PYTHONUNBUFFERED": "1", "NEURON_EXPORT_CACHE": str(tmp_path / "cache")}
    exporter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, lost = [], None
    try:
        for line in exporter.stdout:
            lines.append(line)
            if lost is None and f"started on {worker_label}" in line:
                lost = line.split("]")[1].split(":")[0].strip() + "]"  # the task's label, e.g. "unet 64x64 b1 [..."
                ray_cluster.cluster.remove_node(ray_cluster.worker, allow_graceful=False)
        assert exporter.wait(timeout=300) == 0, "".join(lines)
    finally:
        if exporter.poll() is None:
            exporter.kill()
            exporter.wait()
    output = "".join(lines)
    assert lost is not None, output
    head_label = ray_cluster.node_label(ray_cluster.head)
    assert f"{lost}: started again (attempt 2: its node or worker was lost) on {head_label}" in output
    assert f"{lost}: done on {head_label}" in output
    assert len(list((tmp_path / "exports").glob("*/manifest.json"))) == 2


def hidden_while_the_nodes_build(repositories, here, node_hub_cache, monkeypatch) -> None:
    """Each repository in this host's Hub cache `here` and the nodes' own; `here` is moved out of sight while
    the cluster builds, so a node that reached for the driver's snapshot paths would fail."""
    from neuron_export.build import ray_executor

    for repo, (files, commit) in repositories.items():
        for cache in (here, node_hub_cache):
            hub_repository(cache, repo, files, commit)
    build_on_cluster = ray_executor.build_on_cluster

    def with_snapshots_hidden(plans, on_event):
        hidden = here.rename(here.with_name("hidden"))
        try:
            return build_on_cluster(plans, on_event)
        finally:
            hidden.rename(here)

    monkeypatch.setattr(ray_executor, "build_on_cluster", with_snapshots_hidden)


def test_a_hub_vae_and_a_hub_controlnet_build_on_nodes_without_the_planned_paths(
    ray_cluster, node_hub_cache, cli, tiny_model, tmp_path, monkeypatch, signing_key
):
    """This host's Hub snapshots are out of the nodes' sight while they build: each node fetches the --vae and the
    --controlnet from the Hub (its own cache here, offline) at the commits planned here."""
    here = tmp_path / "hub-cache"
    repositories = {
        "acme/tiny-vae": (tiny_model("sd") / "vae", "1" * 40),
        "acme/tiny-controlnet": (tiny_model("sd-controlnet"), "2" * 40),
    }
    hidden_while_the_nodes_build(repositories, here, node_hub_cache, monkeypatch)
    result = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--vae",
        "acme/tiny-vae",
        "--controlnet",
        "acme/tiny-controlnet",
        "--hub-cache-dir",
        here,
        "--offline",
        "--backend",
        "cpu",
        "--components",
        "vae_decoder,controlnet_0",
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster.address,
        "--remote-cache",
        f"file://{tmp_path / 'remote'}",
        "--remote-cache-signing-key",
        signing_key,
        "-o",
        tmp_path / "export",
    )
    assert result.exit_code == 0, result
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert {name: c["origin"] for name, c in manifest["components"].items()} == {
        "vae_decoder": "downloaded",
        "controlnet_0": "downloaded",
    }  # built on the nodes
    assert manifest["source"]["vae_commit"] == "1" * 40
    assert [c["commit"] for c in manifest["source"]["controlnets"]] == ["2" * 40]


def test_a_hub_ip_adapter_and_a_hub_lora_build_on_nodes_without_the_planned_paths(
    ray_cluster, node_hub_cache, cli, tiny_model, tmp_path, monkeypatch, signing_key
):
    """The UNet reads files of two other sources (the IP-Adapter traced in, the LoRA fused in), and the image
    encoder comes from the IP-Adapter's repository: with this host's snapshots hidden, each node fetches them from
    the Hub at the commits planned here (ModelSource.origin names each file's snapshot)."""
    from neuron_export.testing.adapters import IP_ADAPTER_SUBFOLDER, IP_ADAPTER_WEIGHT_NAME
    from neuron_export.testing.lora import LORA_WEIGHT_NAME, build_lora

    build_lora(tiny_model("sd"), tmp_path / "lora", components=("unet",))
    here = tmp_path / "hub-cache"
    repositories = {
        "acme/tiny-ip-adapter": (tiny_model("sd-ip-adapter"), "3" * 40),
        "acme/tiny-lora": (tmp_path / "lora", "4" * 40),
    }
    hidden_while_the_nodes_build(repositories, here, node_hub_cache, monkeypatch)
    result = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--ip-adapter",
        "acme/tiny-ip-adapter",
        "--ip-adapter-subfolder",
        IP_ADAPTER_SUBFOLDER,
        "--ip-adapter-weight-name",
        IP_ADAPTER_WEIGHT_NAME,
        "--lora",
        "acme/tiny-lora",
        "--lora-weight-name",
        LORA_WEIGHT_NAME,
        "--hub-cache-dir",
        here,
        "--offline",
        "--backend",
        "cpu",
        "--components",
        "unet,image_encoder",
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster.address,
        "--remote-cache",
        f"file://{tmp_path / 'remote'}",
        "--remote-cache-signing-key",
        signing_key,
        "-o",
        tmp_path / "export",
    )
    assert result.exit_code == 0, result
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert {name: c["origin"] for name, c in manifest["components"].items()} == {
        "unet": "downloaded",
        "image_encoder": "downloaded",
    }  # built on the nodes
    assert manifest["components"]["unet"]["validation"]["status"] == "passed"


def export_files(directory: Path) -> dict[str, bytes]:
    """Every file of an export but its manifest (which records origins and times), by relative path."""
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


@pytest.mark.parametrize(
    ("family", "example", "options", "sharded"),
    [
        ("pixart", "pixart-sigma", [], {"text_encoder": 1}),
        ("flux", "flux", ["--tensor-parallel-size", "2"], {"text_encoder_2": 2, "transformer": 2}),
    ],
    ids=["pixart-sigma", "flux-tp2"],
)
def test_a_diffusion_transformer_built_on_the_cluster_equals_the_local_build(
    ray_cluster, cli, tiny_model, tmp_path, signing_key, family, example, options, sharded
):
    """`neuron-export pixart|flux ... --executor ray`: every component is built on a node (the sharded roles with
    a weights/ shard per rank) and comes back through the remote cache; the export is the local build's, file for
    file (the CPU backend's bytes depend only on the cache key: tests/test_reproducible.py)."""
    args = [family, "-m", tiny_model(example), "--backend", "cpu", "--height", "64", "--width", "64", *options]
    ray_options = ["--executor", "ray", "--ray-address", ray_cluster.address]
    remote = ["--remote-cache", f"file://{tmp_path / 'remote'}", "--remote-cache-signing-key", signing_key]
    on_cluster = cli(*args, *ray_options, *remote, "-o", tmp_path / "ray", "--json")
    assert on_cluster.exit_code == 0, on_cluster
    components = json.loads(on_cluster.stdout)["components"]
    assert {c["origin"] for c in components.values()} == {"downloaded"}  # built on the nodes
    for component, tp in sharded.items():
        shards = [f["path"] for f in components[component]["files"] if "/weights/" in f["path"]]
        assert shards == [f"{component}/weights/tp{rank}_sharded_checkpoint.safetensors" for rank in range(tp)]
    local = cli(*args, "-o", tmp_path / "local", "--cache-dir", tmp_path / "local-cache", "--json")
    assert local.exit_code == 0, local
    assert {c["origin"] for c in json.loads(local.stdout)["components"].values()} == {"built"}
    ours, theirs = export_files(tmp_path / "ray"), export_files(tmp_path / "local")
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []
