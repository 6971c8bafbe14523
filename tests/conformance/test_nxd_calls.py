"""Call conformance, the reference side of the diffusion transformers: what optimum-neuron 0.4.5's exporter asks
of torch_neuronx and neuronx_distributed's ModelBuilder for PixArt-Σ (T5 at tp=1) and Flux (T5 and transformer
at tp=2), run in its own virtualenv on the tiny random pipelines of neuron_export/testing/examples.py with our recording
doubles (tests/doubles/torch_neuronx, tests/doubles/neuronx_distributed).

The expectation is data, nxd_calls_expected.json: per case, the components in trace order and, per component,
the API, its arguments (ModelBuilder's construction keywords, add's key / compiler string / example input shapes
and dtypes, trace's keywords), the input and output names optimum gives it, the environment variables set when
it traced, tensor parallelism and every file its folder holds (the weights/tp{r}_sharded_checkpoint.safetensors
shards included). It was read off a run and checked line by line against optimum's source (convert.py get_builder /
trace_neuronx / shard_weights, model_configs.py T5EncoderForDiffusersNeuronConfig / FluxTransformerNeuronConfig
get_compiler_args). Below, our Neuron backend's calls are compared with optimum's on the same tiny sources:
PixArt-Σ (T5 at tp=1) and Flux at tp=2 (T5 and transformer split by our parallel modules).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conformance import calls, venv

HERE = Path(__file__).resolve().parent
EXPECTED_PATH = HERE / "nxd_calls_expected.json"
EXPECTED: dict[str, Any] = json.loads(EXPECTED_PATH.read_text())

# case -> (tiny pipeline, optimum-cli options besides --model and the output)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "pixart-sigma": ("pixart-sigma", {"height": 64, "width": 64}),  # T5 length: the tokenizer's model_max_length
    "flux-tp2": (
        "flux",
        {"height": 64, "width": 64, "sequence_length": 12, "extra_args": ["--tensor_parallel_size", "2"]},
    ),
}


def build_tiny_pipelines(root: Path, names: list[str]) -> dict[str, Path]:
    """The tiny example pipelines (64 px: 8x8 latents), as the loader cases and our side build them."""
    from neuron_export.testing.examples import build_example

    return {name: build_example(name, root / name) for name in names}


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


# ------------------------------------------------------------------ our side: the Neuron backend's calls

# What we intend to differ from optimum's calls (the README's conformance table): the callables given to ModelBuilder
# are ours (the module builder, the checkpoint loader reading the module as traced, the process-group hook), so
# only their presence is compared; the input / output names are recorded by optimum's runner alone (ours are in
# config.json, compared by the loader and config cases); torch_neuronx.trace's flags are compared as parsed.
OUR_CALLABLES = {"checkpoint_loader", "init_custom_process_group_fn"}
RUNNER_ONLY = {"input_names", "output_names"}


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    """A component summary (calls.component_summaries) without what the README lists as ours by intent."""
    result = {key: value for key, value in summary.items() if key not in RUNNER_ONLY}
    if result.get("api") == "torch_neuronx.trace":
        # torch_neuronx takes a list (ours) or a string (optimum's): compared as neuronx-cc parses them
        result.pop("compiler_args", None)
    if "builder" in result:
        result["builder"] = {
            key: (value is not None if key in OUR_CALLABLES else value) for key, value in result["builder"].items()
        }
        result["models"] = [{**model, "module_cls": model["module_cls"] is not None} for model in result["models"]]
    return result


def component_differences(ours: dict[str, Any], expected: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    ours, expected = comparable(ours), comparable(expected)
    return {
        key: (ours.get(key), expected.get(key))
        for key in ours.keys() | expected.keys()
        if ours.get(key) != expected.get(key)
    }


OUR_SIZE = 64  # our smallest --height / --width (optimum's case above uses 16)


def our_and_optimums_calls(
    root: Path, example: str, family: str, options: dict[str, Any], our_args: list[Any]
) -> dict[str, dict[str, dict[str, Any]]]:
    """Our `--backend neuron` export of a tiny example (neuron_export/testing/examples.py), the recording doubles
    standing in for torch_neuronx and neuronx_distributed, and optimum's export of the same source with the same
    options: {"ours": summaries, "optimum": summaries} (calls.component_summaries)."""
    from conftest import run_cli

    from conformance.conftest import neuron_sdk_doubles
    from neuron_export.testing.examples import build_example

    source = build_example(example, root / "source")
    output = root / "ours" / "export"
    with neuron_sdk_doubles():
        result = run_cli(
            family, "-m", source, "--height", options["height"], "--width", options["width"], *our_args,
            "--backend", "neuron", "--disable-validation", "-o", output, "--cache-dir", root / "cache",
        )  # fmt: skip
    assert result.exit_code == 0, result
    ours = calls.component_summaries(calls.read_events(output.parent / "torch_neuronx_calls.jsonl"), output)
    (theirs,) = venv.export([{"model": source, "output": root / "optimum", **options}])["results"]
    assert theirs["ok"], theirs.get("error")
    optimum = calls.component_summaries(calls.read_events(theirs["record"]), theirs["output"])
    return {
        "ours": ours,
        "optimum": optimum,
        "our_record": calls.read_events(output.parent / "torch_neuronx_calls.jsonl"),
        "optimum_record": calls.read_events(theirs["record"]),
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, Any]]]:
    """The tiny PixArt-Σ at OUR_SIZE, ours and optimum's (our_and_optimums_calls)."""
    root = tmp_path_factory.mktemp("nxd-pair")
    return our_and_optimums_calls(root, "pixart-sigma", "pixart", {"height": OUR_SIZE, "width": OUR_SIZE}, [])


