"""Call conformance, the reference side of the diffusion transformers: what optimum-neuron 0.4.5's exporter asks
of torch_neuronx and neuronx_distributed's ModelBuilder for PixArt-Σ (T5 at tp=1) and Flux (T5 and transformer
at tp=2), run in its own virtualenv on tiny random pipelines (tests/conformance/tiny_dit.py) with our recording
doubles (tests/doubles/torch_neuronx, tests/doubles/neuronx_distributed).

The expectation is data, nxd_calls_expected.json: per case, the components in trace order and, per component,
the API, its arguments (ModelBuilder's construction keywords, add's key / compiler string / example input shapes
and dtypes, trace's keywords), the input and output names optimum gives it, the environment variables set when
it traced, tensor parallelism and every file its folder holds (the weights/tp{r}_sharded_checkpoint.safetensors
shards included). It was read off a run and checked line by line against optimum's source (convert.py get_builder /
trace_neuronx / shard_weights, model_configs.py T5EncoderForDiffusersNeuronConfig / FluxTransformerNeuronConfig
get_compiler_args). Our Neuron backend is to make the same calls; a later test compares the two.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conformance import calls, venv

HERE = Path(__file__).resolve().parent
EXPECTED_PATH = HERE / "nxd_calls_expected.json"
EXPECTED: dict[str, Any] = json.loads(EXPECTED_PATH.read_text())
BUILDER = HERE / "tiny_dit.py"

# case -> (tiny pipeline, optimum-cli options besides --model and the output)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "pixart-sigma": ("pixart-sigma", {"height": 16, "width": 16}),  # T5 length: the tokenizer's model_max_length
    "flux-tp2": (
        "flux",
        {"height": 16, "width": 16, "sequence_length": 12, "extra_args": ["--tensor_parallel_size", "2"]},
    ),
}


def build_tiny_pipelines(root: Path, names: list[str]) -> dict[str, Path]:
    """The tiny pipelines, built by the conformance virtualenv's own diffusers / transformers (one process)."""
    folders = {name: root / name for name in names}
    argv = [str(venv.python()), str(BUILDER)]
    for name, folder in folders.items():
        argv += [name, str(folder)]
    process = subprocess.run(argv, env=venv.environment(), capture_output=True, text=True, timeout=600, check=False)
    assert process.returncode == 0, process.stderr[-4000:]
    return folders


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """{case: {"result": the runner's result, "components": calls.component_summaries(...)}}; one runner process."""
    root = tmp_path_factory.mktemp("nxd-calls")
    sources = build_tiny_pipelines(root / "sources", sorted({source for source, _ in CASES.values()}))
    requests = [
        {"model": sources[source], "output": root / case, **options} for case, (source, options) in CASES.items()
    ]
    out = venv.export(requests)
    observed = {}
    for case, result in zip(CASES, out["results"], strict=True):
        assert result["ok"], f"optimum's export of {case} failed: {result.get('error')}"
        events = calls.read_events(result["record"])
        observed[case] = {"result": result, "components": calls.component_summaries(events, result["output"])}
    return observed


def test_expectation_covers_every_case() -> None:
    assert sorted(EXPECTED) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_components_and_their_order(reference: dict[str, dict[str, Any]], case: str) -> None:
    """The components optimum compiles, in the order it compiles them."""
    assert list(reference[case]["components"]) == EXPECTED[case]["order"]


@pytest.mark.parametrize(
    ("case", "component"), [(case, component) for case in sorted(EXPECTED) for component in EXPECTED[case]["order"]]
)
def test_component_calls(reference: dict[str, dict[str, Any]], case: str, component: str) -> None:
    """API, arguments, compiler string, inputs, environment, tensor parallelism, shards and files, per component."""
    observed = reference[case]["components"].get(component)
    assert observed is not None, f"{case}: optimum compiled no {component}"
    expected = EXPECTED[case]["components"][component]
    differing = {key: (observed.get(key), expected.get(key)) for key in expected.keys() | observed.keys()}
    differing = {key: pair for key, pair in differing.items() if pair[0] != pair[1]}
    assert not differing, f"{case}/{component}: (observed, expected) per differing key: {differing}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_nxd_shards_cover_every_rank(reference: dict[str, dict[str, Any]], case: str) -> None:
    """Each ModelBuilder component holds one shard per rank < its tensor_parallel_size, and nothing in weights/
    besides them (the loader reads exactly these)."""
    for component, summary in reference[case]["components"].items():
        if summary["api"] != "neuronx_distributed.ModelBuilder":
            assert not [f for f in summary["files"] if f.startswith("weights/")], component
            continue
        tp = summary["tensor_parallel_size"]
        assert summary["builder"]["tp_degree"] == tp
        expected = [f"weights/tp{rank}_sharded_checkpoint.safetensors" for rank in range(tp)]
        assert summary["shards"] == expected
        assert [f for f in summary["files"] if f.startswith("weights/")] == expected
