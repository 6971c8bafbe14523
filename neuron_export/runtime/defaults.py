"""A call's defaults: the diffusers pipeline class's own, or a turbo checkpoint's model card.

An LCM UNet inside another pipeline (LCM-SDXL) takes the steps and guidance of diffusers' LCM pipeline
classes: the SDXL class's 50 steps would ask the LCM scheduler for more steps than it distils to.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from neuron_export.errors import ExportError
from neuron_export.manifest import Manifest
from neuron_export.pipelines import LCM_CLASSES, lcm_pipeline
from neuron_export.runtime.reading import TURBO_CHECKPOINTS, TURBO_DEFAULTS


@dataclass(frozen=True)
class CallDefaults:
    steps: int
    guidance_scale: float
    strength: float | None  # None for text-to-image
    source: str  # where they come from, for the first line `generate` prints


def is_turbo(manifest: Manifest) -> bool:
    """Made from a turbo checkpoint: the recorded source (or replacement UNet) is one of TURBO_CHECKPOINTS."""
    ids = (manifest.source.model_id, manifest.source.unet_id)
    return any(value is not None and value.strip().lower() in TURBO_CHECKPOINTS for value in ids)


def call_defaults(manifest: Manifest) -> CallDefaults:
    """What diffusers' own pipeline class uses when a caller passes nothing (turbo: what its model card passes)."""
    pipeline = manifest.pipeline
    uses_image = pipeline.task in ("image-to-image", "inpainting")  # the tasks with a strength
    if is_turbo(manifest):
        card = TURBO_DEFAULTS[pipeline.task]
        return CallDefaults(
            int(card["num_inference_steps"]),
            card["guidance_scale"],
            card.get("strength") if uses_image else None,
            f"the {manifest.source.model_id} model card",
        )
    import diffusers

    cls = getattr(diffusers, pipeline.diffusers_pipeline, None)
    if cls is None:
        raise ExportError(
            f"diffusers {diffusers.__version__} has no {pipeline.diffusers_pipeline}, the pipeline this export "
            "runs in; upgrade diffusers."
        )
    parameters = dict(inspect.signature(cls.__call__).parameters)
    source = f"{cls.__name__}.__call__"
    if pipeline.is_lcm and cls.__name__ not in LCM_CLASSES:
        lcm_cls = getattr(diffusers, lcm_pipeline(pipeline.task).diffusers)
        lcm_parameters = inspect.signature(lcm_cls.__call__).parameters
        parameters.update(
            {
                name: lcm_parameters[name]
                for name in ("num_inference_steps", "guidance_scale", "strength")
                if name in lcm_parameters
            }
        )
        source = f"{lcm_cls.__name__}.__call__, for its LCM UNet"
    names = ("num_inference_steps", "guidance_scale") + (("strength",) if uses_image else ())
    values = {}
    for name in names:
        default = parameters[name].default if name in parameters else inspect.Parameter.empty
        if not isinstance(default, (int, float)) or isinstance(default, bool):
            flag = {"num_inference_steps": "--steps", "guidance_scale": "--guidance-scale", "strength": "--strength"}[
                name
            ]
            raise ExportError(
                f"{flag} has no default here: diffusers {diffusers.__version__} {cls.__name__}.__call__ gives "
                f"{name} none; pass {flag}."
            )
        values[name] = default
    return CallDefaults(
        int(values["num_inference_steps"]),
        float(values["guidance_scale"]),
        float(values["strength"]) if uses_image else None,
        source,
    )