@pytest.mark.parametrize("component", EXPECTED["pixart-sigma"]["order"])
def test_our_neuron_backend_makes_optimums_calls_for_pixart(
    pair: dict[str, dict[str, dict[str, Any]]], component: str
) -> None:
    """Per component: the same API (ModelBuilder for the T5, torch_neuronx.trace for the rest), construction
    keywords, add's key / compiler string / example inputs, trace's keywords, environment, shards and files."""
    assert sorted(pair["ours"]) == sorted(pair["optimum"]) == sorted(EXPECTED["pixart-sigma"]["order"])
    diff = component_differences(pair["ours"][component], pair["optimum"][component])
    assert not diff, f"{component}: (ours, optimum's) per differing key: {diff}"


def test_our_t5_calls_equal_the_recorded_expectation(pair: dict[str, dict[str, dict[str, Any]]]) -> None:
    """The T5's calls do not depend on the image size: ours equal nxd_calls_expected.json's as well."""
    diff = component_differences(pair["ours"]["text_encoder"], EXPECTED["pixart-sigma"]["components"]["text_encoder"])
    assert not diff, diff


@pytest.mark.parametrize(
    "fault",
    [
        ("dropped shard", lambda s: s.update(shards=[], files=[f for f in s["files"] if not f.startswith("weights/")])),
        ("wrong compiler string", lambda s: s["models"][0].update(compiler_args="--auto-cast=all")),
        ("tensor parallelism", lambda s: s["builder"].update(tp_degree=2)),
        ("weights initialized at trace", lambda s: s.update(traces=[{"initialize_model_weights": True}])),
    ],
    ids=lambda fault: fault[0],
)
def test_a_planted_fault_in_our_t5_calls_is_a_difference(
    pair: dict[str, dict[str, dict[str, Any]]], fault: Any
) -> None:
    planted = json.loads(json.dumps(pair["ours"]["text_encoder"]))
    fault[1](planted)
    assert component_differences(planted, pair["optimum"]["text_encoder"])


# ------------------------------------------------------------------ Flux at tensor parallelism 2

