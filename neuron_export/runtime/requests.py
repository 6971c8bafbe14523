"""A generation request, checked against the export's compiled shapes from the manifest alone,
before any artifact is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuron_export.errors import ExportError
from neuron_export.manifest import Manifest
from neuron_export.pipelines import LCM_CLASSES
from neuron_export.runtime.add_ons import AddOns, resolve_add_ons
from neuron_export.runtime.defaults import call_defaults
from neuron_export.runtime.reading import (
    DEFAULT_SEED,
    LCM_ORIGINAL_STEPS,
    _read_json,
    check_export_complete,
    export_backend,
)


@dataclass(frozen=True)
class Request:
    """One generation, every value resolved and checked against the export."""

    prompts: tuple[str, ...]
    negative_prompt: str | None
    image: Any  # PIL image (or an array / tensor from the Python API), None for text-to-image
    mask: Any
    strength: float | None
    steps: int
    guidance_scale: float
    seed: int
    num_images_per_prompt: int
    height: int
    width: int
    notes: tuple[str, ...] = ()  # things the user should know (an init image resized to the compiled size)
    defaults_from: str = ""  # where the values not given came from
    add_ons: AddOns = AddOns()  # control images, IP-Adapter image, image guidance

    @property
    def image_count(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def summary(self) -> str:
        """The values this request runs with, as `generate` prints them first."""
        strength = f" strength={self.strength}" if self.strength is not None else ""
        return (
            f"generate: steps={self.steps} guidance={self.guidance_scale}{strength} seed={self.seed} "
            f"size={self.height}x{self.width} (height x width) images={self.image_count} (defaults: {self.defaults_from})"
        )


def _open_image(value: Any, flag: str, mode: str, size: tuple[int, int] | None, notes: list[str]) -> Any:
    """A path or PIL image -> a PIL image of the compiled size; arrays and tensors pass through unchanged."""
    from PIL import Image

    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise ExportError(f"{flag} {path} does not exist; pass an image file (PNG or JPEG).")
        try:
            with Image.open(path) as opened:
                value = opened.convert(mode)
        except Exception as exc:  # PIL raises several types for unreadable files
            raise ExportError(
                f"{flag} {path} cannot be read as an image ({type(exc).__name__}); pass a PNG or JPEG file."
            ) from None
    if isinstance(value, Image.Image):
        value = value.convert(mode)
        if size is not None and value.size != size:
            notes.append(
                f"{flag} is {value.size[1]}x{value.size[0]} (height x width); resized to the compiled "
                f"{size[1]}x{size[0]}."
            )
            value = value.resize(size, Image.Resampling.NEAREST if mode == "L" else Image.Resampling.LANCZOS)
    return value


def _lcm_original_steps(export_dir: Path) -> int:
    path = export_dir / "scheduler" / "scheduler_config.json"
    if path.is_file():
        value = _read_json(path).get("original_inference_steps")
        if isinstance(value, int) and value > 0:
            return value
    return LCM_ORIGINAL_STEPS


def resolve_request(
    export_dir: Path,
    manifest: Manifest,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | None = None,
    image: Any = None,
    mask: Any = None,
    strength: float | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    num_images_per_prompt: int | None = None,
    batch_size: int | None = None,
    height: int | None = None,
    width: int | None = None,
    control_images: Sequence[Any] = (),
    controlnet_scale: float | Sequence[float] | None = None,
    ip_adapter_image: Any = None,
    image_guidance_scale: float | None = None,
) -> Request:
    """Defaults filled in and every value checked against the manifest; reads no artifact."""
    export_dir = Path(export_dir)
    pipeline = manifest.pipeline
    task = pipeline.task
    dynamic = bool(manifest.config.get("dynamic_batch_size"))

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ExportError("--prompt is missing; pass at least one --prompt TEXT.")
    if batch_size is not None:
        if batch_size < 1:
            raise ExportError(f"--batch-size {batch_size} is not a batch; pass a positive number.")
        if len(prompts) == 1:
            prompts = prompts * batch_size
        elif len(prompts) != batch_size:
            raise ExportError(
                f"--batch-size {batch_size} does not match the {len(prompts)} --prompt values given; "
                f"pass one --prompt to repeat it, or exactly {batch_size}."
            )
    compiled_batch = pipeline.batch_size
    fits = len(prompts) == compiled_batch or (dynamic and len(prompts) % compiled_batch == 0)
    if not fits:
        raise ExportError(
            f"batch {len(prompts)} (the number of prompts) does not fit this export, compiled for batch "
            f"{compiled_batch}; pass --prompt {compiled_batch} time(s) (or one --prompt with --batch-size "
            f"{compiled_batch}), or re-export with --batch-size {len(prompts)}."
        )
    for flag, value, compiled in (
        ("--height", height, pipeline.height),
        ("--width", width, pipeline.width),
        ("--num-images-per-prompt", num_images_per_prompt, pipeline.num_images_per_prompt),
    ):
        if value is not None and value != compiled:
            raise ExportError(
                f"{flag} {value} does not fit this export, compiled for {flag[2:]} {compiled}; "
                f"pass {flag} {compiled} or re-export with {flag} {value}."
            )

    if task == "inpainting":
        if image is None:
            raise ExportError(
                "--image is missing: this export is an inpainting pipeline; pass --image INIT.png and --mask MASK.png."
            )
        if mask is None:
            raise ExportError(
                "--mask is missing: this export is an inpainting pipeline; pass --mask MASK.png (white = repaint)."
            )
    elif task == "instruct-pix2pix":
        if image is None:
            raise ExportError(
                "--image is missing: this export is an InstructPix2Pix pipeline; pass --image IMAGE.png to edit."
            )
        for flag, given in (("--mask", mask), ("--strength", strength)):
            if given is not None:
                raise ExportError(
                    f"{flag} does not apply to InstructPix2Pix exports; drop {flag} "
                    "(--image-guidance-scale sets how closely the result follows --image)."
                )
    elif task == "image-to-image":
        if image is None:
            raise ExportError("--image is missing: this export is an image-to-image pipeline; pass --image INIT.png.")
        if mask is not None:
            raise ExportError(
                "--mask applies only to inpainting exports, but this export is image-to-image; "
                "drop --mask or re-export with --task inpainting."
            )
    else:
        for flag, given in (("--image", image), ("--mask", mask), ("--strength", strength)):
            if given is not None:
                raise ExportError(
                    f"{flag} applies only to image-to-image and inpainting exports, but this export is "
                    f"text-to-image; drop {flag} or re-export with --task image-to-image."
                )
    if negative_prompt is not None and pipeline.is_lcm:
        raise ExportError(
            "--negative-prompt has no effect on a latent consistency model (it runs without "
            "classifier-free guidance); drop --negative-prompt."
        )

    if steps is not None and steps < 1:
        raise ExportError(f"--steps {steps} is not a number of denoising steps; pass 1 or more.")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise ExportError(f"--strength {strength} is out of range; pass a value in (0, 1].")
    # Read after the checks above: it imports the diffusers pipeline class, which takes seconds.
    defaults = call_defaults(manifest)
    steps = steps if steps is not None else defaults.steps
    guidance_scale = guidance_scale if guidance_scale is not None else defaults.guidance_scale
    if task != "text-to-image":
        strength = strength if strength is not None else defaults.strength
    lcm_strength = pipeline.diffusers_pipeline in LCM_CLASSES and strength is not None
    if pipeline.is_lcm:
        # LCMScheduler spaces the steps over original_inference_steps (times strength in the LCM img2img pipeline).
        original = _lcm_original_steps(export_dir)
        usable = int(original * strength) if lcm_strength and strength is not None else original
        if steps > usable:
            raise ExportError(
                f"--steps {steps} is more than the LCM scheduler allows here ({usable}); "
                f"pass --steps {usable} or fewer (LCM needs 2-8){' or a higher --strength' if lcm_strength else ''}."
            )
    if strength is not None and not lcm_strength and int(steps * strength) < 1:
        needed = steps
        while int(needed * strength) < 1:
            needed += 1
        raise ExportError(
            f"--steps {steps} with --strength {strength} leaves no denoising step (steps x strength "
            f"must reach 1); pass --steps {needed} or more, or a higher --strength."
        )

    notes: list[str] = []
    size = (pipeline.width, pipeline.height)
    if image is not None:
        image = _open_image(image, "--image", "RGB", size, notes)
    if mask is not None:
        mask = _open_image(mask, "--mask", "L", size, notes)
    # Control images are resized to the compiled size; the IP-Adapter's feature extractor sizes its own image.
    add_ons = resolve_add_ons(
        manifest,
        lambda value, flag, mode: _open_image(value, flag, mode or "RGB", size if mode else None, notes),
        control_images=control_images,
        controlnet_scale=controlnet_scale,
        ip_adapter_image=ip_adapter_image,
        image_guidance_scale=image_guidance_scale,
    )
    check_export_complete(export_dir, manifest)
    export_backend(export_dir, manifest)
    return Request(
        prompts=tuple(prompts),
        negative_prompt=negative_prompt,
        image=image,
        mask=mask,
        strength=strength,
        steps=steps,
        guidance_scale=float(guidance_scale),
        seed=DEFAULT_SEED if seed is None else seed,
        num_images_per_prompt=pipeline.num_images_per_prompt,
        height=pipeline.height,
        width=pipeline.width,
        notes=tuple(notes),
        defaults_from=defaults.source,
        add_ons=add_ons,
    )
