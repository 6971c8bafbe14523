"""Run a finished export: load its artifacts into the matching diffusers pipeline and generate images.

The export's manifest names the diffusers pipeline class; each traced component is put behind a small
`torch.nn.Module` adapter that looks enough like the diffusers / transformers model the pipeline calls
(`config`, `dtype`, `device`, the output objects it indexes). Everything else (tokenizers, scheduler,
feature extractor) comes from the export's own folders.

Compiled shapes are static. `resolve_request` checks every request against them from the manifest alone,
before any artifact is loaded; the adapters then call each artifact only at its compiled batch: a larger
batch (classifier-free guidance doubles the UNet's) is split into chunks run one after another, a smaller
one is padded and the padding dropped. On a Neuron host the data-parallel components get the whole batch
and `torch_neuronx.DataParallel` spreads it over the two NeuronCores.

Nothing heavy at import: torch, diffusers, transformers and PIL are imported inside functions.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuron_export.errors import UserError
from neuron_export.manifest import MANIFEST_NAME, Manifest

ARTIFACT_NAME = "model.neuron"
CONFIG_NAME = "config.json"

PIPELINE_CLASSES = frozenset({
    "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
    "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
    "LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline",
})
LCM_PIPELINE_CLASSES = frozenset({"LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline"})

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

DATA_PARALLEL_MODES = ("none", "unet", "all")
NEURON_DEVICE_IDS = (0, 1)  # the two NeuronCores of one Inferentia2 chip


# --- reading an export --------------------------------------------------------------------------------


def read_export(export_dir: Path) -> Manifest:
    """The export's manifest, or one sentence saying why this is not an export we can run."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise UserError(f"EXPORT_DIR {export_dir} is not a directory; pass the output directory of a `neuron-export` run.")
    if not (export_dir / MANIFEST_NAME).is_file():
        raise UserError(f"EXPORT_DIR {export_dir} has no {MANIFEST_NAME}; pass a directory written by `neuron-export`.")
    try:
        manifest = Manifest.read(export_dir)
    except ValueError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"EXPORT_DIR {export_dir}: {MANIFEST_NAME} cannot be read ({first}); re-export the model.") from None
    name = manifest.pipeline.diffusers_pipeline
    if name not in PIPELINE_CLASSES:
        raise UserError(f"EXPORT_DIR {export_dir}: pipeline {name} is not one `generate` runs; "
                        f"it runs {', '.join(sorted(PIPELINE_CLASSES))}.")
    return manifest


def export_backend(export_dir: Path, manifest: Manifest) -> str:
    """"cpu" or "neuron": every component of an export must have been built by the same backend."""
    backends = sorted({record.backend for record in manifest.components.values()})
    if len(backends) != 1:
        raise UserError(f"EXPORT_DIR {export_dir} mixes backends ({', '.join(backends)}); re-export all components with one --backend.")
    return backends[0]


def required_components(manifest: Manifest) -> tuple[str, ...]:
    """The artifacts `generate` needs for this pipeline and task."""
    pipeline = manifest.pipeline
    names = []
    if pipeline.kind != "sdxl-refiner":
        names.append("text_encoder")
    if pipeline.kind in ("sdxl", "sdxl-refiner"):
        names.append("text_encoder_2")
    names.append("unet")
    if pipeline.task in ("image-to-image", "inpainting"):
        names.append("vae_encoder")
    names.append("vae_decoder")
    return tuple(names)


def check_export_complete(export_dir: Path, manifest: Manifest) -> None:
    for name in required_components(manifest):
        if name not in manifest.components:
            raise UserError(f"EXPORT_DIR {export_dir} has no {name}, which {manifest.pipeline.diffusers_pipeline} needs; "
                            "re-export without --components.")
        for filename in (ARTIFACT_NAME, CONFIG_NAME):
            if not (export_dir / name / filename).is_file():
                raise UserError(f"EXPORT_DIR {export_dir} is missing {name}/{filename}; re-export the model (or run `neuron-export verify`).")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


