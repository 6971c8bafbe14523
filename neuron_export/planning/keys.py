"""A component's cache key: exactly what decides its artifact's bytes, and nothing about the pipeline around it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from neuron_export.planning.config import ExportConfig
from neuron_export.planning.lora import LoraFusion
from neuron_export.planning.source import ModelSource
from neuron_export.roles.registry import CONTROLNET, role_of
from neuron_export.roles.spec import ComponentSpec
from neuron_export.store.cache import CONTRACT_VERSION, component_key
from neuron_export.version import __version__

# Config keys that record where a config came from, not what the module computes.
CONFIG_PROVENANCE = ("_name_or_path", "_commit_hash", "_diffusers_version", "transformers_version")


def cache_key(
    config: ExportConfig,
    backend: str,
    compiler_version: str,
    spec: ComponentSpec,
    source_folder: Path,
    weight_hashes: tuple[str, ...],
    compiler_args: list[str],
    after_trace: tuple[str, ...],
    libraries: dict[str, str | None],
    loras: tuple[LoraFusion, ...] = (),
    sharded: bool = False,
) -> str:
    """Exactly what decides a component artifact's bytes: its weights and config, its traced inputs and
    outputs, its compiler and arguments, the traced libraries' versions and its fused add-ons. Not the
    pipeline around it (architecture, LCM-ness: they enter only through the traced inputs) and not the
    validation settings (results are stored beside the artifact: build/validation.py)."""
    model_config = json.loads((source_folder / "config.json").read_text())
    payload = {
        "contract": CONTRACT_VERSION,
        "tool": __version__,
        "component": spec.name,
        "weights": list(weight_hashes),
        "config": {key: value for key, value in model_config.items() if key not in CONFIG_PROVENANCE},
        "inputs": [dataclasses.asdict(tensor) for tensor in spec.inputs],
        "outputs": list(spec.outputs),
        "output_hidden_states": spec.output_hidden_states,
        "backend": backend,
        "compiler_version": compiler_version,
        "libraries": libraries,
        "compiler_args": compiler_args if backend == "neuron" else [],
        "inline_weights": config.spec.inline_weights if backend == "neuron" else None,
        "after_trace": list(after_trace),
    }
    if sharded:  # the artifact holds no weights: nxd_model.initialize takes them from the shards
        payload["weights_outside"] = "nxd_model.initialize"
    if spec.traced:
        payload["traced"] = spec.traced
    if spec.add_ons.get("ip_adapter_file"):  # the adapter's weights are in weight_hashes; its scale is traced in
        payload["ip_adapter_scale"] = spec.add_ons["ip_adapter_scale"]
    if loras:  # only the components an adapter touches change key
        payload["loras"] = [lora.cache_payload() for lora in loras]
    return component_key(payload)


def component_model(source: ModelSource, name: str) -> str:
    """The model a component's weights come from (the pipeline's, or the --unet, --vae or add-on replacing it):
    a hub id, or a local one as an absolute path, so `cache ls` names it from any directory."""
    model_id = source.model_id
    if name == "unet" and source.unet_id:
        model_id = source.unet_id
    elif role_of(name).source_folder == "vae" and source.vae_id:
        model_id = source.vae_id
    elif CONTROLNET.matches(name):
        model_id = source.controlnets[CONTROLNET.index(name)].model_id
    elif name == "image_encoder" and source.ip_adapter is not None:
        model_id = source.ip_adapter.model_id
    local = Path(model_id).expanduser()
    return str(local.resolve()) if local.exists() else model_id


# The libraries whose code is traced into an artifact: another version may trace a different graph.
TRACED_LIBRARIES = {
    "cpu": ("torch", "diffusers", "transformers"),
    "neuron": ("torch", "torch-neuronx", "diffusers", "transformers"),
}


def traced_library_versions(backend: str) -> dict[str, str | None]:
    import neuron_export.version  # looked up at each call: a test stands in another version

    return {name: neuron_export.version.installed_version(name) for name in TRACED_LIBRARIES[backend]}
