"""Our tensor-parallel modules (roles/t5.py, roles/flux.py, from neuronx-distributed's parallel layers) compute
what the unsharded eager module computes: each rank built as ModelBuilder builds it and loaded with its slice of
the full weights, the ranks run together (tests/doubles/neuronx_distributed: ranks as threads, the layers' real
all-reduce / all-gather), every rank's output equal to the eager encoder's / transformer's."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

DOUBLES = Path(__file__).parent / "doubles"
DOUBLE_PACKAGES = ("neuronx_distributed", "torch_neuronx", "neuronxcc")
TP = 2


@pytest.fixture
def nxd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """The neuronx_distributed double on the path; returns (ranks.run, layers.shard_state_dict)."""
    monkeypatch.syspath_prepend(str(DOUBLES))
    monkeypatch.setenv("TORCH_NEURONX_RECORD", str(tmp_path / "calls.jsonl"))  # the doubles' record, if any
    for name in [name for name in sys.modules if name.split(".")[0] == "neuronx_distributed"]:
        monkeypatch.delitem(sys.modules, name)
    from neuronx_distributed.parallel_layers import layers, ranks

    yield ranks.run, layers.shard_state_dict
    for name in [name for name in sys.modules if name.split(".")[0] in DOUBLE_PACKAGES]:
        sys.modules.pop(name, None)


def run_sharded(nxd: Any, wrapper: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every rank's output: its module (wrapper.parallel_module()) loaded with its slice of
    wrapper.parallel_checkpoint() (every tensor the module has, none left over)."""
    run, shard = nxd
    checkpoint = wrapper.parallel_checkpoint()

    def rank(index: int) -> torch.Tensor:
        module = wrapper.parallel_module()
        state = shard(module, checkpoint, index)
        missing, unexpected = module.load_state_dict(state, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        with torch.no_grad():
            return module(*inputs)[0]

    return run(TP, rank)


def tiny_flux() -> Any:
    from neuron_export.testing.examples import tiny_flux_transformer

    return tiny_flux_transformer().eval()


def test_t5_encoder_on_two_ranks_equals_the_eager_encoder(nxd: Any) -> None:
    from neuron_export.roles import t5
    from neuron_export.roles.spec import ComponentSpec, TensorSpec
    from neuron_export.testing.examples import tiny_t5_encoder

    torch.manual_seed(0)
    model = tiny_t5_encoder().eval()
    spec = ComponentSpec(
        name="text_encoder_2", model_type=t5.MODEL_TYPE, task="feature-extraction",
        inputs=(TensorSpec("input_ids", (2, 12), "int64", high=model.config.vocab_size),),
        outputs=("last_hidden_state",), static_shapes={}, traced={"tensor_parallel_size": TP},
    )  # fmt: skip
    input_ids = torch.randint(1, model.config.vocab_size, (2, 12))
    expected = t5.reference(model, spec, [input_ids])[0]
    outputs = run_sharded(nxd, t5.wrap(model, spec), [input_ids])
    assert len(outputs) == TP
    for output in outputs:
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def test_flux_transformer_on_two_ranks_equals_the_eager_transformer(nxd: Any) -> None:
    from neuron_export.roles import flux

    torch.manual_seed(0)
    model = tiny_flux()
    spec = flux_spec(model)
    inputs = [torch.randn(t.shape) for t in spec.inputs]
    expected = flux.reference(model, spec, inputs)[0]
    outputs = run_sharded(nxd, flux.wrap(model, spec), inputs)
    assert len(outputs) == TP
    for output in outputs:
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)