# --- defaults: the pipeline class's own, or a turbo checkpoint's model card ----------------------------


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
    uses_image = pipeline.task != "text-to-image"
    if is_turbo(manifest):
        card = TURBO_DEFAULTS[pipeline.task]
        return CallDefaults(card["num_inference_steps"], card["guidance_scale"], card.get("strength") if uses_image else None,
                            f"the {manifest.source.model_id} model card")
    import diffusers

    cls = getattr(diffusers, pipeline.diffusers_pipeline, None)
    if cls is None:
        raise UserError(f"diffusers {diffusers.__version__} has no {pipeline.diffusers_pipeline}, the pipeline this export "
                        "runs in; upgrade diffusers.")
    parameters = inspect.signature(cls.__call__).parameters
    names = ("num_inference_steps", "guidance_scale") + (("strength",) if uses_image else ())
    values = {}
    for name in names:
        default = parameters[name].default if name in parameters else inspect.Parameter.empty
        if not isinstance(default, (int, float)) or isinstance(default, bool):
            flag = {"num_inference_steps": "--steps", "guidance_scale": "--guidance-scale", "strength": "--strength"}[name]
            raise UserError(f"{flag} has no default here: diffusers {diffusers.__version__} {cls.__name__}.__call__ gives "
                            f"{name} none; pass {flag}.")
        values[name] = default
    return CallDefaults(int(values["num_inference_steps"]), float(values["guidance_scale"]),
                        float(values["strength"]) if uses_image else None, f"{cls.__name__}.__call__")


# --- the request, checked against the compiled shapes ------------------------------------------------


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

    @property
    def image_count(self) -> int:
        return len(self.prompts) * self.num_images_per_prompt

    def summary(self) -> str:
        """The values this request runs with, as `generate` prints them first."""
        strength = f" strength={self.strength}" if self.strength is not None else ""
        return (f"generate: steps={self.steps} guidance={self.guidance_scale}{strength} seed={self.seed} "
                f"size={self.width}x{self.height} images={self.image_count} (defaults: {self.defaults_from})")


