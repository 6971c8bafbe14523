"""What the resolved sources are (ModelSource: every local path, and where each component's files come from) and
what the model is (ModelFacts), read from its JSON files. planning/sources.py resolves; this module only reads.

Only configs and safetensors headers are read here: no weights are loaded and no remote code runs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from neuron_export.errors import ExportError
from neuron_export.pipelines import FLUX_CLASSES, FLUX_KONTEXT, PIXART_ARCHITECTURES, PIXART_CLASSES, pipeline_for
from neuron_export.planning.source_files import files_inside, inside, model_roots, read_header
from neuron_export.roles.registry import CONTROLNET, role_of, roles_for

# Files copied unchanged into the export so the runtime can tokenize and schedule.
PROCESSOR_FOLDERS = ("scheduler", "tokenizer", "tokenizer_2", "feature_extractor")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
# Older checkpoints only have pickled weights; torch loads them with weights_only=True (no code runs).
PICKLE_WEIGHT_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
# Full-precision weights and their shards; fp16 variants are never fetched, .bin only where no safetensors exist.
HUB_WEIGHT_PATTERNS = (*WEIGHT_NAMES, "*.safetensors.index.json", "*-of-*.safetensors")
HUB_PICKLE_PATTERNS = (*PICKLE_WEIGHT_NAMES, "*.bin.index.json", "*-of-*.bin")
# The classes model_index.json may name for each part we export or copy: the loaders use exactly these, and
# the runtime loads the processors by name. Anything else is custom code, which neuron-export never runs.
KNOWN_CLASSES: dict[str, tuple[str, frozenset[str] | None]] = {
    "unet": ("diffusers", frozenset({"UNet2DConditionModel"})),
    "vae": ("diffusers", frozenset({"AutoencoderKL"})),
    "text_encoder": ("transformers", frozenset({"CLIPTextModel"})),
    "text_encoder_2": ("transformers", frozenset({"CLIPTextModelWithProjection"})),
    "tokenizer": ("transformers", frozenset({"CLIPTokenizer", "CLIPTokenizerFast"})),
    "tokenizer_2": ("transformers", frozenset({"CLIPTokenizer", "CLIPTokenizerFast"})),
    "feature_extractor": (
        "transformers",
        frozenset({"CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPFeatureExtractor"}),
    ),
    "scheduler": ("diffusers", None),  # None: any scheduler the installed diffusers has
    "image_encoder": ("transformers", frozenset({"CLIPVisionModelWithProjection"})),
}
# A PixArt pipeline: a diffusion transformer conditioned on a T5 encoder, with a T5 tokenizer.
PIXART_KNOWN_CLASSES: dict[str, tuple[str, frozenset[str] | None]] = {
    **{name: KNOWN_CLASSES[name] for name in ("vae", "scheduler")},
    "transformer": ("diffusers", frozenset({"PixArtTransformer2DModel"})),
    "text_encoder": ("transformers", frozenset({"T5EncoderModel"})),
    "tokenizer": ("transformers", frozenset({"T5Tokenizer", "T5TokenizerFast"})),
}
# A Flux pipeline: CLIP (pooled) and T5 (sequence) text encoders, a Flux transformer.
FLUX_KNOWN_CLASSES: dict[str, tuple[str, frozenset[str] | None]] = {
    **{name: KNOWN_CLASSES[name] for name in ("vae", "scheduler", "text_encoder", "tokenizer")},
    "transformer": ("diffusers", frozenset({"FluxTransformer2DModel"})),
    "text_encoder_2": ("transformers", frozenset({"T5EncoderModel"})),
    "tokenizer_2": ("transformers", frozenset({"T5Tokenizer", "T5TokenizerFast"})),
}
PIX2PIX_PIPELINE = pipeline_for("sd", "instruct-pix2pix").diffusers


@dataclass(frozen=True)
class ModelSource:
    """A pipeline on local disk, and where it came from."""

    model_id: str
    path: Path
    revision: str | None = None
    commit: str | None = None
    unet_id: str | None = None
    unet_path: Path | None = None  # directory holding the replacement UNet's config.json and weights
    unet_commit: str | None = None
    vae_id: str | None = None
    vae_path: Path | None = None  # directory holding the replacement VAE's config.json and weights
    vae_commit: str | None = None
    # --- ControlNet, IP-Adapter and LoRA add-ons ---
    controlnets: tuple[AddOnSource, ...] = ()
    ip_adapter: AddOnSource | None = None  # path: the adapter's weight file
    image_encoder_path: Path | None = None
    loras: tuple[LoraFile, ...] = ()  # in --lora order

    def origin(self, component: str) -> ComponentOrigin:
        """Where a component's files come from (the model, --unet, --vae or an add-on): the one place that decides."""
        if component == "unet" and self.unet_path is not None:
            repo, commit, folder = self.unet_id, self.unet_commit, self.unet_path
            root = folder
        elif role_of(component).source_folder == "vae" and self.vae_path is not None:
            repo, commit, folder = self.vae_id, self.vae_commit, self.vae_path
            root = folder
        elif CONTROLNET.matches(component):
            controlnet = self.controlnets[CONTROLNET.index(component)]
            repo, commit, folder = controlnet.model_id, controlnet.commit, controlnet.path
            root = folder
        elif component == "image_encoder" and self.image_encoder_path is not None:
            repo, commit, folder = self.model_id, self.commit, self.image_encoder_path
            root = self.path  # the pipeline's own image_encoder/, else the IP-Adapter repository's
            if self.ip_adapter is not None and not folder.is_relative_to(self.path):
                repo, commit, root = self.ip_adapter.model_id, self.ip_adapter.commit, folder
        else:
            repo, commit, folder, root = (
                self.model_id,
                self.commit,
                self.path / (role_of(component).source_folder or component),
                self.path,
            )
        added = [AddedFile(lora.path, _snapshot(lora.source, lora.commit, lora.path)) for lora in self.loras]
        if component == "unet" and self.ip_adapter is not None:  # its layers are traced into the UNet
            adapter = self.ip_adapter
            added.append(AddedFile(adapter.path, _snapshot(adapter.model_id, adapter.commit, adapter.path)))
        return ComponentOrigin(folder=folder, root=root, hub=_snapshot(repo, commit, folder), added=tuple(added))

    def folder(self, component: str) -> Path:
        """The directory whose config.json and weights a component is loaded from."""
        return self.origin(component).folder

    def roots(self, component: str) -> tuple[Path, ...]:
        """Where the files a component reads may really be: the model, or the replacement's own folder."""
        folder = self.folder(component)
        own_folder = role_of(component).source_folder
        own = own_folder is not None and folder == self.path / own_folder
        return model_roots(self.path if own else folder)