def flux_spec(model: Any) -> Any:
    from neuron_export.roles import flux
    from neuron_export.roles.spec import ComponentSpec, TensorSpec

    config = model.config
    tokens, length, axes = 16, 12, sum(config.axes_dims_rope)
    inputs = (
        TensorSpec("hidden_states", (1, tokens, config.in_channels)),
        TensorSpec("encoder_hidden_states", (1, length, config.joint_attention_dim)),
        TensorSpec("pooled_projections", (1, config.pooled_projection_dim)),
        TensorSpec("timestep", (1,)),
        TensorSpec("guidance", (1,)),
        TensorSpec("image_rotary_emb", (length + tokens, axes, 2)),
    )
    return ComponentSpec(
        name="transformer", model_type=flux.MODEL_TYPE, task="semantic-segmentation", inputs=inputs,
        outputs=("out_hidden_states",), static_shapes={}, traced={"tensor_parallel_size": TP},
    )  # fmt: skip


def test_a_wrong_split_differs_from_the_eager_module(nxd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above catches a wrong split: a single block's proj_out as one row-parallel layer over its
    concatenated input (shapes fit, each rank pairs the wrong columns) gives other numbers."""
    from neuron_export.roles import flux, parallel

    monkeypatch.setattr(flux, "single_block_projection", lambda linear, width: parallel.row(linear))
    monkeypatch.setattr(flux, "parallel_checkpoint", lambda state, model, prefix="": state)
    torch.manual_seed(0)
    model = tiny_flux()
    spec = flux_spec(model)
    inputs = [torch.randn(t.shape) for t in spec.inputs]
    outputs = run_sharded(nxd, flux.wrap(model, spec), inputs)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(outputs[0], flux.reference(model, spec, inputs)[0], atol=1e-5, rtol=1e-5)


def test_a_ranks_module_holds_each_parameter_in_the_models_dtype(nxd: Any) -> None:
    """A T5 in bfloat16 with its `wo` kept in float32 (as transformers keeps it): each rank's module the same."""
    from neuron_export.roles import t5
    from neuron_export.testing.examples import tiny_t5_encoder

    model = tiny_t5_encoder().eval().to(torch.bfloat16)
    for block in model.encoder.block:
        block.layer[1].DenseReluDense.wo.float()
    run, _ = nxd
    dtypes = run(TP, lambda rank: {name: p.dtype for name, p in t5.parallel_encoder(model).named_parameters()})
    expected = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes == [expected] * TP
    assert expected["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == torch.float32


def test_the_shards_model_builder_writes_run_our_modules_equal_to_eager(nxd: Any, tmp_path: Path) -> None:
    """End to end on the Neuron backend's path (build/backends/neuron.py compile_sharded / write_shards, the
    ModelBuilder double cutting the checkpoint as the real one): each rank's shard file, loaded into that rank's
    module by name (strict: the loader's names are the module's), runs to the eager transformer's output."""
    from safetensors.torch import load_file

    from neuron_export.build.backends import neuron
    from neuron_export.build.backends.request import CompileRequest
    from neuron_export.roles import flux

    for name in [name for name in sys.modules if name.split(".")[0] in ("torch_neuronx", "neuronxcc")]:
        sys.modules.pop(name)
    torch.manual_seed(0)
    model = tiny_flux()
    spec = flux_spec(model)
    inputs = [torch.randn(t.shape) for t in spec.inputs]
    wrapper = flux.wrap(model, spec)
    request = CompileRequest(
        component="transformer", compiler_args=(), inline_weights=False, cpu_backend=True, after_trace=(),
        workdir=tmp_path / "work", tensor_parallel_size=TP, local_world_size=TP,
    )  # fmt: skip
    _, builder = neuron.compile_sharded(wrapper, inputs, request)
    (tmp_path / "out").mkdir()
    files = neuron.write_shards(builder, request, tmp_path / "out")
    assert files == [f"weights/tp{rank}_sharded_checkpoint.safetensors" for rank in range(TP)]
    run, _ = nxd

    def rank(index: int) -> torch.Tensor:
        module = wrapper.parallel_module()
        module.load_state_dict(load_file(str(tmp_path / "out" / neuron.shard_name(index))), strict=True)
        with torch.no_grad():
            return module(*inputs)[0]

    expected = flux.reference(model, spec, inputs)[0]
    for output in run(TP, rank):
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