def _open_image(value: Any, flag: str, mode: str, size: tuple[int, int], notes: list[str]) -> Any:
    """A path or PIL image -> a PIL image of the compiled size; arrays and tensors pass through unchanged."""
    from PIL import Image

    if isinstance(value, (str, Path)):
        path = Path(value)
        if not path.is_file():
            raise UserError(f"{flag} {path} does not exist; pass an image file (PNG or JPEG).")
        try:
            with Image.open(path) as opened:
                value = opened.convert(mode)
        except Exception as exc:  # PIL raises several types for unreadable files
            raise UserError(f"{flag} {path} cannot be read as an image ({type(exc).__name__}); pass a PNG or JPEG file.") from None
    if isinstance(value, Image.Image):
        value = value.convert(mode)
        if value.size != size:
            notes.append(f"{flag} is {value.size[0]}x{value.size[1]}; resized to the compiled {size[0]}x{size[1]}.")
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
) -> Request:
    """Defaults filled in and every value checked against the manifest; reads no artifact."""
    export_dir = Path(export_dir)
    pipeline = manifest.pipeline
    task = pipeline.task
    dynamic = bool(manifest.config.get("dynamic_batch_size"))

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise UserError("--prompt is missing; pass at least one --prompt TEXT.")
    if batch_size is not None:
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size} is not a batch; pass a positive number.")
        if len(prompts) == 1:
            prompts = prompts * batch_size
        elif len(prompts) != batch_size:
            raise UserError(f"--batch-size {batch_size} does not match the {len(prompts)} --prompt values given; "
                            f"pass one --prompt to repeat it, or exactly {batch_size}.")
    compiled_batch = pipeline.batch_size
    fits = len(prompts) == compiled_batch or (dynamic and len(prompts) % compiled_batch == 0)
    if not fits:
        raise UserError(f"batch {len(prompts)} (the number of prompts) does not fit this export, compiled for batch "
                        f"{compiled_batch}; pass --prompt {compiled_batch} time(s) (or one --prompt with --batch-size "
                        f"{compiled_batch}), or re-export with --batch-size {len(prompts)}.")
    for flag, value, compiled in (("--height", height, pipeline.height), ("--width", width, pipeline.width),
                                  ("--num-images-per-prompt", num_images_per_prompt, pipeline.num_images_per_prompt)):
        if value is not None and value != compiled:
            raise UserError(f"{flag} {value} does not fit this export, compiled for {flag[2:]} {compiled}; "
                            f"pass {flag} {compiled} or re-export with {flag} {value}.")

    if task == "inpainting":
        if image is None:
            raise UserError("--image is missing: this export is an inpainting pipeline; pass --image INIT.png and --mask MASK.png.")
        if mask is None:
            raise UserError("--mask is missing: this export is an inpainting pipeline; pass --mask MASK.png (white = repaint).")
    elif task == "image-to-image":
        if image is None:
            raise UserError("--image is missing: this export is an image-to-image pipeline; pass --image INIT.png.")
        if mask is not None:
            raise UserError("--mask applies only to inpainting exports, but this export is image-to-image; "
                            "drop --mask or re-export with --task inpainting.")
    else:
        for flag, value in (("--image", image), ("--mask", mask), ("--strength", strength)):
            if value is not None:
                raise UserError(f"{flag} applies only to image-to-image and inpainting exports, but this export is "
                                f"text-to-image; drop {flag} or re-export with --task image-to-image.")
    if negative_prompt is not None and pipeline.is_lcm:
        raise UserError("--negative-prompt has no effect on a latent consistency model (it runs without "
                        "classifier-free guidance); drop --negative-prompt.")

    if steps is not None and steps < 1:
        raise UserError(f"--steps {steps} is not a number of denoising steps; pass 1 or more.")
    if strength is not None and not 0.0 < strength <= 1.0:
        raise UserError(f"--strength {strength} is out of range; pass a value in (0, 1].")
    # Read after the checks above: it imports the diffusers pipeline class, which takes seconds.
    defaults = call_defaults(manifest)
    steps = steps if steps is not None else defaults.steps
    guidance_scale = guidance_scale if guidance_scale is not None else defaults.guidance_scale
    if task != "text-to-image":
        strength = strength if strength is not None else defaults.strength
    lcm_strength = pipeline.diffusers_pipeline in LCM_PIPELINE_CLASSES and strength is not None
    if pipeline.is_lcm:
        # LCMScheduler spaces the steps over original_inference_steps (times strength in the LCM img2img pipeline).
        original = _lcm_original_steps(export_dir)
        usable = int(original * strength) if lcm_strength else original
        if steps > usable:
            raise UserError(f"--steps {steps} is more than the LCM scheduler allows here ({usable}); "
                            f"pass --steps {usable} or fewer (LCM needs 2-8){' or a higher --strength' if lcm_strength else ''}.")
    if strength is not None and not lcm_strength and int(steps * strength) < 1:
        needed = steps
        while int(needed * strength) < 1:
            needed += 1
        raise UserError(f"--steps {steps} with --strength {strength} leaves no denoising step (steps x strength "
                        f"must reach 1); pass --steps {needed} or more, or a higher --strength.")

    notes: list[str] = []
    size = (pipeline.width, pipeline.height)
    if image is not None:
        image = _open_image(image, "--image", "RGB", size, notes)
    if mask is not None:
        mask = _open_image(mask, "--mask", "L", size, notes)
    check_export_complete(export_dir, manifest)
    export_backend(export_dir, manifest)
    return Request(
        prompts=tuple(prompts), negative_prompt=negative_prompt, image=image, mask=mask, strength=strength,
        steps=steps, guidance_scale=float(guidance_scale), seed=DEFAULT_SEED if seed is None else seed,
        num_images_per_prompt=pipeline.num_images_per_prompt, height=pipeline.height, width=pipeline.width,
        notes=tuple(notes), defaults_from=defaults.source,
    )


