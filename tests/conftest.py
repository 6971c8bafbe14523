"""Shared pytest fixtures: tiny random-weight pipelines built locally, never downloaded."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable, Iterator

import pytest
from helpers import CliResult, run_cli

# Set before anything imports huggingface_hub, so no test can reach the network by accident.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# accelerate (peft's dependency) takes the import-only torch_xla test double for an XLA device unless told not to.
os.environ["USE_TORCH_XLA"] = "0"
# Session-scoped fixtures share this cache; each test file (module_cache) and each test (isolated_cache) gets its own.
os.environ["NEURON_EXPORT_CACHE"] = tempfile.mkdtemp(prefix="neuron-export-test-cache-")


# The slow tier (`pytest -m "not slow"` leaves it out; CI runs everything): files whose tests build several exports
# each, or start processes, clusters, servers or side environments. The fast tier keeps what plans, checks and
# refuses, and reads one export per module (verify, inspect, push). A test elsewhere joins it with @pytest.mark.slow.
SLOW_FILES = {
    "test_build_once.py",
    "test_cache.py",
    "test_cache_commands.py",
    "test_cache_keys.py",
    "test_cli_output.py",
    "test_conditioning.py",
    "test_dit_tools.py",
    "test_examples.py",
    "test_export.py",
    "test_fleet.py",
    "test_generate.py",
    "test_generate_lcm_sdxl.py",
    "test_generate_refiner.py",
    "test_hostile_inputs.py",
    "test_lora.py",
    "test_neuron_backend.py",
    "test_neuron_host.py",
    "test_output_paths.py",
    "test_ray_executor.py",
    "test_readme.py",
    "test_remote_cache.py",
    "test_reproducible.py",
    "test_scripted_use.py",
    "test_trust.py",
    "test_calls.py",
    "test_loader.py",  # tests/conformance: optimum-neuron in its own environment
    "test_nxd_calls.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module", autouse=True)
def module_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """A fresh component cache per test file, for its module-scoped exports (set up before any test's own)."""
    path = tmp_path_factory.mktemp("module-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEURON_EXPORT_CACHE", str(path))
        yield path


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A fresh component cache per test, so no test sees another's builds."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("NEURON_EXPORT_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], pathlib.Path]:
    """Factory: ``tiny_model("sdxl")`` returns the folder of that example, built once per session.

    Treat the folder as read-only; it is shared by every test that asks for the same name.
    """
    from neuron_export.testing.examples import build_example

    built: dict[str, pathlib.Path] = {}

    def get(name: str) -> pathlib.Path:
        if name not in built:
            built[name] = build_example(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return built[name]

    return get


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    """`cli("sd", "-m", model, ...)` runs neuron-export in this process: a CliResult (exit code, stdout, stderr)."""
    return run_cli


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API server (moto's) on 127.0.0.1 for the session; the AWS environment points at it only."""
    from s3_server import aws_environment, moto_server

    with moto_server() as endpoint, pytest.MonkeyPatch.context() as patch:
        for name, value in aws_environment(endpoint).items():
            patch.setenv(name, value)
        yield endpoint
