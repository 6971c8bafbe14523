"""Shared pytest fixtures: tiny random-weight pipelines built locally, never downloaded."""

from __future__ import annotations

import os
import pathlib
import tempfile
from collections.abc import Callable, Iterator

import pytest

# Set before anything imports huggingface_hub, so no test can reach the network by accident.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
# accelerate (peft's dependency) takes the import-only torch_xla test double for an XLA device unless told not to.
os.environ["USE_TORCH_XLA"] = "0"
# Exports made by module-scoped fixtures share a session cache; each test gets its own (below).
os.environ["NEURON_EXPORT_CACHE"] = tempfile.mkdtemp(prefix="neuron-export-test-cache-")


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
    from neuron_export.examples import build_example

    built: dict[str, pathlib.Path] = {}

    def get(name: str) -> pathlib.Path:
        if name not in built:
            built[name] = build_example(name, tmp_path_factory.mktemp(f"tiny-{name}"))
        return built[name]

    return get


class CliResult:
    """What a user would see: exit code, stdout, stderr."""

    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code, self.stdout, self.stderr = exit_code, stdout, stderr

    def __repr__(self) -> str:
        return f"CliResult(exit_code={self.exit_code}, stdout={self.stdout[-800:]!r}, stderr={self.stderr[-800:]!r})"


def run_cli(*args: object) -> CliResult:
    """Run `neuron-export ARGS...` in this process (torch stays imported between tests)."""
    import contextlib
    import io

    from neuron_export.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    return run_cli


def export_tiny(model: pathlib.Path, out: pathlib.Path, family: str) -> pathlib.Path:
    """A cpu export of a tiny pipeline; fails the test if the export fails."""
    result = run_cli(family, "-m", model, "--backend", "cpu", "-o", out)
    assert result.exit_code == 0, result
    return out


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API server (moto's) on 127.0.0.1 for the session; the AWS environment points at it only."""
    from s3_server import aws_environment, moto_server

    with moto_server() as endpoint, pytest.MonkeyPatch.context() as patch:
        for name, value in aws_environment(endpoint).items():
            patch.setenv(name, value)
        yield endpoint


def warnings(stderr: str) -> list[str]:
    """The warning lines a command printed (with --json, its progress lines go to stderr too)."""
    return [line for line in stderr.splitlines() if line.startswith("neuron-export: warning")]
