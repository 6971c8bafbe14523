"""Shared pytest fixtures: tiny random-weight pipelines built locally, never downloaded."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import pytest

# Set before anything imports huggingface_hub, so no test can reach the network by accident.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], pathlib.Path]:
    """Factory: ``tiny_model("sdxl")`` returns the folder of that example, built once per session.

    Treat the folder as read-only; it is shared by every test that asks for the same kind.
    """
    from neuron_export.examples import build_example

    built: dict[str, pathlib.Path] = {}

    def get(kind: str) -> pathlib.Path:
        if kind not in built:
            built[kind] = build_example(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return built[kind]

    return get
