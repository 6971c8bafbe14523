"""SDXL base then refiner, checked from the two manifests before anything loads.

With a high-noise fraction the base denoises the first part of the schedule and hands its latents to the refiner,
which finishes it (optimum-neuron's SDXL tutorial: `denoising_end` / `denoising_start`); without one the base runs
fully and the refiner works on its latents as image-to-image at the refiner's own strength (diffusers' "base to
refiner" docs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuron_export.errors import ExportError
from neuron_export.files import MANIFEST_NAME
from neuron_export.manifest import Manifest, sha256_file
from neuron_export.pipelines import pipeline_for
from neuron_export.runtime.defaults import call_defaults
from neuron_export.runtime.reading import check_export_complete, export_backend, read_export

BASE_PIPELINE = pipeline_for("sd-xl", "text-to-image").diffusers  # the base a refiner follows


@dataclass(frozen=True)
class Refinement:
    """The refiner stage of a request: its export and how the schedule is split."""

    export_dir: Path
    manifest: Manifest
    high_noise_frac: float | None  # None: the base runs fully, the refiner works at `strength`
    strength: float | None

    def summary(self) -> str:
        split = (
            f"base to {self.high_noise_frac} of the schedule, then the refiner"
            if self.high_noise_frac is not None
            else f"base fully, then the refiner as image-to-image at strength {self.strength}"
        )
        return f"refiner: {self.export_dir} ({split})"

    def base_arguments(self) -> dict[str, Any]:
        """What the base call adds: latents out, and where it stops."""
        extra: dict[str, Any] = {"output_type": "latent"}
        if self.high_noise_frac is not None:
            extra["denoising_end"] = self.high_noise_frac
        return extra

    def refiner_arguments(self) -> dict[str, Any]:
        return (
            {"denoising_start": self.high_noise_frac}
            if self.high_noise_frac is not None
            else {"strength": self.strength}
        )


def _shapes(manifest: Manifest) -> str:
    p = manifest.pipeline
    return f"{p.height}x{p.width} (height x width), batch {p.batch_size}, {p.num_images_per_prompt} image(s) per prompt"


def _least_steps(fits: Any) -> int:
    steps = 1
    while not fits(steps):
        steps += 1
    return steps


def resolve_refinement(
    base_dir: Path, base: Manifest, refiner: Path | str | None, high_noise_frac: float | None, steps: int
) -> Refinement | None:
    """The refiner stage checked against the base export, or None without --refiner."""
    if refiner is None:
        if high_noise_frac is not None:
            raise ExportError(
                f"--high-noise-frac {high_noise_frac} applies only with --refiner; add --refiner "
                "REFINER_EXPORT or drop --high-noise-frac."
            )
        return None
    refiner_dir = Path(refiner)
    if base.pipeline.diffusers_pipeline != BASE_PIPELINE or base.pipeline.is_lcm:
        raise ExportError(
            f"--refiner follows an SDXL text-to-image export, but EXPORT_DIR {base_dir} is a "
            f"{base.pipeline.diffusers_pipeline}{' with an LCM UNet' if base.pipeline.is_lcm else ''}; "
            "drop --refiner or pass an SDXL base export."
        )
    try:
        manifest = read_export(refiner_dir)
    except ExportError as error:
        raise ExportError(f"--refiner {refiner_dir}: {error}") from None
    p = manifest.pipeline
    if p.architecture != "sdxl-refiner" or p.task != "image-to-image":
        raise ExportError(
            f"--refiner {refiner_dir} is not an SDXL refiner export (it is {p.architecture}, {p.task}); "
            "export one with `neuron-export sd-xl -m stabilityai/stable-diffusion-xl-refiner-1.0 "
            "--task image-to-image` at the base's shapes."
        )
    if _shapes(manifest) != _shapes(base):
        b = base.pipeline
        raise ExportError(
            f"--refiner {refiner_dir} is compiled for {_shapes(manifest)} but EXPORT_DIR {base_dir} for "
            f"{_shapes(base)}; re-export the refiner with --height {b.height} --width {b.width} "
            f"--batch-size {b.batch_size} --num-images-per-prompt {b.num_images_per_prompt}."
        )
    check_export_complete(refiner_dir, manifest)
    export_backend(refiner_dir, manifest)
    strength = None
    if high_noise_frac is not None:
        if not 0.0 < high_noise_frac < 1.0:
            raise ExportError(
                f"--high-noise-frac {high_noise_frac} is out of range; pass a fraction between 0 and 1 such as 0.8."
            )
        frac = high_noise_frac

        def fits(count: int) -> bool:  # both stages keep at least one step
            return 1 <= round(count * frac) < count
    else:
        strength = call_defaults(manifest).strength
        assert strength is not None  # an image-to-image export always has one

        def fits(count: int) -> bool:
            return int(count * strength) >= 1

    if not fits(steps):
        raise ExportError(
            f"--steps {steps} leaves the {'base or the ' if high_noise_frac is not None else ''}refiner "
            f"no denoising step; pass --steps {_least_steps(fits)} or more."
        )
    return Refinement(refiner_dir, manifest, high_noise_frac, strength)


def manifest_digest(export_dir: Path) -> str:
    """The export's identity for the image metadata: the sha256 of its manifest."""
    return sha256_file(Path(export_dir) / MANIFEST_NAME)
