"""Where the model comes from (local directory or hub snapshot) and what it is, read from its JSON files.

Only configs and safetensors headers are read here: no weights are loaded and no remote code runs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from neuron_export.errors import ExportError
from neuron_export.pipelines import pipeline_for
from neuron_export.planning.source_files import files_inside, inside, model_roots, read_header
from neuron_export.roles.registry import CONTROLNET, find_role, role_of, roles

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
    # --- ControlNet and IP-Adapter add-ons (planning/conditioning.py resolves them) ---
    controlnets: tuple[AddOnSource, ...] = ()
    ip_adapter: AddOnSource | None = None  # path: the adapter's weight file
    image_encoder_path: Path | None = None

    def origin(self, component: str) -> ComponentOrigin:
        """Where a component's files come from (the model, --unet, --vae or an add-on): the one place that decides."""
        if component == "unet" and self.unet_path is not None:
            repo, commit, folder = self.unet_id, self.unet_commit, self.unet_path
            root = folder
        elif role_of(component).source_folder == "vae" and self.vae_path is not None:
            repo, commit, folder = self.vae_id, self.vae_commit, self.vae_path
            root = folder
        elif CONTROLNET.matches(component):
            added = self.controlnets[CONTROLNET.index(component)]
            repo, commit, folder = added.model_id, added.commit, added.path
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
        return ComponentOrigin(folder=folder, root=root, hub=_snapshot(repo, commit, folder))

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
class ModelFacts:
    """What the pipeline is, decided from its configs rather than from its name."""

    pipeline_class: str
    architecture: str  # "sd", "sdxl" or "sdxl-refiner"
    is_lcm: bool
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None
    text_encoder_2: dict[str, Any] | None
    weight_files: dict[str, tuple[Path, ...]] = field(default_factory=dict)  # component -> safetensors files
    # --- ControlNet and IP-Adapter add-ons (planning/conditioning.py reads them) ---
    controlnets: tuple[dict[str, Any], ...] = ()  # each ControlNet's config.json, in --controlnet order
    image_encoder: dict[str, Any] | None = None  # the IP-Adapter's CLIP vision config
    ip_adapter_tokens: int = 0  # image encoder hidden states per image the UNet takes (0: no IP-Adapter)

    @property
    def is_pix2pix(self) -> bool:
        """InstructPix2Pix: the UNet sees the noisy latents and the image to edit (4 + 4 channels)."""
        return self.unet_in_channels == 8 or self.pipeline_class == PIX2PIX_PIPELINE

    @property
    def unet_in_channels(self) -> int:
        return int(self.unet.get("in_channels", 4))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.get("block_out_channels", [0, 0, 0, 0])) - 1)

    @property
    def default_side(self) -> int:
        sample_size = self.unet.get("sample_size", 64)
        if isinstance(sample_size, (list, tuple)):
            sample_size = sample_size[0]
        return int(sample_size) * self.vae_scale_factor

    @property
    def is_xl(self) -> bool:
        return self.architecture in ("sdxl", "sdxl-refiner")

    @property
    def components(self) -> tuple[str, ...]:
        """Every component this pipeline has, in export order: as many of each role as the role counts."""
        return tuple(role.component(index) for role in roles() for index in range(role.count(self)))


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


def check_component_classes(model_id: str, index: dict[str, Any]) -> None:
    """Every part we export or copy must be diffusers' or transformers' own class, never a repository's code."""
    for name, (library, classes) in KNOWN_CLASSES.items():
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
    weights = {name: find_weight_files(source.folder(name), source.roots(name)) for name in facts.components}
    for name in PROCESSOR_FOLDERS:  # copied whole into the export: nothing in them may lead outside the model
        if isinstance(index.get(name), list) and (source.path / name).is_dir():
            files_inside(source.path / name, roots)
    return ModelFacts(**{**facts.__dict__, "weight_files": weights})


