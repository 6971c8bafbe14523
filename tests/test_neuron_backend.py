"""The Neuron backend's contract with torch_neuronx, checked through a recording test double.

The double (tests/doubles/torch_neuronx) stands in for the real SDK, absent here: it records each
`torch_neuronx.trace` call and then traces on the CPU, so everything around the compiler call runs for real,
worker processes included.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conformance.calls import read_trace_calls  # tests/conformance/calls.py: the double's record, merged

FAST = "--enable-fast-loading-neuron-binaries"


DOUBLES = Path(__file__).parent / "doubles"


@pytest.fixture
def neuron_sdk(monkeypatch, tmp_path):
    """Put the recording test doubles of torch_neuronx / neuronxcc on the path, as if the SDK were
    installed; worker processes inherit the path. Returns a function reading the recorded calls."""
    monkeypatch.syspath_prepend(str(DOUBLES))
    for name in double_modules():
        monkeypatch.delitem(sys.modules, name, raising=False)
    for key in (
        "NEURON_FUSE_SOFTMAX",
        "NEURON_CUSTOM_SILU",
        "TORCHDYNAMO_DISABLE",
        "TORCH_NEURONX_RECORD",
        "TORCH_NEURONX_FAIL_ON",
    ):
        monkeypatch.delenv(key, raising=False)
    yield lambda: read_trace_calls(tmp_path / "torch_neuronx_calls.jsonl")
    for name in double_modules():
        sys.modules.pop(name, None)


def double_modules() -> list[str]:
    return [name for name in sys.modules if name.split(".")[0] in ("torch_neuronx", "neuronxcc", "neuronx_distributed")]


def calls_by_component(calls: list[dict]) -> dict[str, dict]:
    return {call["component"]: call for call in calls}


def test_sd_export_passes_the_flag_table_to_torch_neuronx_trace(neuron_sdk, cli, tiny_model, tmp_path):
    output = tmp_path / "sd_neuron"
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "neuron", "-o", output, "--json")
    assert result.exit_code == 0, result
    calls = calls_by_component(neuron_sdk())
    assert list(calls) == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    common = ["--auto-cast", "matmult", "--auto-cast-type", "bf16", "--optlevel", "2", "--target", "inf2"]
    assert calls["text_encoder"]["compiler_args"] == common + ["--model-type=transformer", FAST]
    assert calls["unet"]["compiler_args"] == common + [FAST, "--model-type=unet-inference"]
    assert calls["vae_encoder"]["compiler_args"] == common + [FAST, "--model-type=unet-inference"]
    assert calls["vae_decoder"]["compiler_args"] == common + [FAST, "--model-type=unet-inference"]
    for call in calls.values():
        assert call["inline_weights_to_neff"] is True
        assert call["environment"] == {
            "NEURON_FUSE_SOFTMAX": "1",
            "NEURON_CUSTOM_SILU": "1",
            "TORCHDYNAMO_DISABLE": "1",
        }
        assert call["cpu_backend"] is True  # no Neuron device here: torch-neuronx compiles on the CPU
        workdir = Path(call["compiler_workdir"])
        assert not workdir.is_relative_to(output) and not workdir.exists()  # beside the export, removed after success
    assert calls["unet"]["input_shapes"] == [[1, 4, 8, 8], [1], [1, 77, 32]]
    assert calls["unet"]["input_dtypes"] == ["float32", "float32", "float32"]
    assert {name: call["after_trace"] for name, call in calls.items()} == {
        "text_encoder": ["async_load"],
        "unet": ["async_load", "lazy_load"],
        "vae_encoder": ["async_load"],
        "vae_decoder": ["async_load"],
    }
    assert "NEURON_FUSE_SOFTMAX" not in os.environ  # set only while compiling

    manifest = json.loads((output / "manifest.json").read_text())
    for name, record in manifest["components"].items():
        assert record["backend"] == "neuron" and record["compiler_type"] == "neuronx-cc"
        assert record["compiler_version"] == "2.99.0+test.double"
        assert record["compiler_args"] == calls[name]["compiler_args"]
        assert record["validation"] == {
            "status": "skipped",
            "reason": "skipped: no Neuron device",
            "max_abs_diff": None,
            "atol": record["validation"]["atol"],
            "by": None,
            "reused": False,
        }
        neuron = json.loads((output / name / "config.json").read_text())["neuron"]
        assert neuron["compiler_type"] == "neuronx-cc" and neuron["compiler_version"] == "2.99.0+test.double"
    assert not list(tmp_path.glob(".sd_neuron.*"))


def test_sdxl_unet_is_compiled_without_fast_loading(neuron_sdk, cli, tiny_model, tmp_path):
    result = cli("sd-xl", "-m", tiny_model("sdxl"), "--backend", "auto", "-o", tmp_path / "xl")
    assert result.exit_code == 0, result
    calls = calls_by_component(neuron_sdk())
    assert list(calls) == ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"]
    assert (
        FAST not in calls["unet"]["compiler_args"] and "--model-type=unet-inference" in calls["unet"]["compiler_args"]
    )
    assert calls["text_encoder_2"]["compiler_args"][-2:] == ["--model-type=transformer", FAST]
    assert calls["unet"]["input_shapes"] == [[1, 4, 8, 8], [1], [1, 77, 64], [1, 32], [1, 6]]


def test_target_optlevel_auto_cast_and_inline_flags_reach_the_compiler(neuron_sdk, cli, tiny_model, tmp_path):
    output = tmp_path / "trn"
    result = cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--backend",
        "neuron",
        "-o",
        output,
        "--target",
        "trn1",
        "-O",
        "3",
        "--auto-cast",
        "none",
        "--no-inline-weights",
        "--components",
        "unet",
    )
    assert result.exit_code == 0, result
    (call,) = neuron_sdk()
    assert call["compiler_args"] == [
        "--auto-cast",
        "none",
        "--optlevel",
        "3",
        "--target",
        "trn1",
        FAST,
        "--model-type=unet-inference",
    ]
    assert call["inline_weights_to_neff"] is False
    neuron = json.loads((output / "unet" / "config.json").read_text())["neuron"]
    assert neuron["inline_weights_to_neff"] is False and neuron["optlevel"] == "3" and neuron["instance_type"] == "trn1"


def test_a_failed_compile_keeps_the_work_dir_and_writes_no_export(neuron_sdk, cli, tiny_model, tmp_path):
    (tmp_path / "torch_neuronx_fail_on").write_text("unet")
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


def test_the_manifest_records_how_each_component_was_traced(neuron_sdk, cli, tiny_model, tmp_path):
    output = tmp_path / "sd_neuron"
    assert cli("sd", "-m", tiny_model("sd"), "--backend", "neuron", "-o", output, "--dynamic-batch-size").exit_code == 0
    calls = calls_by_component(neuron_sdk())
    manifest = json.loads((output / "manifest.json").read_text())
    for name, record in manifest["components"].items():
        assert record["cpu_backend"] is calls[name]["cpu_backend"] is True
        assert record["after_trace"] == calls[name]["after_trace"]
    assert manifest["components"]["unet"]["after_trace"] == ["dynamic_batch", "async_load", "lazy_load"]


def test_cpu_backend_is_passed_exactly_when_no_neuron_device_is_present(neuron_sdk, monkeypatch, tmp_path):
    import torch

    from neuron_export.build.backends import neuron
    from neuron_export.build.backends.request import CompileRequest

    devices = tmp_path / "devices"
    monkeypatch.setattr(neuron, "DEVICES_FILE", devices)
    devices.write_text("Character devices:\n  1 mem\n 10 misc\n")
    assert not neuron.device_present() and neuron.validation_skip_reason() == "skipped: no Neuron device"
    devices.write_text("Character devices:\n  1 mem\n245 neuron\n")
    assert neuron.device_present() and neuron.validation_skip_reason() is None

    request = CompileRequest(
        component="vae_decoder",
        compiler_args=("--optlevel", "2"),
        inline_weights=True,
        cpu_backend=not neuron.device_present(),
        after_trace=("async_load",),
        workdir=tmp_path / "work" / "vae_decoder",
    )
    neuron.compile(torch.nn.Identity(), [torch.zeros(1, 4)], request)
    (call,) = neuron_sdk()
    assert call["cpu_backend"] is False and call["after_trace"] == ["async_load"]


@pytest.mark.parametrize(
    "family, kind, extra",
    [
        ("sd-xl", "sdxl", []),
        ("sd", "sd", ["--dynamic-batch-size"]),
    ],
)
def test_separate_weights_are_refused_where_neuronx_cc_cannot_build_them(
    cli, tiny_model, tmp_path, family, kind, extra
):
    """optimum-neuron silently inlines them; we say so before anything is loaded."""
    output = tmp_path / "out"
    result = cli(family, "-m", tiny_model(kind), "--backend", "cpu", "--no-inline-weights", *extra, "-o", output)
    assert result.exit_code == 2, result
    assert "--no-inline-weights" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not output.exists()


def test_a_missing_neuronx_distributed_is_one_sentence_naming_the_fix(monkeypatch):
    """A ModelBuilder role (the T5 encoder) on the Neuron backend needs neuronx-distributed; without it the build
    stops with one sentence naming the component, the package and the way out."""
    from neuron_export.build.backends import neuron
    from neuron_export.errors import BuildError

    monkeypatch.setitem(sys.modules, "neuronx_distributed", None)  # import fails as if it were not installed
    with pytest.raises(BuildError) as caught:
        neuron._model_builder("text_encoder")
    message = str(caught.value)
    assert "text_encoder" in message and "neuronx_distributed does not import" in message
    assert "pip install neuronx-distributed" in message and "--backend cpu" in message
    assert message.count("\n") == 0 and message.endswith(".")


def test_shards_are_found_in_rank_order(tmp_path):
    from neuron_export import files

    for rank in (10, 2, 0, 1):
        (tmp_path / files.shard_name(rank)).write_bytes(b"")
    (tmp_path / "tp_sharded_checkpoint.safetensors").write_bytes(b"")  # not a rank's shard
    assert [path.name for path in files.shard_files(tmp_path)] == [files.shard_name(r) for r in (0, 1, 2, 10)]


def test_the_t5_shard_is_written_by_model_builder_with_the_weights_as_traced(neuron_sdk, cli, tiny_model, tmp_path):
    """PixArt's T5 on the Neuron backend: traced through neuronx-distributed's ModelBuilder (the double), its one
    shard written by shard_checkpoint from the module as traced (the source's weights under the wrapper's names),
    placed in text_encoder/weights/ and recorded in the manifest; nothing left in the compiler work dir."""
    from safetensors.torch import load_file

    output = tmp_path / "pixart_neuron"
    source = tiny_model("pixart-sigma")
    result = cli("pixart", "-m", source, "--backend", "neuron", "-o", output, "--components", "text_encoder")
    assert result.exit_code == 0, result
    assert neuron_sdk() == []  # no torch_neuronx.trace call: the T5 goes through ModelBuilder
    shard_path = output / "text_encoder" / "weights" / "tp0_sharded_checkpoint.safetensors"
    shard = load_file(str(shard_path))
    weights = load_file(str(source / "text_encoder" / "model.safetensors"))
    for key, tensor in weights.items():
        assert bool((shard[f"model.{key}"] == tensor).all()), key
    manifest = json.loads((output / "manifest.json").read_text())
    files = [record["path"] for record in manifest["components"]["text_encoder"]["files"]]
    assert files == ["text_encoder/model.neuron", "text_encoder/weights/tp0_sharded_checkpoint.safetensors"]
    assert not list(tmp_path.glob(".pixart_neuron.*"))


def test_flux_at_tp_2_on_neuron_writes_each_ranks_slice(neuron_sdk, cli, tiny_model, tmp_path):
    """--tensor-parallel-size 2 on the Neuron backend: the T5 and the transformer go through ModelBuilder at tp 2
    (the transformer's trace with LOCAL_WORLD_SIZE=2, the T5's without), and each rank's shard holds that rank's
    slice of the parallel layers (the double builds our parallel module and cuts the weights as the real one),
    under our parallel module's names: the halves of a q projection, the whole of a norm."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    output = tmp_path / "flux_neuron"
    source = tiny_model("flux")
    result = cli(
        "flux", "-m", source, "--backend", "neuron", "--tensor-parallel-size", "2", "--height", "64", "--width", "64",
        "--components", "text_encoder_2,transformer", "--disable-validation", "-o", output,
    )  # fmt: skip
    assert result.exit_code == 0, result
    t5_source = load_file(str(source / "text_encoder_2" / "model.safetensors"))
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    norm = "encoder.final_layer_norm.weight"
    for rank in (0, 1):
        path = output / "text_encoder_2" / "weights" / f"tp{rank}_sharded_checkpoint.safetensors"
        with safe_open(str(path), "pt") as handle:
            assert handle.metadata()["split"] == "rank"
        shard = load_file(str(path))
        assert torch.equal(shard[f"model.{q}"], t5_source[q].chunk(2)[rank])
        assert torch.equal(shard[f"model.{norm}"], t5_source[norm])
        transformer = load_file(str(output / "transformer" / "weights" / f"tp{rank}_sharded_checkpoint.safetensors"))
        out = "model.single_transformer_blocks.0.proj_out"
        assert f"{out}.weight" not in transformer and {f"{out}.attn.weight", f"{out}.mlp.weight"} <= set(transformer)
    builds = {event["component"]: event for event in read_nxd_events(tmp_path) if event["event"] == "nxd_trace"}
    assert builds["transformer"]["environment"]["LOCAL_WORLD_SIZE"] == "2"
    assert builds["text_encoder_2"]["environment"]["LOCAL_WORLD_SIZE"] is None


