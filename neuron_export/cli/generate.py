"""The `generate` command: run an export and write images (registered by cli.py).

A thin layer over `neuron_export.runtime`: parse flags, check the request against the export's compiled
shapes (before any artifact loads), show progress per denoising step, write one PNG (a grid when the
call makes several images). torch and diffusers are imported only when the command runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer

from neuron_export.errors import ExportError

GENERATE_HELP = (
    "Generate images with an export (CPU TorchScript here; Neuron artifacts on an inf2/trn1 host) and write "
    "them to one PNG, a grid when there are several. Shapes are the compiled ones: --height, --width, "
    "--num-images-per-prompt and the number of prompts must match the export. Steps, guidance and strength "
    "default to the diffusers pipeline class's own (an LCM UNet: LCM's; a turbo checkpoint: its model card's); "
    "the first line printed says which values are used. --refiner runs an SDXL refiner export after the base. "
    "The PNG records the prompt, seed, steps, guidance and export in its text chunks."
)


class StepProgress:
    """Denoising progress: a rich bar on a terminal, one plain line per step otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self._progress: Any = None
        self._task: Any = None

    def __call__(self, step: int, total: int) -> None:
        if not self.interactive:
            print(f"step {step}/{total}", file=self.stream, flush=True)
            return
        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("denoising"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
            )
            self._progress.start()
            self._task = self._progress.add_task("denoising", total=total)
        self._progress.update(self._task, completed=step, total=total)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def check_output_path(output: Path) -> None:
    """Fail before any work if the image cannot be written where asked."""
    from PIL import Image

    Image.init()
    if output.suffix.lower() not in Image.registered_extensions():
        raise ExportError(f"--output {output} has no image extension PIL can write; end it with .png.")
    if output.is_dir():
        raise ExportError(f"--output {output} is a directory; pass a file name such as {output / 'image.png'}.")
    if not output.parent.is_dir():
        raise ExportError(
            f"--output {output}: directory {output.parent} does not exist; create it or choose another path."
        )


def png_metadata(values: dict[str, Any]) -> Any:
    """PNG text chunks, one per value given (Image.open(path).text reads them back)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in values.items():
        if value is not None:
            info.add_text(key, str(value))
    return info


def write_image(image: Any, output: Path, metadata: dict[str, Any] | None = None) -> None:
    """Write atomically: a failed or interrupted save leaves no partial file behind. `metadata` goes into a PNG's text chunks."""
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=output.suffix, dir=output.parent)
    os.close(handle)
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; an image is as readable as any file the user writes
    try:
        if metadata and output.suffix.lower() == ".png":
            image.save(temporary, pnginfo=png_metadata(metadata))
        else:
            image.save(temporary)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def image_metadata(export_dir: Path, request: Any, refinement: Any) -> dict[str, Any]:
    """What made the image: the request's values and the export(s), by absolute path and manifest digest."""
    from neuron_export.runtime.refining import manifest_digest
    from neuron_export.version import __version__

    values: dict[str, Any] = {
        "prompt": "\n".join(request.prompts),  # one line per prompt of the batch
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "strength": request.strength,
        "image_guidance_scale": request.add_ons.image_guidance_scale,
        "export": Path(export_dir).resolve(),
        "export_manifest_sha256": manifest_digest(export_dir),
        "software": f"neuron-export {__version__}",
    }
    if refinement is not None:
        values.update(
            refiner=refinement.export_dir.resolve(),
            refiner_manifest_sha256=manifest_digest(refinement.export_dir),
            high_noise_frac=refinement.high_noise_frac,
            refiner_strength=refinement.strength,
        )
    return values