class HubSnapshot(NamedTuple):
    """A Hub repository at a commit, and its snapshot folder on this host (a node without it downloads it again)."""

    repo: str
    commit: str
    root: Path


@dataclass(frozen=True)
class ComponentOrigin:
    """Where one component's files come from."""

    folder: Path  # holds its config.json and weights
    root: Path  # the folder its weight files are named relative to in the manifest
    hub: HubSnapshot | None  # None: a local directory, which every node must see at the same path
    added: tuple[AddedFile, ...] = ()  # files of other sources it may read (the IP-Adapter, the LoRAs fused in)


class AddedFile(NamedTuple):
    """A file a component reads from another source than its folder's, and that source's Hub snapshot (if any)."""

    path: Path
    hub: HubSnapshot | None


def _snapshot(repo: str | None, commit: str | None, folder: Path) -> HubSnapshot | None:
    if not repo or not commit:
        return None
    # huggingface_hub keeps a commit's files in a folder named for the commit
    root = next((p for p in (folder, *folder.parents) if p.name == commit), None)
    return HubSnapshot(repo, commit, root) if root is not None else None


@dataclass(frozen=True)
class AddOnSource:
    """A model added to the pipeline (a ControlNet, an IP-Adapter): where it came from and where it is on disk."""

    model_id: str
    path: Path
    commit: str | None = None


