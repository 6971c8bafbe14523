"""Every source an export reads, resolved once: the model, --unet, --vae, the ControlNets, the IP-Adapter and the
LoRAs, each a local directory or file as it is, or a Hub snapshot of what the export needs. One download policy:
configs and full-precision weights together (safetensors, else an older checkpoint's .bin), at one commit per
source; fp16 variants never. Nothing is read here but file names: the facts come next (planning/source.py)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.errors import ExportError
from neuron_export.planning.source import (
    HUB_PICKLE_PATTERNS,
    HUB_WEIGHT_PATTERNS,
    PROCESSOR_FOLDERS,
    AddOnSource,
    LoraFile,
    ModelSource,
)
from neuron_export.roles.registry import find_role

if TYPE_CHECKING:
    from neuron_export.planning.config import ExportConfig

SAFETENSORS = ".safetensors"
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # what diffusers saves and picks among several
# Files in a LoRA folder that are never the adapter (as diffusers skips them when guessing).
NOT_ADAPTER_WORDS = ("scheduler", "optimizer", "checkpoint")


def resolve_sources(config: ExportConfig, components: tuple[str, ...]) -> ModelSource:
    """Every input the config names, on local disk: the one step that downloads."""
    hub: dict[str, Any] = {
        "token": config.options.token,
        "cache_dir": config.options.hub_cache_dir,
        "offline": offline_mode(config.options.offline),
    }
    source = resolve_source(
        config.spec.model or "", config.spec.revision, config.spec.unet, components, vae=config.spec.vae, **hub
    )
    controlnets = tuple(resolve_controlnet(value, **hub) for value in config.spec.controlnet)
    adapter = encoder = None
    if config.spec.ip_adapter is not None:
        adapter, encoder = resolve_ip_adapter(
            config.spec.ip_adapter,
            config.spec.ip_adapter_subfolder,
            config.spec.ip_adapter_weight_name or "",
            source.path,
            **hub,
        )
    loras = tuple(
        resolve_lora(
            value, (config.spec.lora_weight_name[index] or None) if config.spec.lora_weight_name else None, **hub
        )
        for index, value in enumerate(config.spec.lora)
    )  # a weight name '': the only file
    return dataclasses.replace(
        source, controlnets=controlnets, ip_adapter=adapter, image_encoder_path=encoder, loras=loras
    )


def offline_mode(offline: bool) -> bool:
    return offline or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")


def looks_like_hub_id(value: str) -> bool:
    return (
        value.count("/") == 1
        and all(value.split("/"))
        and not value.startswith((".", "/", "~"))
        and not Path(value).exists()
    )


def hub_download(
    repo_id: str,
    revision: str | None,
    patterns: list[str],
    token: str | None,
    cache_dir: Path | None,
    offline: bool,
    flag: str = "--model",
) -> tuple[Path, str | None]:
    """A snapshot of the files of `repo_id` matching `patterns`; bad ids, revisions and failures name `flag`."""
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


def _with_weights(
    value: str, revision: str | None, folders: list[str], flag: str, hub: dict[str, Any]
) -> tuple[Path, str | None]:
    """`folders`' configs and safetensors weights from the Hub; a folder without safetensors then gets its .bin."""
    patterns = [f"{folder}{name}" for folder in folders for name in ("config.json", *HUB_WEIGHT_PATTERNS)]
    root, commit = hub_download(value, revision, patterns, flag=flag, **hub)
    pickled = [
        folder for folder in folders if (root / folder).is_dir() and not any((root / folder).glob("*.safetensors"))
    ]
    if pickled:
        patterns = [f"{folder}{name}" for folder in pickled for name in HUB_PICKLE_PATTERNS]
        root, commit = hub_download(value, commit or revision, patterns, flag=flag, **hub)
    return root, commit


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
    """The model (a local directory as it is, or a hub snapshot holding only what `components` need), --unet, --vae."""
    offline = offline_mode(offline)
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


