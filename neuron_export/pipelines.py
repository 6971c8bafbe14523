"""The one pipelines table: what each (family, task, add-on) exports to, and how its users call it.

The planner names the pipeline classes the manifest records from it; the runtime reads which pipeline
classes it runs and which images a call needs; the model card takes its Hub tag, loading example and
`generate` line. No torch, no diffusers: every room may import this module.
"""

from __future__ import annotations

from dataclasses import dataclass

ASTRONAUT = "a photo of an astronaut riding a horse on mars"


@dataclass(frozen=True)
class PipelineKind:
    """One exportable pipeline: its classes, its Hub tag, the images a call takes, its examples."""

    family: str  # the export command: sd, sd-xl, lcm, pixart, flux
    task: str  # --task
    add_on: str | None  # "controlnet" when --controlnet is given, else None
    diffusers: str  # diffusers' pipeline class, recorded as the manifest's diffusers_pipeline
    optimum: str  # optimum-neuron's pipeline class, recorded as optimum_pipeline
    hub_tag: str  # the model card's pipeline_tag
    # the images a call needs, by `generate`'s option (without --); control-image repeats per ControlNet
    images: tuple[str, ...]
    prompt: str  # the examples' prompt

    @property
    def is_lcm(self) -> bool:
        return self.family == "lcm"

    def example_call(self, controlnets: int = 1) -> str:
        """Python after `pipe = ...from_pretrained(...)` in the model card: open the images, call, keep the image
        (several ControlNets take a list of control images)."""

        def value(name: str) -> str:
            several = name == "control-image" and controlnets > 1
            return f"[{', '.join([_variable(name)] * controlnets)}]" if several else _variable(name)

        lines = [f'{_variable(name)} = Image.open("{_file(name)}").convert("RGB")' for name in self.images]
        arguments = [f'prompt="{self.prompt}"'] + [f"{_argument(name)}={value(name)}" for name in self.images]
        return "\n".join([*lines, f"image = pipe({', '.join(arguments)}).images[0]"])

    def generate_args(self, controlnets: int = 1) -> str:
        """`neuron-export generate EXPORT_DIR` options that run this pipeline once (one --control-image per ControlNet)."""
        images = []
        for name in self.images:
            images += [f"--{name} {_file(name)}"] * (max(controlnets, 1) if name == "control-image" else 1)
        return " ".join([f'--prompt "{self.prompt}"', *images, "--output image.png"])


def _file(name: str) -> str:
    return {"image": "input.png", "mask": "mask.png", "control-image": "control.png"}[name]


def _variable(name: str) -> str:
    return {"image": "init_image", "mask": "mask", "control-image": "control_image"}[name]


def _argument(name: str) -> str:
    # diffusers' ControlNet pipelines take the control image as `image`
    return {"image": "image", "mask": "mask_image", "control-image": "image"}[name]


def _kind(family: str, task: str, diffusers: str, optimum: str, add_on: str | None = None) -> PipelineKind:
    images = {
        "text-to-image": (),
        "image-to-image": ("image",),
        "inpainting": ("image", "mask"),
        "instruct-pix2pix": ("image",),
    }[task] + (("control-image",) if add_on == "controlnet" else ())
    prompt = {
        "image-to-image": "a fantasy landscape",
        "inpainting": "a cat on a bench",
        "instruct-pix2pix": "turn it into a watercolor painting",
    }.get(task, ASTRONAUT)
    hub_tag = "text-to-image" if task == "text-to-image" else "image-to-image"
    return PipelineKind(family, task, add_on, diffusers, optimum, hub_tag, images, prompt)