FLUX_TP = 2
FLUX_SEQUENCE_LENGTH = 12


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, Any]]]:
    """The tiny Flux (heads, T5 heads and widths divisible by 2) at OUR_SIZE and tp 2, ours and optimum's."""
    root = tmp_path_factory.mktemp("nxd-flux-pair")
    options = {
        "height": OUR_SIZE,
        "width": OUR_SIZE,
        "sequence_length": FLUX_SEQUENCE_LENGTH,
        "extra_args": ["--tensor_parallel_size", str(FLUX_TP)],
    }
    our_args = ["--tensor-parallel-size", FLUX_TP, "--sequence-length", FLUX_SEQUENCE_LENGTH]
    return our_and_optimums_calls(root, "flux", "flux", options, our_args)


@pytest.mark.parametrize("component", EXPECTED["flux-tp2"]["order"])
def test_our_neuron_backend_makes_optimums_calls_for_flux_at_tp_2(
    flux_pair: dict[str, dict[str, dict[str, Any]]], component: str
) -> None:
    """Per component: ModelBuilder at tp 2 for the T5 and the transformer (construction keywords, the NxD
    compiler string, example inputs, LOCAL_WORLD_SIZE for the transformer alone, one shard per rank),
    torch_neuronx.trace for CLIP and the VAE halves."""
    assert sorted(flux_pair["ours"]) == sorted(flux_pair["optimum"]) == sorted(EXPECTED["flux-tp2"]["order"])
    diff = component_differences(flux_pair["ours"][component], flux_pair["optimum"][component])
    assert not diff, f"{component}: (ours, optimum's) per differing key: {diff}"


def test_our_flux_shards_are_each_ranks_slice(flux_pair: dict[str, Any]) -> None:
    """Our shards are cut per rank (the double built our parallel module): a q projection is half as tall on
    each rank, a norm whole. optimum's T5 is cut too; its transformer cannot be built by the double (it imports
    neuronx-distributed modules the double lacks, and NKI kernels), so its shards are unsplit and say so."""
    ours = [e for e in flux_pair["our_record"] if e["event"] == "nxd_shard_checkpoint"]
    assert sorted(e["component"] for e in ours) == ["text_encoder_2", "transformer"]
    for event in ours:
        assert event["split"] == "rank", event.get("unsplit_reason")
        names = event["shapes"]
        q = next(name for name in names if name.endswith(("attn.to_q.weight", "SelfAttention.q.weight")))
        norm = next(name for name in names if "norm" in name and name.endswith("weight"))
        assert [shapes[q][0] * FLUX_TP for shapes in event["rank_shapes"]] == [names[q][0]] * FLUX_TP
        assert [shapes[norm] for shapes in event["rank_shapes"]] == [names[norm]] * FLUX_TP
    theirs = {e["component"]: e for e in flux_pair["optimum_record"] if e["event"] == "nxd_shard_checkpoint"}
    assert theirs["text_encoder_2"]["split"] == "rank"
    assert (
        theirs["transformer"]["split"] == "none" and "module_cls not built" in theirs["transformer"]["unsplit_reason"]
    )


@pytest.mark.parametrize(
    "fault",
    [
        (
            "dropped shard",
            lambda s: s.update(shards=s["shards"][:1], files=[f for f in s["files"] if f != s["shards"][-1]]),
        ),
        ("wrong compiler string", lambda s: s["models"][0].update(compiler_args="--model-type=transformer -O2")),
        ("tensor parallelism", lambda s: (s["builder"].update(tp_degree=1), s.update(tensor_parallel_size=1))),
        ("no LOCAL_WORLD_SIZE", lambda s: s["environment"].pop("LOCAL_WORLD_SIZE", None)),
    ],
    ids=lambda fault: fault[0],
)
def test_a_planted_fault_in_our_flux_transformer_calls_is_a_difference(flux_pair: dict[str, Any], fault: Any) -> None:
    planted = json.loads(json.dumps(flux_pair["ours"]["transformer"]))
    fault[1](planted)
    assert component_differences(planted, flux_pair["optimum"]["transformer"])
