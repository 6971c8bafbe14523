"""Fixtures of the conformance suite: tiny sources, our exports of them, and optimum-neuron's verdicts.

Every expensive step runs once per session and serves many tests: our exports are made in this process,
optimum-neuron's runs happen in one process of the conformance virtualenv per subcommand.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli

from conformance import calls, venv
from neuron_export.testing.lora import LORA_WEIGHT_NAME

DOUBLES = Path(__file__).resolve().parents[1] / "doubles"
DOUBLE_MODULES = ("torch_neuronx", "neuronxcc", "neuronx_distributed")
IP_ADAPTER_SCALE = 0.6


@pytest.fixture(scope="session", autouse=True)
def conformance_venv() -> None:
    """The suite needs optimum-neuron's own code; a missing venv is a failure, never a silent skip."""
    reason = venv.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the conformance virtualenv is missing: {reason}", pytrace=False)


@contextlib.contextmanager
def neuron_sdk_doubles() -> Iterator[None]:
    """Our exporter sees the torch_neuronx / neuronxcc test doubles as the installed SDK (workers too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(DOUBLES))
        for name in DOUBLE_MODULES:
            patch.delitem(sys.modules, name, raising=False)
        try:
            yield
        finally:
            for name in DOUBLE_MODULES:
                sys.modules.pop(name, None)


@dataclass(frozen=True)
class Case:
    """One export, made by us and (for call conformance) by optimum-neuron, with the same options."""

    name: str
    source: str  # a tiny example name
    family: str  # our command
    task: str = "text-to-image"
    batch_size: int = 1
    num_images_per_prompt: int = 1
    height: int | None = None
    width: int | None = None
    dynamic_batch_size: bool = False
    unet: str | None = None  # a tiny example name used as the replacement UNet
    source_folder: str | None = None  # the source copied under this folder name first
    pipeline: str = ""  # optimum-neuron's class that loads it
    call: dict[str, Any] = field(default_factory=dict)  # what the pipeline is called with (besides seed)
    loras: tuple[tuple[str, str, float], ...] = ()  # (LORA_EXAMPLES name, adapter name, scale), fused in order
    controlnets: tuple[str, ...] = ()  # tiny ControlNet example names ("name" or "name@seed"), in --controlnet order
    ip_adapter: bool = False  # the tiny IP-Adapter (example sd-ip-adapter) at IP_ADAPTER_SCALE
    extra: tuple[str, ...] = ()  # further options of ours (Flux's --tensor-parallel-size)

    def ip_adapter_options(self, sources: Sources) -> dict[str, Any]:
        from neuron_export.testing.adapters import IP_ADAPTER_SUBFOLDER, IP_ADAPTER_WEIGHT_NAME

        return {
            "id": sources.get("sd-ip-adapter"),
            "subfolder": IP_ADAPTER_SUBFOLDER,
            "weight_name": IP_ADAPTER_WEIGHT_NAME,
            "scale": IP_ADAPTER_SCALE,
        }

    def add_on_args(self, sources: Sources, reference: bool) -> list[str]:
        """The ControlNet / IP-Adapter options: ours, or optimum-cli's spellings (reference=True)."""
        args: list[Any] = []
        if self.controlnets:
            paths = [sources.get(name) for name in self.controlnets]
            args += ["--controlnet_ids", *paths] if reference else [a for p in paths for a in ("--controlnet", p)]
        if self.ip_adapter:
            for key, value in self.ip_adapter_options(sources).items():
                args += [
                    f"--ip_adapter_{key}"
                    if reference
                    else f"--ip-adapter{'' if key == 'id' else '-' + key.replace('_', '-')}",
                    value,
                ]
        return [str(arg) for arg in args]

    def our_args(self, sources: Sources) -> list[str]:
        args = [
            self.family,
            "-m",
            sources.path(self),
            "--task",
            self.task,
            "--batch-size",
            str(self.batch_size),
            "--num-images-per-prompt",
            str(self.num_images_per_prompt),
            "--disable-validation",
        ]
        if self.height:
            args += ["--height", str(self.height), "--width", str(self.width)]
        if self.dynamic_batch_size:
            args.append("--dynamic-batch-size")
        if self.unet:
            args += ["--unet", sources.get(self.unet)]
        for lora, adapter_name, scale in self.loras:
            args += ["--lora", sources.lora(lora), "--lora-adapter-name", adapter_name, "--lora-scale", scale]
        return [str(arg) for arg in [*args, *self.extra]] + self.add_on_args(sources, reference=False)

    def lora_arguments(self, sources: Sources) -> list[str]:
        """optimum-cli's LoRA options for the same adapters (its list spellings, one flag per list)."""
        if not self.loras:
            return []
        return [
            "--lora_model_ids",
            *(str(sources.lora(name)) for name, _, _ in self.loras),
            "--lora_weight_names",
            *(LORA_WEIGHT_NAME for _ in self.loras),
            "--lora_adapter_names",
            *(adapter for _, adapter, _ in self.loras),
            "--lora_scales",
            *(str(scale) for _, _, scale in self.loras),
        ]

    def reference_loras(self, sources: Sources) -> list[dict[str, Any]]:
        """What diffusers' reference pipeline loads and fuses before it generates."""
        return [
            {"path": sources.lora(name), "weight_name": LORA_WEIGHT_NAME, "adapter_name": adapter, "scale": scale}
            for name, adapter, scale in self.loras
        ]

    def optimum_request(self, sources: Sources, output: Path) -> dict[str, Any]:
        # optimum-cli has no instruct-pix2pix task: it exports such a model as text-to-image (its class decides at load).
        task = "text-to-image" if self.task == "instruct-pix2pix" else self.task
        request: dict[str, Any] = {
            "model": sources.path(self),
            "output": output,
            "task": task,
            "batch_size": self.batch_size,
            "num_images_per_prompt": self.num_images_per_prompt,
            "height": self.height or 64,
            "width": self.width or 64,
            "dynamic_batch_size": self.dynamic_batch_size,
        }
        if self.unet:
            request["unet"] = sources.get(self.unet)
        if self.loras:
            request["extra_args"] = self.lora_arguments(sources)
        if self.controlnets or self.ip_adapter:
            request["extra_args"] = [*request.get("extra_args", []), *self.add_on_args(sources, reference=True)]
        return request


