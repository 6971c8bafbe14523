"""Reading a finished export for running it: the manifest, the backend that built it, its required files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from neuron_export.errors import ExportError
from neuron_export.files import ARTIFACT_NAME, COMPONENT_CONFIG
from neuron_export.manifest import Manifest, read_manifest
from neuron_export.pipelines import DIFFUSERS_CLASSES, pipeline_named

DEFAULT_SEED = 0
LCM_ORIGINAL_STEPS = 50  # LCMScheduler's default original_inference_steps
# Checkpoints distilled to run without guidance in one or a few steps, by the hub id the manifest records.
TURBO_CHECKPOINTS = frozenset({"stabilityai/sdxl-turbo", "stabilityai/sd-turbo"})
# Their model cards' calls: text-to-image 1 step without guidance; from an init image, 2 steps at strength
# 0.5 (steps x strength must reach 1).
TURBO_DEFAULTS = {
    "text-to-image": {"num_inference_steps": 1, "guidance_scale": 0.0},
    "image-to-image": {"num_inference_steps": 2, "guidance_scale": 0.0, "strength": 0.5},
    "inpainting": {"num_inference_steps": 2, "guidance_scale": 0.0, "strength": 0.5},
}

DATA_PARALLEL_MODES = ("none", "unet", "transformer", "all")
NEURON_DEVICE_IDS = (0, 1)  # the two NeuronCores of one Inferentia2 chip


def read_export(export_dir: Path) -> Manifest:
    """The export's manifest, or one sentence saying why this is not an export we can run."""
    manifest = read_manifest(export_dir)
    name = manifest.pipeline.diffusers_pipeline
    if name not in DIFFUSERS_CLASSES:
        raise ExportError(
            f"EXPORT_DIR {export_dir}: pipeline {name} is not one `generate` runs; "
            f"it runs {', '.join(sorted(DIFFUSERS_CLASSES))}."
        )
    return manifest


def export_backend(export_dir: Path, manifest: Manifest) -> str:
    """ "cpu" or "neuron": every component of an export must have been built by the same backend."""
    backends = sorted({record.backend for record in manifest.components.values()})
    if len(backends) != 1:
        raise ExportError(
            f"EXPORT_DIR {export_dir} mixes backends ({', '.join(backends)}); re-export all components with one --backend."
        )
    return backends[0]


def required_components(manifest: Manifest) -> tuple[str, ...]:
    """The artifacts `generate` needs for this pipeline and task."""
    pipeline = manifest.pipeline
    names = []
    if pipeline.architecture != "sdxl-refiner":
        names.append("text_encoder")
    if pipeline.architecture in ("sdxl", "sdxl-refiner", "flux"):
        names.append("text_encoder_2")
    names.append("transformer" if pipeline.architecture.startswith(("pixart", "flux")) else "unet")
    kind = pipeline_named(pipeline.diffusers_pipeline)
    if kind is not None and "image" in kind.images:  # an init image is encoded to latents
        names.append("vae_encoder")
    names.append("vae_decoder")
    return tuple(names)


def check_export_complete(export_dir: Path, manifest: Manifest) -> None:
    for name in required_components(manifest):
        if name not in manifest.components:
            raise ExportError(
                f"EXPORT_DIR {export_dir} has no {name}, which {manifest.pipeline.diffusers_pipeline} needs; "
                "re-export without --components."
            )
        for filename in (ARTIFACT_NAME, COMPONENT_CONFIG):
            if not (export_dir / name / filename).is_file():
                raise ExportError(
                    f"EXPORT_DIR {export_dir} is missing {name}/{filename}; re-export the model (or run `neuron-export verify`)."
                )


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())
