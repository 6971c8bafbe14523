"""ExportConfig + the model's files -> a Plan: one Job per component, every check done before any weight loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neuron_export.backends import resolve_backend
from neuron_export.backends.neuron import compiler_args as neuron_compiler_args
from neuron_export.components import ComponentSpec, describe
from neuron_export.config import ExportConfig
from neuron_export.errors import UserError
from neuron_export.source import ModelFacts, ModelSource, check_safetensors, read_facts, resolve_source

# Largest difference from the eager model a component may show on fresh inputs. TorchScript on the CPU
# is the same arithmetic; NeuronCores with bf16/fp16 auto-cast round matmuls, the UNet most of all.
DEFAULT_ATOL = {
    ("cpu", "none"): 1e-4, ("cpu", "matmul"): 1e-4, ("cpu", "all"): 1e-4,
    ("neuron", "none"): 1e-3, ("neuron", "matmul"): 5e-2, ("neuron", "all"): 1e-1,
}

DIFFUSERS_PIPELINES = {
    ("sd", "text-to-image"): "StableDiffusionPipeline",
    ("sd", "image-to-image"): "StableDiffusionImg2ImgPipeline",
    ("sd", "inpainting"): "StableDiffusionInpaintPipeline",
    ("lcm", "text-to-image"): "LatentConsistencyModelPipeline",
    ("lcm", "image-to-image"): "LatentConsistencyModelImg2ImgPipeline",
    ("sd-xl", "text-to-image"): "StableDiffusionXLPipeline",
    ("sd-xl", "image-to-image"): "StableDiffusionXLImg2ImgPipeline",
    ("sd-xl", "inpainting"): "StableDiffusionXLInpaintPipeline",
}
OPTIMUM_PIPELINES = {
    ("sd", "text-to-image"): "NeuronStableDiffusionPipeline",
    ("sd", "image-to-image"): "NeuronStableDiffusionImg2ImgPipeline",
    ("sd", "inpainting"): "NeuronStableDiffusionInpaintPipeline",
    ("lcm", "text-to-image"): "NeuronLatentConsistencyModelPipeline",
    ("lcm", "image-to-image"): "NeuronLatentConsistencyModelPipeline",
    ("sd-xl", "text-to-image"): "NeuronStableDiffusionXLPipeline",
    ("sd-xl", "image-to-image"): "NeuronStableDiffusionXLImg2ImgPipeline",
    ("sd-xl", "inpainting"): "NeuronStableDiffusionXLInpaintPipeline",
}


@dataclass(frozen=True)
class Job:
    """One component to build: where its weights are, what it takes, how to compile it."""

    spec: ComponentSpec
    source_folder: Path
    weight_files: tuple[Path, ...]
    compiler_args: tuple[str, ...]
    atol: float

    @property
    def component(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Plan:
    config: ExportConfig
    source: ModelSource
    facts: ModelFacts
    backend: str
    output: Path
    height: int
    width: int
    jobs: tuple[Job, ...]
    diffusers_pipeline: str
    optimum_pipeline: str

    @property
    def data_parallel_mode(self) -> str:
        """How the runtime spreads the pipeline over an Inferentia2 chip's two NeuronCores."""
        return "all" if self.facts.is_lcm or self.config.family == "lcm" else "unet"


def default_output(config: ExportConfig, height: int, width: int) -> Path:
    name = f"{config.family}-neuron-{height}x{width}-b{config.batch_size}"
    if config.num_images_per_prompt > 1:
        name += f"-n{config.num_images_per_prompt}"
    return Path(name)


def check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise UserError(f"--output {output} already exists; pass --force to replace it, or choose another --output.")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file, not a directory; choose another --output.")


def check_family_and_task(config: ExportConfig, facts: ModelFacts) -> None:
    """A command that does not fit the model says so, naming the command that does."""
    model = config.model
    if config.family in ("sd", "lcm") and facts.is_xl:
        raise UserError(f"--model {model} is an SDXL pipeline; export it with `neuron-export sd-xl`.")
    if config.family == "sd-xl" and not facts.is_xl:
        command = "lcm" if facts.is_lcm else "sd"
        raise UserError(f"--model {model} is not an SDXL pipeline (no text_encoder_2 / text_time UNet); export it with `neuron-export {command}`.")
    if config.family == "sd" and facts.is_lcm:
        raise UserError(f"--model {model} has an LCM UNet (time_cond_proj_dim is set); export it with `neuron-export lcm`.")
    if config.family == "lcm" and not facts.is_lcm:
        raise UserError(
            f"--model {model} is not a latent consistency model (its UNet has no time_cond_proj_dim); "
            "export it with `neuron-export sd`, or pass an LCM checkpoint."
        )
    channels = facts.unet_in_channels
    if config.task == "inpainting":
        if config.family == "lcm":
            raise UserError("--task inpainting is not available for `neuron-export lcm`; use --task text-to-image or image-to-image.")
        if config.family == "sd" and channels != 9:
            raise UserError(
                f"--task inpainting needs an inpainting UNet with 9 input channels, but {model} has {channels}; "
                "pass an inpainting checkpoint such as stable-diffusion-v1-5/stable-diffusion-inpainting."
            )
    elif channels == 9:
        raise UserError(f"--task {config.task}: {model} is an inpainting model (9-channel UNet); pass --task inpainting.")
    if facts.kind == "sdxl-refiner" and config.task == "text-to-image":
        raise UserError(f"--task text-to-image: {model} is an SDXL refiner, which refines images; pass --task image-to-image.")


def make_plan(config: ExportConfig) -> Plan:
    """All checks that need the model's configs, then the jobs. Loads no weights."""
    if config.output is not None:
        check_output(config.output, config.force)
    backend = resolve_backend(config.backend)
    wanted = config.components or ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
    source = resolve_source(config.model or "", config.revision, config.unet, tuple(wanted),
                            token=config.token, cache_dir=config.hub_cache_dir, offline=config.offline)
    facts = read_facts(source)
    check_family_and_task(config, facts)
    if config.components is not None:
        missing = [name for name in config.components if name not in facts.components]
        if missing:
            raise UserError(f"--components {missing[0]}: {config.model} has no such component; it has {', '.join(facts.components)}.")
    names = [name for name in facts.components if config.components is None or name in config.components]

    height = config.height or facts.default_side
    width = config.width or facts.default_side
    output = config.output or default_output(config, height, width)
    if config.output is None:
        check_output(output, config.force)

    jobs = []
    for name in names:
        for weight_file in facts.weight_files[name]:
            check_safetensors(weight_file)
        spec = describe(name, facts, config.batch_size, config.num_images_per_prompt, height, width)
        args = neuron_compiler_args(name, facts.is_xl, config.auto_cast, config.auto_cast_type, config.optlevel, config.target)
        atol = config.atol or DEFAULT_ATOL[(backend, config.auto_cast)]
        jobs.append(Job(spec=spec, source_folder=source.folder(name), weight_files=facts.weight_files[name],
                        compiler_args=tuple(args), atol=atol))
    key = (config.family, config.task)
    return Plan(config=config, source=source, facts=facts, backend=backend, output=output, height=height,
                width=width, jobs=tuple(jobs), diffusers_pipeline=DIFFUSERS_PIPELINES[key],
                optimum_pipeline=OPTIMUM_PIPELINES[key])
