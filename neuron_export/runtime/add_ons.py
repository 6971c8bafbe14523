"""The generation inputs of ControlNet, IP-Adapter and InstructPix2Pix exports, checked against the export's manifest
before anything loads: control images (one per ControlNet, in --controlnet order) and their scales, the IP-Adapter's
image prompt, and InstructPix2Pix's image guidance."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from neuron_export.errors import ExportError
from neuron_export.manifest import Manifest
from neuron_export.roles.registry import CONTROLNET

CONTROLNET_SCALE_RANGE = (0.0, 2.0)  # diffusers' documented range for controlnet_conditioning_scale


@dataclass(frozen=True)
class AddOns:
    control_images: tuple[Any, ...] = ()
    controlnet_scale: tuple[float, ...] = ()  # one per ControlNet
    ip_adapter_image: Any = None
    image_guidance_scale: float | None = None

    def call_arguments(self) -> dict[str, Any]:
        """The diffusers pipeline's keyword arguments for these inputs."""
        kwargs: dict[str, Any] = {}
        if self.control_images:
            single = len(self.control_images) == 1
            kwargs["image"] = self.control_images[0] if single else list(self.control_images)
            kwargs["controlnet_conditioning_scale"] = (
                self.controlnet_scale[0] if single else list(self.controlnet_scale)
            )
        if self.ip_adapter_image is not None:
            kwargs["ip_adapter_image"] = self.ip_adapter_image
        if self.image_guidance_scale is not None:
            kwargs["image_guidance_scale"] = self.image_guidance_scale
        return kwargs


def controlnet_count(manifest: Manifest) -> int:
    return sum(1 for name in manifest.components if CONTROLNET.matches(name))


def _class_default(manifest: Manifest, name: str) -> float:
    import diffusers

    parameter = inspect.signature(getattr(diffusers, manifest.pipeline.diffusers_pipeline).__call__).parameters[name]
    return float(parameter.default)


def resolve_add_ons(
    manifest: Manifest,
    open_image: Callable[[Any, str, str | None], Any],
    *,
    control_images: Sequence[Any] = (),
    controlnet_scale: float | Sequence[float] | None = None,
    ip_adapter_image: Any = None,
    image_guidance_scale: float | None = None,
) -> AddOns:
    """Every add-on input checked against what the export was built with; `open_image(value, flag, mode)`."""
    count = controlnet_count(manifest)
    control_images = list(control_images or ())
    if len(control_images) != count:
        if count == 0:
            raise ExportError(
                "--control-image applies only to exports with --controlnet; drop it or re-export with a ControlNet."
            )
        raise ExportError(
            f"--control-image was given {len(control_images)} time(s) but this export has {count} "
            f"ControlNet(s); pass one --control-image per ControlNet, in --controlnet order."
        )
    scales = [controlnet_scale] if isinstance(controlnet_scale, (int, float)) else list(controlnet_scale or [])
    if scales and count == 0:
        raise ExportError("--controlnet-scale applies only to exports with --controlnet; drop it.")
    if len(scales) not in (0, 1, count):
        raise ExportError(
            f"--controlnet-scale was given {len(scales)} times for {count} ControlNets; pass one value "
            f"for all, or one per ControlNet."
        )
    low, high = CONTROLNET_SCALE_RANGE
    for scale in scales:
        if not (math.isfinite(scale) and low <= scale <= high):
            raise ExportError(
                f"--controlnet-scale {scale} is out of range; pass a value from {low:g} (no control) to {high:g}."
            )
    scales = (scales or [1.0]) * (count if len(scales) <= 1 else 1)
    has_encoder = "image_encoder" in manifest.components
    if has_encoder and ip_adapter_image is None:
        raise ExportError("--ip-adapter-image is missing: this export has an IP-Adapter; pass --ip-adapter-image IMG.")
    if not has_encoder and ip_adapter_image is not None:
        raise ExportError("--ip-adapter-image applies only to exports with --ip-adapter; drop it.")
    pix2pix = manifest.pipeline.task == "instruct-pix2pix"
    if image_guidance_scale is not None and not pix2pix:
        raise ExportError("--image-guidance-scale applies only to instruct-pix2pix exports; drop it.")
    if pix2pix:
        image_guidance_scale = (
            _class_default(manifest, "image_guidance_scale") if image_guidance_scale is None else image_guidance_scale
        )
        if not (math.isfinite(image_guidance_scale) and image_guidance_scale >= 1.0):
            raise ExportError(
                f"--image-guidance-scale {image_guidance_scale} is out of range; pass 1 or more "
                "(1 leaves the image guidance off, higher stays closer to --image)."
            )
    return AddOns(
        control_images=tuple(open_image(image, "--control-image", "RGB") for image in control_images),
        controlnet_scale=tuple(float(scale) for scale in scales),
        ip_adapter_image=None if ip_adapter_image is None else open_image(ip_adapter_image, "--ip-adapter-image", None),
        image_guidance_scale=image_guidance_scale,
    )