# --- running artifacts at their compiled shapes -------------------------------------------------------


def _merge(parts: list[Any], count: int) -> Any:
    """Outputs of several chunk calls (tensors, tuples, dicts, nested) -> one output of `count` rows."""
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)[:count] if len(parts) > 1 or first.shape[0] != count else first
    if isinstance(first, dict):
        return {key: _merge([part[key] for part in parts], count) for key in first}
    if isinstance(first, (tuple, list)):
        return tuple(_merge([part[index] for part in parts], count) for index in range(len(first)))
    return first


def _pad_rows(tensor: Any, rows: int) -> Any:
    """`tensor` with its last row repeated until it has `rows` rows."""
    import torch

    missing = rows - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])], dim=0)


class StaticRunner:
    """Calls one compiled artifact only at its compiled shape, whatever batch the pipeline hands over.

    Single-device artifacts run chunk by chunk (what DataParallel over two NeuronCores does on a device);
    a data-parallel artifact gets the whole batch, padded to a multiple of the compiled batch, at once.
    """

    def __init__(self, name: str, module: Any, input_names: Sequence[str], input_shapes: Sequence[Sequence[int]],
                 data_parallel: bool = False) -> None:
        self.name = name
        self.module = module
        self.input_names = tuple(input_names)
        self.batch = int(input_shapes[0][0])
        self.sample_shapes = tuple(tuple(int(size) for size in shape[1:]) for shape in input_shapes)
        self.data_parallel = data_parallel
        self.calls: list[tuple[tuple[int, ...], ...]] = []  # input shapes of every artifact call, for tests and logs

    def __call__(self, *inputs: Any) -> Any:
        count = int(inputs[0].shape[0])
        for name, tensor, expected in zip(self.input_names, inputs, self.sample_shapes):
            if tensor.shape[0] != count:
                raise ValueError(f"{self.name}: input {name} has batch {tensor.shape[0]}, the other inputs {count}.")
            if tuple(tensor.shape[1:]) != expected:
                raise ValueError(f"{self.name}: input {name} has per-sample shape {tuple(tensor.shape[1:])}; "
                                 f"the artifact was compiled for {expected}.")
        if self.data_parallel:
            rows = math.ceil(count / self.batch) * self.batch
            padded = [_pad_rows(tensor, rows) for tensor in inputs]
            self.calls.append(tuple(tuple(tensor.shape) for tensor in padded))
            return _merge([self.module(*padded)], count)
        parts = []
        for start in range(0, count, self.batch):
            chunk = [_pad_rows(tensor[start:start + self.batch], self.batch) for tensor in inputs]
            self.calls.append(tuple(tuple(tensor.shape) for tensor in chunk))
            parts.append(self.module(*chunk))
        return _merge(parts, count)


# --- adapters: what the diffusers pipelines see -------------------------------------------------------