def resolve_vae(vae: str, token: str | None, cache_dir: Path | None, offline: bool) -> tuple[Path, str | None]:
    """A bare VAE (like stabilityai/sd-vae-ft-mse) or a pipeline's vae/ folder, local or from the hub."""
    commit = None
    if looks_like_hub_id(vae):
        patterns = ["config.json", *HUB_WEIGHT_PATTERNS, *(f"vae/{n}" for n in ("config.json", *HUB_WEIGHT_PATTERNS))]
        root, commit = hub_download(vae, None, patterns, token, cache_dir, offline, flag="--vae")
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


def _local(value: str, flag: str) -> Path:
    root = Path(value).expanduser()
    if not root.is_dir():
        raise ExportError(f"{flag} {value}: directory does not exist; pass a directory or a hub id like org/name.")
    return root


def resolve_controlnet(value: str, token: str | None, cache_dir: Path | None, offline: bool) -> AddOnSource:
    """A ControlNet directory (its config.json at the root, or in controlnet/), or a hub snapshot of it."""
    hub: dict[str, Any] = {"token": token, "cache_dir": cache_dir, "offline": offline}
    if looks_like_hub_id(value):
        root, commit = _with_weights(value, None, ["", "controlnet/"], "--controlnet", hub)
    else:
        root, commit = _local(value, "--controlnet"), None
    path = root / "controlnet" if (root / "controlnet" / "config.json").is_file() else root
    if not (path / "config.json").is_file():
        raise ExportError(
            f"--controlnet {value} has no config.json; pass a diffusers ControlNetModel directory or hub id."
        )
    return AddOnSource(model_id=value, path=path, commit=commit)


def resolve_ip_adapter(
    value: str,
    subfolder: str | None,
    weight_name: str,
    model: Path,
    token: str | None,
    cache_dir: Path | None,
    offline: bool,
) -> tuple[AddOnSource, Path]:
    """The adapter's weight file and its CLIP image encoder: the pipeline's own image_encoder/ when it has one,
    else SUBFOLDER/image_encoder beside the adapter (as diffusers looks)."""
    if not weight_name.endswith(SAFETENSORS):
        raise ExportError(
            f"--ip-adapter-weight-name {weight_name} is not a .safetensors file; neuron-export reads "
            "adapters from safetensors only (no pickle is unpickled); pass the .safetensors file."
        )
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    own_encoder = (model / "image_encoder" / "config.json").is_file()
    if looks_like_hub_id(value):
        encoder_files = (
            [] if own_encoder else [f"{prefix}image_encoder/{n}" for n in ("config.json", *HUB_WEIGHT_PATTERNS)]
        )
        files = [f"{prefix}{weight_name}", *encoder_files]
        root, commit = hub_download(value, None, files, token, cache_dir, offline, flag="--ip-adapter")
    else:
        root, commit = _local(value, "--ip-adapter"), None
    weight_file = root / prefix / weight_name
    if not weight_file.is_file():
        where = f"{value}/{prefix}" if prefix else value
        raise ExportError(
            f"--ip-adapter-weight-name {weight_name}: no such file in {where}; check the name "
            "(and --ip-adapter-subfolder)."
        )
    encoder = model / "image_encoder" if own_encoder else root / prefix / "image_encoder"
    if not (encoder / "config.json").is_file():
        raise ExportError(
            f"--ip-adapter {value}: no image encoder at {encoder} (diffusers looks in "
            "SUBFOLDER/image_encoder); pass the repository that holds it."
        )
    return AddOnSource(model_id=value, path=weight_file, commit=commit), encoder


# --- LoRA files (--lora) ------------------------------------------------------------------------------


def pick_weight_name(source: str, names: list[str], where: str) -> str:
    """The one adapter file among `names` (as diffusers picks it), or one sentence asking for --lora-weight-name."""
    candidates = sorted(
        n
        for n in names
        if n.endswith(SAFETENSORS) and "/" not in n and not any(word in n for word in NOT_ADAPTER_WORDS)
    )
    if DIFFUSERS_LORA_NAME in candidates:
        return DIFFUSERS_LORA_NAME
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ExportError(
            f"--lora {source}: {where} has no .safetensors file; neuron-export fuses LoRA weights from "
            "safetensors only: pass a LoRA saved as safetensors."
        )
    raise ExportError(
        f"--lora {source}: {where} has several .safetensors files ({', '.join(candidates)}); pass "
        "--lora-weight-name with the one to fuse."
    )


