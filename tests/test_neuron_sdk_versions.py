"""The Neuron SDK range neuron-export supports (SDK 2.21 to 2.31: torch-neuronx 2.5 to 2.9), checked from the
installed distributions' metadata: a torch other than the one torch-neuronx requires is refused before anything
is loaded; a torch-neuronx outside the range gets one warning line; the manifest records the SDK's versions.

Stand-in distributions (dist-info folders written here) come first on the path, ahead of the recording
torch_neuronx test double in tests/doubles, which does the tracing."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest

DOUBLES = Path(__file__).parent / "doubles"
TORCH = metadata.version("torch")  # this machine's, 2.13.0


@pytest.fixture
def sdk(monkeypatch, tmp_path):
    """Installs stand-in distributions: sdk("torch-neuronx", "2.8.0.2.10", "torch==2.8.*")."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(DOUBLES))
    monkeypatch.syspath_prepend(str(site))  # ahead of the double's own torch_neuronx dist-info
    for name in [name for name in sys.modules if name.split(".")[0] in ("torch_neuronx", "neuronxcc")]:
        monkeypatch.delitem(sys.modules, name)
    for key in ("TORCH_NEURONX_RECORD", "TORCH_NEURONX_FAIL_ON"):
        monkeypatch.delenv(key, raising=False)

    def install(name: str, version: str, *requires: str) -> None:
        folder = site / f"{name.replace('-', '_')}-{version}.dist-info"
        folder.mkdir()
        lines = [
            "Metadata-Version: 2.1",
            f"Name: {name}",
            f"Version: {version}",
            *(f"Requires-Dist: {r}" for r in requires),
        ]
        (folder / "METADATA").write_text("\n".join(lines) + "\n")

    yield install
    for name in [name for name in sys.modules if name.split(".")[0] in ("torch_neuronx", "neuronxcc")]:
        sys.modules.pop(name, None)


def test_a_torch_that_torch_neuronx_was_not_built_for_is_refused_before_any_work(sdk, cli, tiny_model, tmp_path):
    sdk("torch-neuronx", "2.8.0.2.10", "torch==2.8.*", "neuronx-cc==2.*")
    output = tmp_path / "out"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "neuron", "-o", output)
    assert result.exit_code == 2, result
    assert result.stderr.strip() == (
        f"neuron-export: error: --backend neuron: torch-neuronx 2.8.0.2.10 requires torch==2.8.*, but torch {TORCH} "
        "is installed; install that torch (pip install 'torch==2.8.*') or run in the Neuron SDK's own virtualenv."
    )
    assert result.stdout == "" and not output.exists()  # before the plan: nothing loaded, nothing built
    assert "torch_neuronx" not in sys.modules  # not even imported: a mismatched pair may crash on import

    auto = cli("plan", "sd", "-m", tiny_model("sd"), "--backend", "auto")
    assert auto.exit_code == 2 and "--backend auto: torch-neuronx 2.8.0.2.10 requires torch==2.8.*" in auto.stderr


def test_a_torch_neuronx_outside_the_range_is_a_warning_not_a_refusal(sdk, cli, tiny_model):
    release = ".".join(TORCH.split("+")[0].split(".")[:2])
    sdk("torch-neuronx", "2.10.0.1.0", f"torch=={release}.*")  # a later SDK, built for this torch
    result = cli("plan", "sd", "-m", tiny_model("sd"), "--backend", "neuron")
    assert result.exit_code == 0, result
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "neuron-export: warning: torch-neuronx 2.10.0.1.0 is outside the range neuron-export "
        "supports (Neuron SDK 2.21 to 2.31: torch-neuronx 2.5 to 2.9); continuing."
    ]


def test_a_torch_neuronx_inside_the_range_and_matching_torch_is_silent(sdk, cli, tiny_model):
    release = ".".join(TORCH.split("+")[0].split(".")[:2])
    sdk("torch-neuronx", "2.9.0.2.15", f"torch=={release}.*")
    result = cli("plan", "sd", "-m", tiny_model("sd"), "--backend", "neuron")
    assert result.exit_code == 0 and "warning" not in result.stderr, result


def test_the_manifest_records_the_sdk_versions(sdk, cli, tiny_model, tmp_path):
    sdk("torch-neuronx", "2.8.0.2.10")  # no torch requirement: this stand-in goes with any torch
    sdk("neuronx-cc", "2.21.18209.0")
    sdk("neuronx-distributed", "0.15.22404")
    output = tmp_path / "out"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "neuron", "-o", output, "--components", "vae_decoder")
    assert result.exit_code == 0, result
    environment = json.loads((output / "manifest.json").read_text())["environment"]
    assert {key: environment[key] for key in ("torch", "torch_neuronx", "neuronx_cc", "neuronx_distributed")} == {
        "torch": TORCH,
        "torch_neuronx": "2.8.0.2.10",
        "neuronx_cc": "2.21.18209.0",
        "neuronx_distributed": "0.15.22404",
    }