def read_nxd_events(folder):
    path = folder / "torch_neuronx_calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_tensor_parallelism_for_a_role_without_parallel_layers_is_refused(
    neuron_sdk, cli, tiny_model, tmp_path, monkeypatch
):
    """A sharded role that cannot be split (Role.tensor_parallel False) refuses tp above 1 before any work."""
    import dataclasses

    from neuron_export.roles import registry

    role = registry.FLUX_TRANSFORMER
    monkeypatch.setitem(registry._ROLES, role.registry_name, dataclasses.replace(role, tensor_parallel=False))
    result = cli(
        "flux", "-m", tiny_model("flux"), "--backend", "neuron", "--tensor-parallel-size", "2", "-o", tmp_path / "out"
    )
    assert result.exit_code == 2 and "--tensor-parallel-size 2 with --backend neuron" in result.stderr, result
    assert "cannot split transformer's layers" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_missing_neuronx_distributed_is_refused_before_any_build(neuron_sdk, cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "neuronx_distributed", None)  # import fails as if it were not installed
    result = cli("pixart", "-m", tiny_model("pixart-sigma"), "--backend", "neuron", "-o", tmp_path / "out")
    assert result.exit_code != 0 and "neuronx_distributed does not import" in result.stderr, result
    assert "--backend neuron traces text_encoder" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and "[1/" not in result.stdout  # refused before any component started
