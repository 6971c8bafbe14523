"""Generating: one checked request through a loaded pipeline, and the images laid out as a grid."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from neuron_export.runtime.loading import load_pipeline
from neuron_export.runtime.reading import DEFAULT_SEED, read_export
from neuron_export.runtime.refining import Refinement, resolve_refinement
from neuron_export.runtime.requests import Request, resolve_request


def step_callback(on_step: Callable[[int, int], None]) -> Callable[..., dict[str, Any]]:
    """diffusers' callback_on_step_end, reporting (step, total) of the running call."""

    def step_end(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = getattr(pipeline, "_num_timesteps", None) or len(pipeline.scheduler.timesteps)
        on_step(index + 1, int(total))
        return {}

    return step_end


def call_pipeline(pipe: Any, kwargs: dict[str, Any], on_step: Callable[[int, int], None] | None = None) -> Any:
    """Call a pipeline with the keyword arguments its __call__ takes; returns its images."""
    import torch

    if on_step is not None:
        kwargs = {**kwargs, "callback_on_step_end": step_callback(on_step)}
    parameters = inspect.signature(pipe.__call__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        kwargs = {key: value for key, value in kwargs.items() if key in parameters}
    with torch.no_grad():
        return pipe(**kwargs).images


def request_arguments(request: Request, generator: Any, output_type: str) -> dict[str, Any]:
    """The diffusers call for one checked request."""
    kwargs: dict[str, Any] = {
        "prompt": list(request.prompts),
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "num_images_per_prompt": request.num_images_per_prompt,
        "generator": generator,
        "output_type": output_type,
        "height": request.height,
        "width": request.width,
    }
    if request.negative_prompt is not None:
        kwargs["negative_prompt"] = request.negative_prompt
    if request.image is not None:
        kwargs["image"] = request.image
    if request.mask is not None:
        kwargs["mask_image"] = request.mask
    if request.strength is not None:
        kwargs["strength"] = request.strength
    kwargs.update(request.add_ons.call_arguments())
    return kwargs


def run_request(
    pipe: Any, request: Request, *, output_type: str = "pil", on_step: Callable[[int, int], None] | None = None
) -> Any:
    """Call the pipeline for one checked request; returns its images (PIL list or numpy array)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(request.seed)
    return call_pipeline(pipe, request_arguments(request, generator, output_type), on_step)


def run_refined(
    base: Any,
    refiner: Any,
    request: Request,
    refinement: Refinement,
    *,
    output_type: str = "pil",
    on_step: Callable[[int, int], None] | None = None,
) -> Any:
    """The base's latents through the refiner; one generator seeded with the request's seed serves both calls."""
    import torch

    generator = torch.Generator("cpu").manual_seed(request.seed)
    latents = call_pipeline(
        base, {**request_arguments(request, generator, output_type), **refinement.base_arguments()}, on_step
    )
    kwargs: dict[str, Any] = {
        "prompt": list(request.prompts),
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "num_images_per_prompt": request.num_images_per_prompt,
        "generator": generator,
        "output_type": output_type,
        "image": latents,
        **refinement.refiner_arguments(),
    }
    if request.negative_prompt is not None:
        kwargs["negative_prompt"] = request.negative_prompt
    return call_pipeline(refiner, kwargs, on_step)


def generate_images(
    export_dir: Path | str,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | None = None,
    image: Any = None,
    mask: Any = None,
    strength: float | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = DEFAULT_SEED,
    num_images_per_prompt: int | None = None,
    batch_size: int | None = None,
    height: int | None = None,
    width: int | None = None,
    control_images: Sequence[Any] = (),
    controlnet_scale: float | Sequence[float] | None = None,
    ip_adapter_image: Any = None,
    image_guidance_scale: float | None = None,
    output_type: str = "pil",
    on_step: Callable[[int, int], None] | None = None,
    pipeline: Any = None,
    refiner: Path | str | None = None,
    high_noise_frac: float | None = None,
    refiner_pipeline: Any = None,
) -> Any:
    """Generate with an export: checks the request first, then loads (or reuses `pipeline`) and runs it.

    `output_type="np"` returns a float array [N, H, W, 3] in [0, 1], as diffusers does. `refiner` (an SDXL
    refiner export) finishes the base's latents, from `high_noise_frac` of the schedule when given.
    """
    export_dir = Path(export_dir)
    manifest = read_export(export_dir)
    request = resolve_request(
        export_dir,
        manifest,
        prompt,
        negative_prompt=negative_prompt,
        image=image,
        mask=mask,
        strength=strength,
        steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        num_images_per_prompt=num_images_per_prompt,
        batch_size=batch_size,
        height=height,
        width=width,
        control_images=control_images,
        controlnet_scale=controlnet_scale,
        ip_adapter_image=ip_adapter_image,
        image_guidance_scale=image_guidance_scale,
    )
    refinement = resolve_refinement(export_dir, manifest, refiner, high_noise_frac, request.steps)
    pipe = pipeline if pipeline is not None else load_pipeline(export_dir, manifest)
    if refinement is None:
        return run_request(pipe, request, output_type=output_type, on_step=on_step)
    second = (
        refiner_pipeline if refiner_pipeline is not None else load_pipeline(refinement.export_dir, refinement.manifest)
    )
    return run_refined(pipe, second, request, refinement, output_type=output_type, on_step=on_step)


def grid_shape(count: int, per_prompt: int) -> tuple[int, int]:
    """(rows, columns): one row per prompt, one column per image of that prompt."""
    columns = max(1, min(per_prompt, count))
    return math.ceil(count / columns), columns


def image_grid(images: Sequence[Any], columns: int) -> Any:
    """Several PIL images of one size -> one image laid out row by row."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, tile in enumerate(images):
        grid.paste(tile, ((index % columns) * width, (index // columns) * height))
    return grid
