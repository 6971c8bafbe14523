"""The Neuron backend's contract with torch_neuronx, checked through a recording test double.

The double stands in for the real SDK (absent here): it records each `torch_neuronx.trace` call and then
traces on the CPU, so everything around the compiler call runs for real.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

FAST = "--enable-fast-loading-neuron-binaries"


class RecordingTorchNeuronx(types.ModuleType):
    """Test double of the `torch_neuronx` module: records trace() calls instead of compiling."""

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__("torch_neuronx")
        self.__spec__ = importlib.machinery.ModuleSpec("torch_neuronx", None)  # libraries probe find_spec
        self.calls: list[dict] = []
        self.fail_on = fail_on

    def trace(self, func, example_inputs, *, compiler_args=None, inline_weights_to_neff=True, compiler_workdir=None):
        component = Path(compiler_workdir).name
        self.calls.append({
            "component": component,
            "compiler_args": list(compiler_args),
            "inline_weights_to_neff": inline_weights_to_neff,
            "compiler_workdir": compiler_workdir,
            "input_shapes": [tuple(t.shape) for t in example_inputs],
            "environment": {k: os.environ.get(k) for k in ("NEURON_FUSE_SOFTMAX", "NEURON_CUSTOM_SILU")},
        })
        if component == self.fail_on:
            Path(compiler_workdir, "log-neuron-cc.txt").write_text("ERROR: out of memory\n")
            raise RuntimeError("neuronx-cc failed with exit code -9")
        return torch.jit.trace(func, tuple(example_inputs), strict=False, check_trace=False)


@pytest.fixture
def neuron_sdk(monkeypatch):
    """Install the double (and a neuronx-cc version) as if the SDK were present."""
    def install(**kwargs) -> RecordingTorchNeuronx:
        double = RecordingTorchNeuronx(**kwargs)
        compiler = types.ModuleType("neuronxcc")
        compiler.__version__ = "2.99.0.test"
        compiler.__spec__ = importlib.machinery.ModuleSpec("neuronxcc", None)
        monkeypatch.setitem(sys.modules, "torch_neuronx", double)
        monkeypatch.setitem(sys.modules, "neuronxcc", compiler)
        monkeypatch.delenv("NEURON_FUSE_SOFTMAX", raising=False)
        monkeypatch.delenv("NEURON_CUSTOM_SILU", raising=False)
        return double
    return install


def calls_by_component(double: RecordingTorchNeuronx) -> dict[str, dict]:
    return {call["component"]: call for call in double.calls}


def test_sd_export_passes_the_flag_table_to_torch_neuronx_trace(neuron_sdk, cli, tiny_model, tmp_path):
    double = neuron_sdk()
    output = tmp_path / "sd_neuron"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "neuron", "-o", output, "--json")
    assert result.exit_code == 0, result
    calls = calls_by_component(double)
    assert list(calls) == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    common = ["--auto-cast", "matmult", "--auto-cast-type", "bf16", "--optlevel", "2", "--target", "inf2"]
    assert calls["text_encoder"]["compiler_args"] == common + ["--model-type=transformer", FAST]
    assert calls["unet"]["compiler_args"] == common + [FAST, "--model-type=unet-inference"]
    assert calls["vae_encoder"]["compiler_args"] == common + [FAST, "--model-type=unet-inference"]
    assert calls["vae_decoder"]["compiler_args"] == common + [FAST, "--model-type=unet-inference"]
    for call in calls.values():
        assert call["inline_weights_to_neff"] is True
        assert call["environment"] == {"NEURON_FUSE_SOFTMAX": "1", "NEURON_CUSTOM_SILU": "1"}
        workdir = Path(call["compiler_workdir"])
        assert not workdir.is_relative_to(output) and not workdir.exists()  # beside the export, removed after success
    assert calls["unet"]["input_shapes"] == [(1, 4, 8, 8), (1,), (1, 77, 32)]
    assert "NEURON_FUSE_SOFTMAX" not in os.environ  # set only while compiling

    manifest = json.loads((output / "manifest.json").read_text())
    for name, record in manifest["components"].items():
        assert record["backend"] == "neuron" and record["compiler_type"] == "neuronx-cc"
        assert record["compiler_version"] == "2.99.0.test"
        assert record["compiler_args"] == calls[name]["compiler_args"]
        assert record["validation"] == {"status": "skipped", "reason": "skipped: no Neuron device",
                                        "max_abs_diff": None, "atol": record["validation"]["atol"]}
        neuron = json.loads((output / name / "config.json").read_text())["neuron"]
        assert neuron["compiler_type"] == "neuronx-cc" and neuron["compiler_version"] == "2.99.0.test"
    assert not list(tmp_path.glob(".sd_neuron.*"))


def test_sdxl_unet_is_compiled_without_fast_loading(neuron_sdk, cli, tiny_model, tmp_path):
    double = neuron_sdk()
    result = cli("sd-xl", "-m", tiny_model("sdxl"), "--backend", "auto", "-o", tmp_path / "xl")
    assert result.exit_code == 0, result
    calls = calls_by_component(double)
    assert list(calls) == ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"]
    assert FAST not in calls["unet"]["compiler_args"] and "--model-type=unet-inference" in calls["unet"]["compiler_args"]
    assert calls["text_encoder_2"]["compiler_args"][-2:] == ["--model-type=transformer", FAST]
    assert [s for s in calls["unet"]["input_shapes"]] == [(1, 4, 8, 8), (1,), (1, 77, 64), (1, 32), (1, 6)]


def test_target_optlevel_auto_cast_and_inline_flags_reach_the_compiler(neuron_sdk, cli, tiny_model, tmp_path):
    double = neuron_sdk()
    output = tmp_path / "trn"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "neuron", "-o", output, "--target", "trn1", "-O", "3",
                 "--auto-cast", "none", "--no-inline-weights", "--components", "unet")
    assert result.exit_code == 0, result
    (call,) = double.calls
    assert call["compiler_args"] == ["--auto-cast", "none", "--optlevel", "3", "--target", "trn1", FAST,
                                     "--model-type=unet-inference"]
    assert call["inline_weights_to_neff"] is False
    neuron = json.loads((output / "unet" / "config.json").read_text())["neuron"]
    assert neuron["inline_weights_to_neff"] is False and neuron["optlevel"] == "3" and neuron["instance_type"] == "trn1"


def test_a_failed_compile_keeps_the_work_dir_and_writes_no_export(neuron_sdk, cli, tiny_model, tmp_path):
    neuron_sdk(fail_on="unet")
    output = tmp_path / "sd_neuron"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "neuron", "-o", output)
    assert result.exit_code == 1
    assert "Compiling unet failed" in result.stderr and "exit code -9" in result.stderr
    assert "Traceback" not in result.stderr
    workdir = tmp_path / ".sd_neuron.neuron-work" / "unet"
    assert str(workdir) in result.stderr
    assert (workdir / "log-neuron-cc.txt").read_text() == "ERROR: out of memory\n"
    assert not output.exists() and not list(tmp_path.glob(".sd_neuron.partial-*"))


def test_cpu_backend_records_no_compiler_flags_but_the_neuron_ones_for_reference(cli, tiny_model, tmp_path):
    output = tmp_path / "cpu"
    assert cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet").exit_code == 0
    record = json.loads((output / "manifest.json").read_text())["components"]["unet"]
    assert record["compiler_args"] == [] and record["compiler_type"] == "torchscript-cpu"
    assert "--model-type=unet-inference" in record["neuron_compiler_args"]