def hub_download(
    repo_id: str,
    revision: str | None,
    patterns: list[str],
    token: str | None,
    cache_dir: Path | None,
    offline: bool,
    flag: str = "--model",
) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            token=token,
            cache_dir=cache_dir,
            local_files_only=offline,
        )
    except RepositoryNotFoundError:
        raise ExportError(
            f"{flag} {repo_id}: no such model on the hub (or it is private: pass --token); check the id."
        ) from None
    except RevisionNotFoundError:
        raise ExportError(
            f"--revision {revision}: not found in {repo_id}; pass an existing branch, tag or commit."
        ) from None
    except LocalEntryNotFoundError:
        raise ExportError(
            f"{flag} {repo_id} is not in the local hub cache and offline mode is on (or the hub cannot be reached); "
            "download it first or pass a local directory."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ExportError(
            f"{flag} {repo_id}: download failed ({type(exc).__name__}); check the network or pass a local directory."
        ) from None
    commit = Path(path).name if len(Path(path).name) == 40 else None
    return Path(path), commit


def looks_like_hub_id(value: str) -> bool:
    return (
        value.count("/") == 1
        and all(value.split("/"))
        and not value.startswith((".", "/", "~"))
        and not Path(value).exists()
    )


def resolve_source(
    model: str,
    revision: str | None,
    unet: str | None,
    components: tuple[str, ...],
    token: str | None = None,
    cache_dir: Path | None = None,
    offline: bool = False,
    vae: str | None = None,
) -> ModelSource:
    """A local directory as it is, or a hub snapshot holding only what `components` need."""
    offline = offline or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
    if looks_like_hub_id(model):
        replaced = ({"unet"} if unet else set()) | ({"vae"} if vae else set())
        wanted = {role.source_folder for role in map(find_role, components) if role is not None and role.source_folder}
        folders = sorted(wanted - replaced)
        patterns = ["model_index.json", "vae/config.json", "unet/config.json", *(f"{p}/*" for p in PROCESSOR_FOLDERS)]
        patterns += [f"{folder}/{name}" for folder in folders for name in ("config.json", *HUB_WEIGHT_PATTERNS)]
        path, commit = hub_download(model, revision, patterns, token, cache_dir, offline)
        pickled_only = [folder for folder in folders if not any((path / folder).glob("*.safetensors"))]
        if pickled_only:  # an older checkpoint: fetch its .bin weights, for those folders only
            patterns = [f"{folder}/{name}" for folder in pickled_only for name in HUB_PICKLE_PATTERNS]
            path, commit = hub_download(model, commit or revision, patterns, token, cache_dir, offline)
    else:
        path, commit = Path(model).expanduser(), None
        if not path.is_dir():
            raise ExportError(
                f"--model {model}: directory does not exist; pass a diffusers pipeline directory or a hub id like org/name."
            )
    unet_path = unet_commit = None
    if unet is not None:
        if looks_like_hub_id(unet):
            unet_root, unet_commit = hub_download(
                unet,
                None,
                ["config.json", *HUB_WEIGHT_PATTERNS, *(f"unet/{n}" for n in ("config.json", *HUB_WEIGHT_PATTERNS))],
                token,
                cache_dir,
                offline,
            )
        else:
            unet_root = Path(unet).expanduser()
            if not unet_root.is_dir():
                raise ExportError(
                    f"--unet {unet}: directory does not exist; pass a UNet directory or a hub id like latent-consistency/lcm-sdxl."
                )
        unet_path = unet_root / "unet" if (unet_root / "unet" / "config.json").is_file() else unet_root
    vae_path, vae_commit = resolve_vae(vae, token, cache_dir, offline) if vae is not None else (None, None)
    return ModelSource(
        model_id=model,
        path=path,
        revision=revision,
        commit=commit,
        unet_id=unet,
        unet_path=unet_path,
        unet_commit=unet_commit,
        vae_id=vae,
        vae_path=vae_path,
        vae_commit=vae_commit,
    )


# --- the replacement VAE (--vae) ---------------------------------------------------------------------


def resolve_vae(vae: str, token: str | None, cache_dir: Path | None, offline: bool) -> tuple[Path, str | None]:
    """A bare VAE (like stabilityai/sd-vae-ft-mse) or a pipeline's vae/ folder, local or from the hub."""
    commit = None
    if looks_like_hub_id(vae):
        patterns = ["config.json", *HUB_WEIGHT_PATTERNS, *(f"vae/{n}" for n in ("config.json", *HUB_WEIGHT_PATTERNS))]
        try:
            root, commit = hub_download(vae, None, patterns, token, cache_dir, offline)
        except ExportError as exc:
            raise ExportError(str(exc).replace(f"--model {vae}", f"--vae {vae}")) from None
    else:
        root = Path(vae).expanduser()
        if not root.is_dir():
            raise ExportError(
                f"--vae {vae}: directory does not exist; pass a VAE directory or a hub id like stabilityai/sd-vae-ft-mse."
            )
    path = root / "vae" if (root / "vae" / "config.json").is_file() else root
    if not (path / "config.json").is_file():
        raise ExportError(f"--vae {vae} has no config.json (looked in {path}); pass a diffusers AutoencoderKL folder.")
    return path, commit


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