# Tiny LoRA adapters: name -> (base example, components, seed, layers per component or None for the default).
LORA_EXAMPLES = {
    "sd-style": ("sd", ("unet", "text_encoder"), 0, None),
    "sd-detail": ("sd", ("unet",), 1, {"unet": ("to_k", "to_v", "ff.net.2", "proj_out")}),
    "flux-style": ("flux", ("transformer", "text_encoder"), 0, None),
}


class Sources:
    """Tiny example pipelines, built once per session (read-only for tests)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        """`name` or `name@seed` (another random draw of the same example, e.g. a second ControlNet)."""
        from neuron_export.testing.examples import build_example

        if name not in self.built:
            example, _, seed = name.partition("@")
            self.built[name] = build_example(example, self.root / name, seed=int(seed or 0))
        return self.built[name]

    def lora(self, name: str) -> Path:
        from neuron_export.testing.lora import build_lora

        if name not in self.built:
            base, components, seed, targets = LORA_EXAMPLES[name]
            build_lora(self.get(base), self.root / "loras" / name, components=components, seed=seed, targets=targets)
            self.built[name] = self.root / "loras" / name
        return self.built[name]

    def path(self, case: Case) -> Path:
        source = self.get(case.source)
        if case.source_folder is None:
            return source
        renamed = self.root / "renamed" / case.source_folder
        if not renamed.exists():
            shutil.copytree(source, renamed)
            # Some published checkpoints keep the name they were saved under in the UNet config.
            unet_config = renamed / "unet" / "config.json"
            unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "_name_or_path": str(renamed)}))
        return renamed


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    return Sources(tmp_path_factory.mktemp("conformance-sources"))


def export_ours(case: Case, sources: Sources, output: Path, backend: str) -> Path:
    """Exported with a cache of its own: every component is compiled, none is taken from another case."""
    cache = output.parent / f"{output.name}.cache"
    result = run_cli(*case.our_args(sources), "--backend", backend, "-o", output, "--cache-dir", cache)
    assert result.exit_code == 0, result
    return output


def manifest(export: Path) -> dict[str, Any]:
    return json.loads((export / "manifest.json").read_text())


def component_configs(export: Path) -> dict[str, dict[str, Any]]:
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(export.glob("*/config.json"))}


def our_trace_calls(export: Path) -> dict[str, dict[str, Any]]:
    """The double records our workers' calls two levels above their compiler work dir: the export's parent."""
    return calls.by_component(calls.read_trace_calls(export.parent / "torch_neuronx_calls.jsonl"))