_TORCH_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@functools.lru_cache(maxsize=1)
def adapter_classes() -> Any:
    """The adapter classes, built on first use so that importing this module does not import torch."""
    import torch
    from diffusers.configuration_utils import FrozenDict

    try:
        from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
    except ImportError:  # diffusers < 0.27
        from diffusers.models.vae import DecoderOutput, DiagonalGaussianDistribution
    try:
        from diffusers.models.modeling_outputs import AutoencoderKLOutput
    except ImportError:
        from diffusers.models.autoencoder_kl import AutoencoderKLOutput
    try:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
    except ImportError:
        from diffusers.models.unet_2d_condition import UNet2DConditionOutput
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.clip.modeling_clip import CLIPTextModelOutput

    class CompiledComponent(torch.nn.Module):
        """Common ground: a config read from the component's config.json, a fixed dtype and device."""

        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__()
            # Kept where ConfigMixin keeps it, so pipelines that patch `_internal_dict` see their change.
            self._internal_dict = FrozenDict(config)
            neuron = config.get("neuron") or {}
            self._dtype = getattr(torch, _TORCH_DTYPES.get(str(neuron.get("float_dtype", "fp32")), "float32"))

        @property
        def config(self) -> Any:
            return self._internal_dict

        @property
        def dtype(self) -> torch.dtype:
            return self._dtype

        @property
        def device(self) -> torch.device:
            return torch.device("cpu")  # Neuron artifacts take host tensors too

        def to(self, *args: Any, **kwargs: Any) -> CompiledComponent:
            return self  # compiled artifacts have a fixed dtype and placement

        def _float(self, tensor: Any) -> Any:
            return tensor.to(self._dtype) if tensor.is_floating_point() else tensor

    class CompiledTextEncoder(CompiledComponent):
        """CLIPTextModel / CLIPTextModelWithProjection: returns the transformers output object."""

        def __init__(self, name: str, runner: StaticRunner, config: dict[str, Any], outputs: Sequence[str]) -> None:
            super().__init__(config)
            self.component_name = name
            self.runner = runner
            self.output_names = tuple(outputs)

        def forward(self, input_ids: Any, attention_mask: Any = None, output_hidden_states: bool | None = None,
                    return_dict: bool | None = True, **kwargs: Any) -> Any:
            if output_hidden_states and "hidden_states" not in self.output_names:
                raise ValueError(f"{self.component_name} was compiled without hidden states; this pipeline option "
                                 "(e.g. clip_skip) needs an export that returns them.")
            values = dict(zip(self.output_names, self.runner(input_ids.to(torch.long))))
            hidden = values.get("hidden_states")
            hidden = tuple(hidden) if hidden is not None else None
            if "text_embeds" in self.output_names:
                out = CLIPTextModelOutput(text_embeds=values["text_embeds"],
                                          last_hidden_state=values["last_hidden_state"], hidden_states=hidden)
            else:
                out = BaseModelOutputWithPooling(last_hidden_state=values["last_hidden_state"],
                                                 pooler_output=values.get("pooler_output"), hidden_states=hidden)
            return out if return_dict is not False else out.to_tuple()

    class CompiledUNet(CompiledComponent):
        """UNet2DConditionModel: positional inputs in the compiled order, a [B] float32 timestep."""

        def __init__(self, runner: StaticRunner, config: dict[str, Any]) -> None:
            super().__init__(config)
            self.runner = runner
            if config.get("addition_embed_type") == "text_time":
                # SDXL pipelines read the added-embedding width to check the time ids they build.
                width = int(config["projection_class_embeddings_input_dim"])
                self.add_embedding = _Namespace(linear_1=_Namespace(in_features=width))

        def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any = None, class_labels: Any = None,
                    timestep_cond: Any = None, attention_mask: Any = None, cross_attention_kwargs: Any = None,
                    added_cond_kwargs: dict[str, Any] | None = None, return_dict: bool = True, **kwargs: Any) -> Any:
            added = dict(added_cond_kwargs or {})
            if "image_embeds" in added:
                raise ValueError("unet: IP-Adapter image embeddings are not part of this export.")
            count = sample.shape[0]
            steps = torch.as_tensor(timestep).to(torch.float32)
            if steps.ndim == 0 or steps.numel() == 1:
                steps = steps.reshape(1).expand(count)
            named = {"sample": sample, "timestep": steps, "encoder_hidden_states": encoder_hidden_states,
                     "timestep_cond": timestep_cond, **added}
            given = {key for key, value in named.items() if value is not None}
            unexpected = given - set(self.runner.input_names)
            if unexpected:
                raise ValueError(f"unet: the pipeline passes {', '.join(sorted(unexpected))}, which the compiled UNet "
                                 "does not take; re-export with the pipeline that uses it.")
            inputs = []
            for name in self.runner.input_names:
                if named.get(name) is None:
                    raise ValueError(f"unet: the pipeline passed no {name}, which the compiled UNet takes.")
                inputs.append(self._float(named[name]) if name != "timestep" else named[name])
            noise = self.runner(*inputs)[0]
            return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)

    class CompiledVae(CompiledComponent):
        """AutoencoderKL from the two halves: `encode(x).latent_dist` and `decode(z).sample`."""

        def __init__(self, encoder: StaticRunner | None, decoder: StaticRunner | None, config: dict[str, Any]) -> None:
            super().__init__(config)
            self.encoder_runner = encoder
            self.decoder_runner = decoder

        def encode(self, x: Any, return_dict: bool = True) -> Any:
            if self.encoder_runner is None:
                raise ValueError("vae: this export has no vae_encoder; re-export it with image-to-image or inpainting.")
            parameters = self.encoder_runner(self._float(x))["latent_parameters"]
            distribution = DiagonalGaussianDistribution(parameters)
            return AutoencoderKLOutput(latent_dist=distribution) if return_dict else (distribution,)

        def decode(self, z: Any, return_dict: bool = True, generator: Any = None) -> Any:
            if self.decoder_runner is None:
                raise ValueError("vae: this export has no vae_decoder; re-export without --components.")
            image = self.decoder_runner(self._float(z))["sample"]
            return DecoderOutput(sample=image) if return_dict else (image,)

        def forward(self, sample: Any, sample_posterior: bool = False, return_dict: bool = True,
                    generator: Any = None) -> Any:
            distribution = self.encode(sample).latent_dist
            latents = distribution.sample(generator) if sample_posterior else distribution.mode()
            return self.decode(latents, return_dict=return_dict)

    return _Namespace(TextEncoder=CompiledTextEncoder, UNet=CompiledUNet, Vae=CompiledVae, Base=CompiledComponent)