@dataclass(frozen=True)
class LoraFile:
    """One --lora, resolved: the adapter file and where it came from."""

    source: str  # as given: a hub id, a directory or a file
    weight_name: str  # the file's name inside `source`
    path: Path
    commit: str | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What the pipeline is, decided from its configs rather than from its name."""

    pipeline_class: str
    architecture: str  # "sd", "sdxl", "sdxl-refiner", "pixart-alpha", "pixart-sigma", "flux" or "flux-kontext"
    is_lcm: bool
    unet: dict[str, Any]  # empty for a PixArt pipeline (its denoiser is `transformer`)
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None
    text_encoder_2: dict[str, Any] | None
    weight_files: dict[str, tuple[Path, ...]] = field(default_factory=dict)  # component -> safetensors files
    # --- ControlNet and IP-Adapter add-ons (planning/conditioning.py reads them) ---
    controlnets: tuple[dict[str, Any], ...] = ()  # each ControlNet's config.json, in --controlnet order
    image_encoder: dict[str, Any] | None = None  # the IP-Adapter's CLIP vision config
    ip_adapter_tokens: int = 0  # image encoder hidden states per image the UNet takes (0: no IP-Adapter)
    # --- diffusion transformers (PixArt) ---
    transformer: dict[str, Any] | None = None  # its config.json
    tokenizer_max_length: int | None = None  # the tokenizer's model_max_length: the default sequence length

    @property
    def is_pixart(self) -> bool:
        return self.architecture.startswith("pixart")

    @property
    def is_flux(self) -> bool:
        return self.architecture.startswith("flux")

    @property
    def denoiser(self) -> dict[str, Any]:
        """The config of the model that denoises: the UNet, or a PixArt pipeline's transformer."""
        return self.transformer if self.transformer is not None else self.unet

    @property
    def is_pix2pix(self) -> bool:
        """InstructPix2Pix: the UNet sees the noisy latents and the image to edit (4 + 4 channels)."""
        return self.unet_in_channels == 8 or self.pipeline_class == PIX2PIX_PIPELINE

    @property
    def unet_in_channels(self) -> int:
        return int(self.denoiser.get("in_channels", 4))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [0, 0, 0, 0])) - 1)

    @property
    def default_side(self) -> int:
        if self.is_flux:  # FluxPipeline's default_sample_size (128 latent pixels), as diffusers sizes its images
            return 128 * self.vae_scale_factor
        sample_size = self.denoiser.get("sample_size", 64)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        return int(sample_size) * self.vae_scale_factor

    @property
    def is_xl(self) -> bool:
        return self.architecture in ("sdxl", "sdxl-refiner")

    @property
    def components(self) -> tuple[str, ...]:
        """Every component this pipeline has, in export order: as many of each role as the role counts."""
        return tuple(
            role.component(index) for role in roles_for(self.architecture) for index in range(role.count(self))
        )


def _read_json(path: Path, what: str, roots: tuple[Path, ...] | None = None) -> dict[str, Any]:
    """A JSON object from a regular file inside `roots` (by default, the folder holding it)."""
    inside(path, roots or model_roots(path.parent))
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(
            f"{what} is missing: {path} does not exist; point --model at a complete diffusers pipeline."
        ) from None
    except json.JSONDecodeError as exc:
        raise ExportError(f"{what} at {path} is not valid JSON (line {exc.lineno}); re-download the model.") from None
    except (UnicodeDecodeError, RecursionError):
        raise ExportError(f"{what} at {path} is not valid JSON; re-download the model.") from None
    if not isinstance(data, dict):
        raise ExportError(f"{what} at {path} is not a JSON object; re-download the model.")
    return data


def find_weight_files(folder: Path, roots: tuple[Path, ...] | None = None) -> tuple[Path, ...]:
    """The component's weight file(s): safetensors preferred, the full-precision file, not a variant;
    shards via their index. Each must be a regular file inside `roots` (by default, `folder`)."""
    roots = roots or model_roots(folder)
    for name in (*WEIGHT_NAMES, *PICKLE_WEIGHT_NAMES):
        if inside(folder / name, roots).is_file():
            return (folder / name,)
        index = folder / f"{name}.index.json"
        if inside(index, roots).is_file():
            weight_map = _read_json(index, index.name, roots).get("weight_map", {})
            shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else [None]
            for shard in shards:
                if not isinstance(shard, str) or not inside(folder / shard, roots).is_file():
                    raise ExportError(
                        f"{index} names the shard {shard!r}, which is not a file in {folder}; re-download the model."
                    )
            return tuple(folder / str(shard) for shard in shards)
    raise ExportError(
        f"No weights in {folder}: expected {' or '.join(WEIGHT_NAMES)}; point --model at a complete pipeline."
    )


def check_safetensors(path: Path) -> None:
    """Fail now, not mid-export, on a file cut short or not safetensors at all (reads the header only)."""
    size = path.stat().st_size
    header = read_header(path)
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    expected = 8 + header_size + data_end
    if size < expected:
        raise ExportError(f"{path} is truncated ({size} of {expected} bytes); re-download it.")