PIPELINES: tuple[PipelineKind, ...] = (
    _kind("sd", "text-to-image", "StableDiffusionPipeline", "NeuronStableDiffusionPipeline"),
    _kind("sd", "image-to-image", "StableDiffusionImg2ImgPipeline", "NeuronStableDiffusionImg2ImgPipeline"),
    _kind("sd", "inpainting", "StableDiffusionInpaintPipeline", "NeuronStableDiffusionInpaintPipeline"),
    _kind("lcm", "text-to-image", "LatentConsistencyModelPipeline", "NeuronLatentConsistencyModelPipeline"),
    # optimum-neuron has no LCM image-to-image class: its text-to-image one is recorded (our runtime runs it)
    _kind("lcm", "image-to-image", "LatentConsistencyModelImg2ImgPipeline", "NeuronLatentConsistencyModelPipeline"),
    _kind("sd-xl", "text-to-image", "StableDiffusionXLPipeline", "NeuronStableDiffusionXLPipeline"),
    _kind("sd-xl", "image-to-image", "StableDiffusionXLImg2ImgPipeline", "NeuronStableDiffusionXLImg2ImgPipeline"),
    _kind("sd-xl", "inpainting", "StableDiffusionXLInpaintPipeline", "NeuronStableDiffusionXLInpaintPipeline"),
    _kind(
        "sd",
        "instruct-pix2pix",
        "StableDiffusionInstructPix2PixPipeline",
        "NeuronStableDiffusionInstructPix2PixPipeline",
    ),
    _kind(
        "sd",
        "text-to-image",
        "StableDiffusionControlNetPipeline",
        "NeuronStableDiffusionControlNetPipeline",
        add_on="controlnet",
    ),
    _kind(
        "sd-xl",
        "text-to-image",
        "StableDiffusionXLControlNetPipeline",
        "NeuronStableDiffusionXLControlNetPipeline",
        add_on="controlnet",
    ),
    # PixArt-α and PixArt-Σ share the `pixart` command; which one a model is comes from its pipeline class.
    _kind("pixart", "text-to-image", "PixArtSigmaPipeline", "NeuronPixArtSigmaPipeline"),
    _kind("pixart", "text-to-image", "PixArtAlphaPipeline", "NeuronPixArtAlphaPipeline"),
    # Flux: inpainting reuses a text-to-image export's components (optimum-neuron's loader reads the same folders)
    _kind("flux", "text-to-image", "FluxPipeline", "NeuronFluxPipeline"),
    _kind("flux", "inpainting", "FluxInpaintPipeline", "NeuronFluxInpaintPipeline"),
)

DIFFUSERS_CLASSES = frozenset(kind.diffusers for kind in PIPELINES)
LCM_CLASSES = frozenset(kind.diffusers for kind in PIPELINES if kind.is_lcm)
PIXART_CLASSES = frozenset(kind.diffusers for kind in PIPELINES if kind.family == "pixart")
# ModelFacts.architecture of each PixArt pipeline class
PIXART_ARCHITECTURES = {"PixArtSigmaPipeline": "pixart-sigma", "PixArtAlphaPipeline": "pixart-alpha"}
# Flux pipelines neuron-export reads: those with the table's rows, and Kontext, recognised to be refused
FLUX_KONTEXT = "FluxKontextPipeline"
FLUX_CLASSES = frozenset(kind.diffusers for kind in PIPELINES if kind.family == "flux") | {FLUX_KONTEXT}


def pipeline_for(family: str, task: str, add_on: str | None = None, diffusers: str | None = None) -> PipelineKind:
    """The pipeline an export of `family` for `task` (with the add-on) makes; KeyError when there is none.
    `diffusers`, the model's own pipeline class, picks among a family's variants (PixArt-α or -Σ); without it,
    or when it is none of them, the family's first row."""
    kinds = [kind for kind in PIPELINES if (kind.family, kind.task, kind.add_on) == (family, task, add_on)]
    if not kinds:
        raise KeyError((family, task, add_on))
    return next((kind for kind in kinds if kind.diffusers == diffusers), kinds[0])


def pipeline_named(diffusers: str) -> PipelineKind | None:
    """The table's row for a manifest's diffusers_pipeline, or None for a class we do not export."""
    return next((kind for kind in PIPELINES if kind.diffusers == diffusers), None)


def lcm_pipeline(task: str) -> PipelineKind:
    """The LCM pipeline whose call defaults an LCM UNet in another pipeline takes: the task's, else text-to-image's."""
    lcm = {kind.task: kind for kind in PIPELINES if kind.is_lcm}
    return lcm.get(task, lcm["text-to-image"])