class _Namespace:
    """Attribute bag (e.g. `unet.add_embedding.linear_1.in_features`)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


# --- loading artifacts: CPU TorchScript or Neuron ------------------------------------------------------


def data_parallel_components(mode: str, names: Sequence[str]) -> tuple[str, ...]:
    """Which components go on both NeuronCores: the UNet in "unet" mode, everything in "all" mode."""
    if mode not in DATA_PARALLEL_MODES:
        raise UserError(f"data_parallel_mode {mode!r} in the manifest is not one of {', '.join(DATA_PARALLEL_MODES)}; re-export the model.")
    if mode == "all":
        return tuple(names)
    if mode == "unet":
        return tuple(name for name in names if name == "unet")
    return ()


class CpuArtifactLoader:
    """TorchScript on the CPU (exports built with --backend cpu)."""

    backend = "cpu"

    def load(self, name: str, path: Path, config: dict[str, Any]) -> tuple[Any, bool]:
        import torch

        return torch.jit.load(str(path), map_location="cpu").eval(), False


class NeuronArtifactLoader:
    """Neuron TorchScript on an inf2/trn1 host, placed as optimum-neuron places it.

    Data-parallel components are wrapped in `torch_neuronx.DataParallel(module, [0, 1])` (dynamic batching on,
    so a batch of any size is spread over both cores); the rest run on the first core, with non-inlined
    weights moved there explicitly.
    """

    backend = "neuron"

    def __init__(self, torch_neuronx: Any, mode: str, names: Sequence[str],
                 device_ids: Sequence[int] = NEURON_DEVICE_IDS) -> None:
        self.torch_neuronx = torch_neuronx
        self.device_ids = list(device_ids)
        self.parallel = set(data_parallel_components(mode, names))

    def load(self, name: str, path: Path, config: dict[str, Any]) -> tuple[Any, bool]:
        import torch

        module = torch.jit.load(str(path))
        if name in self.parallel:
            return self.torch_neuronx.DataParallel(module, self.device_ids, set_dynamic_batching=True), True
        experimental = getattr(self.torch_neuronx, "experimental", None)
        if experimental is not None and hasattr(experimental, "set_neuron_cores"):
            experimental.set_neuron_cores(module, start_nc=self.device_ids[0], nc_count=1)
        if not (config.get("neuron") or {}).get("inline_weights_to_neff", True):
            self.torch_neuronx.move_trace_to_device(module, self.device_ids[0])
        return module, False


def import_torch_neuronx(export_dir: Path) -> Any:
    try:
        import torch_neuronx
    except Exception:  # the PyPI placeholder raises ImportError("WRONG PACKAGE ..."); others may fail differently
        raise UserError(f"EXPORT_DIR {export_dir} was compiled for Neuron (backend neuron) and runs only on an inf2/trn1 "
                        "host with torch-neuronx installed; run it there, or re-export with --backend cpu to try it "
                        "on this machine.") from None
    return torch_neuronx


def optimum_pipeline_class(manifest: Manifest) -> Any:
    """optimum-neuron's pipeline class for this export, or None when it does not import or cannot run it."""
    if manifest.pipeline.kind == "sdxl-refiner":
        return None  # optimum-neuron 0.4.5 cannot load a pipeline without text_encoder (KeyError)
    try:
        import optimum.neuron as optimum_neuron

        cls = getattr(optimum_neuron, manifest.pipeline.optimum_pipeline)
    except Exception:
        return None
    try:
        import diffusers

        if not issubclass(cls, getattr(diffusers, manifest.pipeline.diffusers_pipeline)):
            return None  # e.g. no LCM image-to-image pipeline there: ours runs it
    except Exception:
        return None
    return cls