@functools.cache
def diffusers_schedulers() -> frozenset[str]:
    """The scheduler names of the installed diffusers, quoted in its lazy-import table: read without importing
    it, by a scan (a parse took 35 ms of a rerun); empty when diffusers is laid out differently, which skips the
    name check."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or spec.origin is None:
        return frozenset()
    return frozenset(re.findall(r"""["']([A-Za-z_]\w*Scheduler)["']""", Path(spec.origin).read_text()))


def check_component_classes(
    model_id: str, index: dict[str, Any], known: dict[str, tuple[str, frozenset[str] | None]] = KNOWN_CLASSES
) -> None:
    """Every part we export or copy must be diffusers' or transformers' own class, never a repository's code."""
    for name, (library, classes) in known.items():
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue  # absent, or null like the refiner's text_encoder
        given_library, class_name = entry
        if given_library != library:
            raise ExportError(
                f"--model {model_id}: model_index.json names {name} as {given_library}.{class_name}, which is not "
                f"{library}' own class (custom code, which neuron-export never runs); export a pipeline whose "
                f"{name} is {library}' {' or '.join(sorted(classes)) if classes else 'scheduler'}."
            )
        names = diffusers_schedulers() if classes is None else classes
        if names and class_name not in names:
            supported = " or ".join(sorted(classes)) if classes else "a scheduler diffusers has"
            raise ExportError(
                f"--model {model_id}: model_index.json names {name} as {library}.{class_name}, a class neuron-export "
                f"cannot export or load ({name} must be {supported}); fix model_index.json or export another pipeline."
            )


def read_facts(source: ModelSource) -> ModelFacts:
    """Recognise SD, SDXL base, SDXL refiner, LCM and inpainting models from model_index.json and configs."""
    if not source.path.is_dir():
        raise ExportError(
            f"--model {source.model_id}: directory {source.path} does not exist; pass a diffusers pipeline directory or a hub id."
        )
    roots = model_roots(source.path)
    index = _read_json(source.path / "model_index.json", "model_index.json", roots)
    if index.get("_class_name") in PIXART_CLASSES:
        return _with_weights(source, index, read_pixart_facts(source, index))
    if index.get("_class_name") in FLUX_CLASSES:
        return _with_weights(source, index, read_flux_facts(source, index))
    check_component_classes(source.model_id, index)
    unet_folder = source.folder("unet")
    if not (unet_folder / "config.json").is_file():
        raise ExportError(
            f"--model {source.model_id} has no UNet ({unet_folder / 'config.json'} is missing); "
            "neuron-export needs a full Stable Diffusion pipeline with a unet/ folder."
        )
    unet = _read_json(unet_folder / "config.json", "unet/config.json", source.roots("unet"))
    unet_class = unet.get("_class_name", "UNet2DConditionModel")
    if unet_class not in (
        KNOWN_CLASSES["unet"][1] or ()
    ):  # a --unet has no model_index.json: its config names the class
        raise ExportError(
            f"--{'unet' if source.unet_path else 'model'} {source.unet_id or source.model_id}: "
            f"{unet_folder / 'config.json'} names the UNet class {unet_class}, which neuron-export cannot "
            "export (custom code is never run); use a diffusers UNet2DConditionModel."
        )
    vae = read_vae_config(source, unet)

    def optional_config(name: str) -> dict[str, Any] | None:
        entry = index.get(name)
        if not entry or entry[0] is None:
            return None
        return _read_json(source.path / name / "config.json", f"{name}/config.json", roots)

    text_encoder = optional_config("text_encoder")
    text_encoder_2 = optional_config("text_encoder_2")
    if text_encoder_2 is not None or unet.get("addition_embed_type") == "text_time":
        architecture = "sdxl" if text_encoder is not None else "sdxl-refiner"
    else:
        architecture = "sd"
    if architecture == "sd" and text_encoder is None:
        raise ExportError(
            f"--model {source.model_id} has no text_encoder; it is not a Stable Diffusion pipeline neuron-export can export."
        )
    facts = ModelFacts(
        pipeline_class=str(index.get("_class_name", "")),
        architecture=architecture,
        is_lcm=unet.get("time_cond_proj_dim") is not None,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
    )
    return _with_weights(source, index, facts)


def _with_weights(source: ModelSource, index: dict[str, Any], facts: ModelFacts) -> ModelFacts:
    roots = model_roots(source.path)
    weights = {name: find_weight_files(source.folder(name), source.roots(name)) for name in facts.components}
    for name in PROCESSOR_FOLDERS:  # copied whole into the export: nothing in them may lead outside the model
        if isinstance(index.get(name), list) and (source.path / name).is_dir():
            files_inside(source.path / name, roots)
    return ModelFacts(**{**facts.__dict__, "weight_files": weights})


def read_pixart_facts(source: ModelSource, index: dict[str, Any]) -> ModelFacts:
    """A PixArt-α or -Σ pipeline (its pipeline class says which): T5 encoder, transformer, VAE."""
    check_component_classes(source.model_id, index, PIXART_KNOWN_CLASSES)
    roots = model_roots(source.path)
    for folder in ("transformer", "text_encoder"):
        if not (source.path / folder / "config.json").is_file():
            raise ExportError(
                f"--model {source.model_id} has no {folder} ({source.path / folder / 'config.json'} is missing); "
                "neuron-export needs a full PixArt pipeline with transformer/ and text_encoder/ folders."
            )
    transformer = _read_json(source.path / "transformer" / "config.json", "transformer/config.json", roots)
    text_encoder = _read_json(source.path / "text_encoder" / "config.json", "text_encoder/config.json", roots)
    max_length = tokenizer_max_length(source, "tokenizer", roots)
    return ModelFacts(
        pipeline_class=str(index["_class_name"]),
        architecture=PIXART_ARCHITECTURES[str(index["_class_name"])],
        is_lcm=False,
        unet={},
        vae=_read_json(source.path / "vae" / "config.json", "vae/config.json", roots),
        text_encoder=text_encoder,
        text_encoder_2=None,
        transformer=transformer,
        tokenizer_max_length=max_length,
    )


def tokenizer_max_length(source: ModelSource, folder: str, roots: tuple[Path, ...]) -> int | None:
    """The tokenizer's model_max_length, or None when it states none (or a "very large" placeholder)."""
    config = source.path / folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    value = _read_json(config, f"{folder}/tokenizer_config.json", roots).get("model_max_length")
    return value if isinstance(value, int) and 0 < value < 100_000 else None


def read_flux_facts(source: ModelSource, index: dict[str, Any]) -> ModelFacts:
    """A Flux pipeline (Kontext recognised from its class): CLIP and T5 text encoders, transformer, VAE."""
    check_component_classes(source.model_id, index, FLUX_KNOWN_CLASSES)
    roots = model_roots(source.path)
    for folder in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        if not (source.path / folder / "config.json").is_file():
            raise ExportError(
                f"--model {source.model_id} has no {folder} ({source.path / folder / 'config.json'} is missing); "
                "neuron-export needs a full Flux pipeline with transformer/, text_encoder/, text_encoder_2/ and "
                "vae/ folders."
            )
    configs = {
        folder: _read_json(source.path / folder / "config.json", f"{folder}/config.json", roots)
        for folder in ("transformer", "text_encoder", "text_encoder_2", "vae")
    }
    return ModelFacts(
        pipeline_class=str(index["_class_name"]),
        architecture="flux-kontext" if index["_class_name"] == FLUX_KONTEXT else "flux",
        is_lcm=False,
        unet={},
        vae=configs["vae"],
        text_encoder=configs["text_encoder"],
        text_encoder_2=configs["text_encoder_2"],
        transformer=configs["transformer"],
        tokenizer_max_length=tokenizer_max_length(source, "tokenizer_2", roots),
    )


def read_vae_config(source: ModelSource, unet: dict[str, Any]) -> dict[str, Any]:
    """The VAE the export is built from; a replacement must make the latents the UNet was trained on."""
    own = source.path / "vae" / "config.json"
    if source.vae_path is None:
        return _read_json(own, "vae/config.json", model_roots(source.path))
    vae = _read_json(source.vae_path / "config.json", "--vae config.json")
    name = f"--vae {source.vae_id}"
    if vae.get("_class_name", "AutoencoderKL") not in (KNOWN_CLASSES["vae"][1] or ()):
        raise ExportError(
            f"{name}: its config names the class {vae.get('_class_name')}, which neuron-export cannot export "
            "(custom code is never run); use a diffusers AutoencoderKL."
        )
    latent, wanted = int(vae.get("latent_channels", 4)), int(unet.get("out_channels", 4))
    if latent != wanted:
        raise ExportError(
            f"{name} makes {latent}-channel latents but {source.model_id}'s UNet works on {wanted}; pass a "
            "VAE made for this model."
        )
    if own.is_file():  # the source VAE's config only (never its weights): its scaling is what the UNet learned
        original = _read_json(own, "vae/config.json", model_roots(source.path))
        ours, theirs = float(vae.get("scaling_factor", 0.18215)), float(original.get("scaling_factor", 0.18215))
        if abs(ours - theirs) > 1e-6:
            raise ExportError(
                f"{name} scales latents by {ours:g} but {source.model_id}'s UNet was trained with "
                f"{theirs:g}; pass a VAE made for this model (e.g. stabilityai/sd-vae-ft-mse for SD 1.x)."
            )
        blocks, own_blocks = (
            len(vae.get("block_out_channels", [0] * 4)),
            len(original.get("block_out_channels", [0] * 4)),
        )
        if blocks != own_blocks:
            raise ExportError(
                f"{name} downsamples by {2 ** (blocks - 1)} but {source.model_id}'s VAE by "
                f"{2 ** (own_blocks - 1)}; pass a VAE made for this model."
            )
    return vae
