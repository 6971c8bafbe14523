"""The same cache key builds the same bytes anywhere: two installs of neuron-export in different places,
each with its own cache, export the same model; the keys and every artifact byte agree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import neuron_export

PACKAGE = Path(neuron_export.__file__).parent


def install_copy(root: Path) -> dict[str, str]:
    """The package copied under `root`, and the environment that runs that copy (and no other)."""
    shutil.copytree(PACKAGE, root / "neuron_export", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(root), "NEURON_EXPORT_CACHE": str(root / "cache")}
    where = subprocess.run(
        [sys.executable, "-c", "import neuron_export; print(neuron_export.__file__)"],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(root)
    return env


def test_two_install_locations_build_byte_identical_artifacts(tiny_model, tmp_path):
    model = tiny_model("sd")
    installs = [tmp_path / "a", tmp_path / "an-install-with-a-longer-path"]
    # a text encoder (transformers' code) and a VAE half (diffusers' and our wrapper's) cover every source;
    # both installs export at once, each into its own cache
    exports = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "neuron_export",
                "sd",
                "-m",
                str(model),
                "--backend",
                "cpu",
                "--components",
                "text_encoder,vae_decoder",
                "-o",
                str(root / "out"),
                "--json",
            ],
            env=install_copy(root),
            cwd=root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for root in installs
    ]
    manifests = []
    for root, export in zip(installs, exports):
        stdout, stderr = export.communicate(timeout=600)
        assert export.returncode == 0, stderr[-2000:]
        assert {c["origin"] for c in json.loads(stdout)["components"].values()} == {"built"}
        manifests.append(json.loads((root / "out" / "manifest.json").read_text()))

    first, second = (m["components"] for m in manifests)
    assert {n: c["cache_key"] for n, c in first.items()} == {n: c["cache_key"] for n, c in second.items()}
    assert len(first) == 2
    for name in first:
        a, b = (root / "out" / name / "model.neuron" for root in installs)
        assert a.read_bytes() == b.read_bytes(), f"{name}: same key, different bytes"
        assert first[name]["files"] == second[name]["files"]
        # No record names where anything was installed: neither our package nor the libraries it traced.
        with zipfile.ZipFile(a) as archive:
            for record in archive.namelist():
                data = archive.read(record)
                for place in (str(installs[0]), sysconfig.get_paths()["purelib"]):
                    assert place.encode() not in data, f"{name}: {record} records {place}"


def test_another_version_of_a_traced_library_gets_other_keys(tiny_model, monkeypatch):
    """diffusers' code is what gets traced: a host with another diffusers must not share our entries."""
    import neuron_export.version

    def keys() -> list[str]:
        return [job.cache_key for job in neuron_export.plan("sd", model=str(tiny_model("sd")), backend="cpu").jobs]

    before = keys()
    real_version = neuron_export.version.installed_version
    monkeypatch.setattr(
        neuron_export.version, "installed_version", lambda name: "0.0.1" if name == "diffusers" else real_version(name)
    )
    after = keys()
    assert len(before) == 4 and all(a != b for a, b in zip(before, after))


def test_a_sharded_roles_weight_shards_are_the_same_bytes_from_every_process(tiny_model, tmp_path):
    """A T5 at --tensor-parallel-size 2 built by three processes, each with its own cache: every rank's
    weights/ shard is the same file (its safetensors header included), as a Ray node's or another host's build."""
    model = tiny_model("flux")
    roots = [tmp_path / name for name in ("a", "b", "c")]
    command = [sys.executable, "-m", "neuron_export", "flux", "-m", str(model), "--backend", "cpu"]
    command += ["--components", "text_encoder_2", "--tensor-parallel-size", "2", "--disable-validation"]
    exports = [
        subprocess.Popen(
            [*command, "-o", str(root / "out")],
            env={**os.environ, "NEURON_EXPORT_CACHE": str(root / "cache")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for root in roots
    ]
    for export in exports:
        _, stderr = export.communicate(timeout=600)
        assert export.returncode == 0, stderr[-2000:]
    shards = [f"text_encoder_2/weights/tp{rank}_sharded_checkpoint.safetensors" for rank in (0, 1)]
    for name in shards:
        first, *others = ((root / "out" / name).read_bytes() for root in roots)
        assert all(other == first for other in others), f"{name}: same key, different bytes"