def run_generate(
    export_dir: Path,
    prompts: list[str],
    output: Path,
    *,
    negative_prompt: str | None = None,
    image: Path | None = None,
    mask: Path | None = None,
    strength: float | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    num_images_per_prompt: int | None = None,
    batch_size: int | None = None,
    height: int | None = None,
    width: int | None = None,
    control_images: list[Path] | None = None,
    controlnet_scale: list[float] | None = None,
    ip_adapter_image: Path | None = None,
    image_guidance_scale: float | None = None,
    refiner: Path | None = None,
    high_noise_frac: float | None = None,
) -> Path:
    from neuron_export.runtime.generation import grid_shape, image_grid, run_refined, run_request
    from neuron_export.runtime.loading import load_pipeline
    from neuron_export.runtime.reading import export_backend, read_export
    from neuron_export.runtime.refining import resolve_refinement
    from neuron_export.runtime.requests import resolve_request

    manifest = read_export(export_dir)
    request = resolve_request(
        export_dir,
        manifest,
        prompts,
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
        control_images=control_images or (),
        controlnet_scale=controlnet_scale or None,
        ip_adapter_image=ip_adapter_image,
        image_guidance_scale=image_guidance_scale,
    )
    refinement = resolve_refinement(export_dir, manifest, refiner, high_noise_frac, request.steps)
    check_output_path(output)
    print(request.summary(), flush=True)
    if refinement is not None:
        print(refinement.summary(), flush=True)
    for note in request.notes:
        print(note, flush=True)
    pipeline = manifest.pipeline
    backend = export_backend(export_dir, manifest)
    print(f"Loading {export_dir} ({pipeline.diffusers_pipeline}, {pipeline.task}, backend {backend})", flush=True)
    started = time.monotonic()
    pipe = load_pipeline(export_dir, manifest)
    second = load_pipeline(refinement.export_dir, refinement.manifest) if refinement is not None else None
    print(f"Loaded in {time.monotonic() - started:.1f}s; generating", flush=True)
    progress = StepProgress()
    started = time.monotonic()
    try:
        if refinement is not None:
            images = run_refined(pipe, second, request, refinement, output_type="pil", on_step=progress)
        else:
            images = run_request(pipe, request, output_type="pil", on_step=progress)
    finally:
        progress.close()
    rows, columns = grid_shape(len(images), request.num_images_per_prompt)
    picture = image_grid(images, columns)
    write_image(picture, output, image_metadata(export_dir, request, refinement))
    layout = f" as a {rows}x{columns} grid" if len(images) > 1 else ""
    print(
        f"Wrote {len(images)} image(s){layout} ({picture.size[1]}x{picture.size[0]}, height x width) to {output} "
        f"in {time.monotonic() - started:.1f}s",
        flush=True,
    )
    return output


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""

    @app.command("generate", help=GENERATE_HELP)
    def generate_command(
        export_dir: Path = typer.Argument(..., metavar="EXPORT_DIR", help="A directory written by neuron-export."),
        prompt: list[str] = typer.Option(
            ..., "--prompt", "-p", metavar="TEXT", help="Text prompt; repeat it once per prompt of the compiled batch."
        ),
        output: Path = typer.Option(
            ..., "--output", "-o", help="Image file to write (PNG); several images become one grid."
        ),
        negative_prompt: str | None = typer.Option(
            None, "--negative-prompt", help="What to steer away from (not for LCM)."
        ),
        image: Path | None = typer.Option(
            None, "--image", help="Initial image (image-to-image and inpainting exports)."
        ),
        mask: Path | None = typer.Option(None, "--mask", help="Inpainting mask, white = repaint (inpainting exports)."),
        strength: float | None = typer.Option(
            None,
            "--strength",
            help="How much to change --image, (0, 1] [default: the pipeline class's, e.g. 0.8; SDXL 0.3; turbo 0.5].",
        ),
        steps: int | None = typer.Option(
            None, "--steps", help="Denoising steps [default: the pipeline class's, e.g. 50; LCM 4; turbo 1]."
        ),
        guidance_scale: float | None = typer.Option(
            None,
            "--guidance-scale",
            help="Classifier-free guidance [default: the pipeline class's, e.g. 7.5; SDXL 5.0; LCM 8.5; turbo 0.0].",
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the torch.Generator."),
        num_images_per_prompt: int | None = typer.Option(
            None, "--num-images-per-prompt", help="Must equal the compiled value [default: it]."
        ),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Repeat a single --prompt this many times (must equal the compiled batch)."
        ),
        height: int | None = typer.Option(None, "--height", help="Must equal the compiled height [default: it]."),
        width: int | None = typer.Option(None, "--width", help="Must equal the compiled width [default: it]."),
        control_image: list[Path] | None = typer.Option(
            None,
            "--control-image",
            help="ControlNet exports: the control image; repeat once per ControlNet, in --controlnet order.",
        ),
        controlnet_scale: list[float] | None = typer.Option(
            None,
            "--controlnet-scale",
            help="ControlNet weight, 0 to 2; one for all or one per ControlNet [default: 1.0].",
        ),
        ip_adapter_image: Path | None = typer.Option(
            None, "--ip-adapter-image", help="IP-Adapter exports: the image prompt."
        ),
        image_guidance_scale: float | None = typer.Option(
            None,
            "--image-guidance-scale",
            help="InstructPix2Pix exports: how closely to follow --image, 1 or more [default: the pipeline class's, 1.5].",
        ),
        refiner: Path | None = typer.Option(
            None,
            "--refiner",
            metavar="REFINER_EXPORT",
            help="SDXL base exports: an SDXL refiner export (same shapes) that finishes the base's latents.",
        ),
        high_noise_frac: float | None = typer.Option(
            None,
            "--high-noise-frac",
            help="With --refiner: the base denoises this fraction of the schedule, the refiner the rest (e.g. 0.8) [default: the base runs fully, the refiner as image-to-image].",
        ),
    ) -> None:
        run_generate(
            export_dir,
            prompt,
            output,
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
            control_images=control_image,
            controlnet_scale=controlnet_scale,
            ip_adapter_image=ip_adapter_image,
            image_guidance_scale=image_guidance_scale,
            refiner=refiner,
            high_noise_frac=high_noise_frac,
        )