def _lcm_scheduler(scheduler: Any) -> Any:
    from diffusers import LCMScheduler

    return scheduler if isinstance(scheduler, LCMScheduler) else LCMScheduler.from_config(scheduler.config)


def load_pipeline(export_dir: Path, manifest: Manifest | None = None, *, use_optimum: bool = True,
                  device_ids: Sequence[int] = NEURON_DEVICE_IDS) -> Any:
    """The export as a ready diffusers pipeline: CPU TorchScript, optimum-neuron's runtime, or ours on Neuron."""
    export_dir = Path(export_dir)
    manifest = manifest or read_export(export_dir)
    check_export_complete(export_dir, manifest)
    backend = export_backend(export_dir, manifest)
    if backend == "neuron":
        cls = optimum_pipeline_class(manifest) if use_optimum else None
        if cls is not None:
            pipe = cls.from_pretrained(str(export_dir), data_parallel_mode=manifest.pipeline.data_parallel_mode)
            if manifest.pipeline.is_lcm:
                pipe.scheduler = _lcm_scheduler(pipe.scheduler)
            return pipe
        torch_neuronx = import_torch_neuronx(export_dir)
        loader: Any = NeuronArtifactLoader(torch_neuronx, manifest.pipeline.data_parallel_mode,
                                           list(manifest.components), device_ids)
    elif backend == "cpu":
        loader = CpuArtifactLoader()
    else:
        raise UserError(f"EXPORT_DIR {export_dir} was built by backend {backend!r}, which `generate` cannot run; re-export with --backend cpu or neuron.")
    return assemble_pipeline(export_dir, manifest, loader)


def _runner(export_dir: Path, manifest: Manifest, name: str, loader: Any) -> tuple[StaticRunner, dict[str, Any]]:
    record = manifest.components[name]
    config = _read_json(export_dir / name / CONFIG_NAME)
    module, data_parallel = loader.load(name, export_dir / name / ARTIFACT_NAME, config)
    runner = StaticRunner(name, module, [spec.name for spec in record.inputs], [spec.shape for spec in record.inputs],
                          data_parallel=data_parallel)
    return runner, config


def _processor(export_dir: Path, index: dict[str, Any], name: str) -> Any:
    """tokenizer / tokenizer_2 / feature_extractor from the export's folder, by the class model_index names."""
    entry = index.get(name)
    folder = export_dir / name
    if not entry or entry[0] is None or not folder.is_dir():
        return None
    import transformers

    library, class_name = entry
    cls = getattr(transformers, class_name, None)
    if cls is None:
        cls = transformers.AutoTokenizer if name.startswith("tokenizer") else transformers.AutoImageProcessor
    return cls.from_pretrained(folder)