def _check_weight_name(weight_name: str) -> None:
    if not weight_name.endswith(SAFETENSORS):
        raise ExportError(
            f"--lora-weight-name {weight_name} is not a .safetensors file; neuron-export fuses LoRA weights "
            "from safetensors only (their header is checked before anything is loaded)."
        )


def _hub_lora(
    repo: str, weight_name: str | None, token: str | None, cache_dir: Path | None, offline: bool
) -> tuple[Path, str, str | None]:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        if weight_name is None:
            if offline:  # the cached snapshot's files stand for the repository's
                root = Path(
                    snapshot_download(
                        repo, allow_patterns=["*.safetensors"], token=token, cache_dir=cache_dir, local_files_only=True
                    )
                )
                weight_name = pick_weight_name(repo, [p.name for p in root.iterdir()], f"the cached snapshot of {repo}")
            else:
                weight_name = pick_weight_name(repo, HfApi(token=token).list_repo_files(repo), f"hub repository {repo}")
        _check_weight_name(weight_name)
        file = hf_hub_download(repo, weight_name, token=token, cache_dir=cache_dir, local_files_only=offline)
    except RepositoryNotFoundError:
        raise ExportError(
            f"--lora {repo}: no such repository on the hub (or it is private: pass --token); check the id."
        ) from None
    except EntryNotFoundError:
        raise ExportError(
            f"--lora-weight-name {weight_name}: {repo} has no such file; pass the name of its LoRA .safetensors file."
        ) from None
    except LocalEntryNotFoundError:
        raise ExportError(
            f"--lora {repo} is not in the local hub cache and offline mode is on (or the hub cannot be "
            "reached); download it first or pass a local file."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ExportError(
            f"--lora {repo}: download failed ({type(exc).__name__}); check the network or pass a local file."
        ) from None
    path = Path(file)
    commit = path.parent.name if len(path.parent.name) == 40 else None
    return path, weight_name, commit


def resolve_lora(
    source: str, weight_name: str | None, token: str | None, cache_dir: Path | None, offline: bool
) -> LoraFile:
    """--lora (a file, a directory, or a hub id) and its --lora-weight-name -> the file (and its hub commit)."""
    path, weight_name, commit = _locate_lora(source, weight_name, token, cache_dir, offline)
    return LoraFile(source=source, weight_name=weight_name, path=path, commit=commit)


def _locate_lora(
    source: str, weight_name: str | None, token: str | None, cache_dir: Path | None, offline: bool
) -> tuple[Path, str, str | None]:
    local = Path(source).expanduser()
    if local.is_file():
        if weight_name not in (None, local.name):
            raise ExportError(
                f"--lora-weight-name {weight_name} does not name the file --lora {source}; pass the "
                "directory holding it as --lora, or leave --lora-weight-name out."
            )
        _check_weight_name(local.name)
        return local, local.name, None
    if local.is_dir():
        names = [p.name for p in local.iterdir() if p.is_file()]
        if weight_name is None:
            weight_name = pick_weight_name(source, names, f"directory {local}")
        _check_weight_name(weight_name)
        if not (local / weight_name).is_file():
            have = ", ".join(sorted(n for n in names if n.endswith(SAFETENSORS))) or "no .safetensors file"
            raise ExportError(
                f"--lora-weight-name {weight_name}: {local} has no such file (it has {have}); pass the "
                "name of its LoRA file."
            )
        return local / weight_name, weight_name, None
    if looks_like_hub_id(source):
        return _hub_lora(source, weight_name, token, cache_dir, offline)
    raise ExportError(
        f"--lora {source}: no such file or directory; pass a LoRA .safetensors file, a directory holding "
        "one, or a hub id like org/name."
    )