def assemble_pipeline(export_dir: Path, manifest: Manifest, loader: Any) -> Any:
    """Adapters around each artifact + the export's processors -> manifest.pipeline.diffusers_pipeline."""
    import diffusers

    classes = adapter_classes()
    index = _read_json(export_dir / "model_index.json")
    present = manifest.components
    components: dict[str, Any] = {}
    for name in ("text_encoder", "text_encoder_2"):
        if name in present:
            runner, config = _runner(export_dir, manifest, name, loader)
            components[name] = classes.TextEncoder(name, runner, config, present[name].outputs)
    runner, config = _runner(export_dir, manifest, "unet", loader)
    components["unet"] = classes.UNet(runner, config)
    encoder = decoder = None
    vae_config: dict[str, Any] = {}
    if "vae_encoder" in present:
        encoder, vae_config = _runner(export_dir, manifest, "vae_encoder", loader)
    if "vae_decoder" in present:
        decoder, vae_config = _runner(export_dir, manifest, "vae_decoder", loader)
    components["vae"] = classes.Vae(encoder, decoder, vae_config)

    scheduler_entry = index.get("scheduler") or ["diffusers", "EulerDiscreteScheduler"]
    scheduler_cls = getattr(diffusers, scheduler_entry[1])
    scheduler = scheduler_cls.from_config(_read_json(export_dir / "scheduler" / "scheduler_config.json"))
    if manifest.pipeline.is_lcm:
        scheduler = _lcm_scheduler(scheduler)
    components["scheduler"] = scheduler
    for name in ("tokenizer", "tokenizer_2", "feature_extractor"):
        components[name] = _processor(export_dir, index, name)

    pipeline_cls = getattr(diffusers, manifest.pipeline.diffusers_pipeline)
    kwargs: dict[str, Any] = {}
    for parameter in list(inspect.signature(pipeline_cls.__init__).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        name = parameter.name
        if name in components:
            kwargs[name] = components[name]
        elif name in ("safety_checker", "image_encoder", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            kwargs[name] = None  # not part of the export (the refiner has no text_encoder)
        elif name in index and not isinstance(index[name], list):
            kwargs[name] = index[name]  # force_zeros_for_empty_prompt, requires_aesthetics_score, ...
        elif name == "requires_safety_checker":
            kwargs[name] = False
    pipe = pipeline_cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- generating -----------------------------------------------------------------------------------------


def run_request(pipe: Any, request: Request, *, output_type: str = "pil",
                on_step: Callable[[int, int], None] | None = None) -> Any:
    """Call the pipeline for one checked request; returns its images (PIL list or numpy array)."""
    import torch

    kwargs: dict[str, Any] = {
        "prompt": list(request.prompts),
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "num_images_per_prompt": request.num_images_per_prompt,
        "generator": torch.Generator("cpu").manual_seed(request.seed),
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
    if on_step is not None:
        def step_end(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            total = getattr(pipeline, "_num_timesteps", None) or len(pipeline.scheduler.timesteps)
            on_step(index + 1, int(total))
            return {}

        kwargs["callback_on_step_end"] = step_end
    parameters = inspect.signature(pipe.__call__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        kwargs = {key: value for key, value in kwargs.items() if key in parameters}
    with torch.no_grad():
        return pipe(**kwargs).images


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
    output_type: str = "pil",
    on_step: Callable[[int, int], None] | None = None,
    pipeline: Any = None,
) -> Any:
    """Generate with an export: checks the request first, then loads (or reuses `pipeline`) and runs it.

    `output_type="np"` returns a float array [N, H, W, 3] in [0, 1], as diffusers does.
    """
    export_dir = Path(export_dir)
    manifest = read_export(export_dir)
    request = resolve_request(export_dir, manifest, prompt, negative_prompt=negative_prompt, image=image, mask=mask,
                              strength=strength, steps=steps, guidance_scale=guidance_scale, seed=seed,
                              num_images_per_prompt=num_images_per_prompt, batch_size=batch_size,
                              height=height, width=width)
    pipe = pipeline if pipeline is not None else load_pipeline(export_dir, manifest)
    return run_request(pipe, request, output_type=output_type, on_step=on_step)


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
