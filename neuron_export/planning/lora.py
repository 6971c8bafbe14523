"""LoRA adapters, the plan's side: find each file, read its safetensors header, check every layer against the
base model's headers, and say which components it touches. No tensor is read and torch is not imported, so a
LoRA for another base model is refused in the first second, naming the layer that does not fit.

Layer names come in three spellings: diffusers / PEFT (`unet.down_blocks.0...to_q.lora_A.weight`), the older
diffusers attention-processor one (`...attn1.processor.to_q_lora.down.weight`) and kohya's
(`lora_unet_down_blocks_0_..._to_q.lora_down.weight`, SDXL ones in the original UNet's `input_blocks` naming).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuron_export.errors import ExportError
from neuron_export.planning.source import looks_like_hub_id
from neuron_export.planning.source_files import read_header as safetensors_header

SAFETENSORS = ".safetensors"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers saves and picks among several
# Files in a LoRA folder that are never the adapter (as diffusers skips them when guessing).
NOT_ADAPTER_WORDS = ("scheduler", "optimizer", "checkpoint")
DIFFUSERS_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
# Key endings -> the part of a low-rank pair they hold: "down" (rank x in), "up" (out x rank), or nothing to check.
DIFFUSERS_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_B.bias", None),
    (".lora_magnitude_vector", None),
    (".alpha", None),
)
KOHYA_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".alpha", None),
    (".dora_scale", None),
    (".lora_mid.weight", None),
)
# The older diffusers attention-processor names, per component family.
PROCESSOR_NAMES = {
    "unet": {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"},
    "text": {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"},
}
# kohya's SDXL names follow the original (sgm) UNet; these pieces are spelled differently in diffusers'.
SGM_RENAMES = (
    ("in_layers_2", "conv1"),
    ("out_layers_3", "conv2"),
    ("emb_layers_1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
    ("time_embed_0", "time_embedding_linear_1"),
    ("time_embed_2", "time_embedding_linear_2"),
    ("label_emb_0_0", "add_embedding_linear_1"),
    ("label_emb_0_2", "add_embedding_linear_2"),
)


@dataclass(frozen=True)
class LoraAdapter:
    """One --lora, resolved and checked: the file, how it is applied, and what it touches."""

    source: str  # as given: a hub id, a directory or a file
    weight_name: str  # the file's name inside `source`
    adapter_name: str
    scale: float
    path: Path
    commit: str | None
    components: tuple[str, ...]  # the export components it has layers for
    sha256: str = ""


@dataclass(frozen=True)
class LoraFusion:
    """What a worker needs to fuse one adapter into the one component it builds (no config, no token)."""

    path: Path
    sha256: str
    adapter_name: str
    scale: float
    key_prefixes: tuple[str, ...]  # the file's keys for this component start with one of these
    unet_config_mapping: bool  # SDXL: diffusers maps kohya's sgm block names with the UNet's config

    def cache_payload(self) -> dict[str, Any]:
        """What decides the fused weights: the file's bytes, the scale, the order (the adapter's name does not)."""
        return {"sha256": self.sha256, "scale": self.scale}


def read_header(path: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """A safetensors file's tensor shapes and its metadata, from the header alone (every tensor checked)."""
    header = safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    return {key: list(entry["shape"]) for key, entry in header.items()}, metadata


def base_layers(weight_files: tuple[Path, ...]) -> dict[str, list[int]]:
    """module path -> weight shape of a base component, from its safetensors headers (`text_model.` dropped)."""
    layers: dict[str, list[int]] = {}
    for file in weight_files:
        if file.suffix != SAFETENSORS:
            continue  # an old pickled checkpoint has no header to read: its layers go unchecked
        shapes, _ = read_header(file)
        for key, shape in shapes.items():
            if key.endswith(".weight"):
                layers[key[: -len(".weight")].removeprefix("text_model.")] = shape
    return layers


def _split(key: str) -> tuple[str, str, str | None, str] | None:
    """A LoRA key -> (component, module, part, spelling), or None when it is not a layer key we know."""
    for prefixes, suffixes, spelling in (
        (DIFFUSERS_PREFIXES, DIFFUSERS_SUFFIXES, "diffusers"),
        (KOHYA_PREFIXES, KOHYA_SUFFIXES, "kohya"),
    ):
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        suffix = next(((s, part) for s, part in suffixes if key.endswith(s)), None)
        if prefix and suffix:
            return prefixes[prefix], key[len(prefix) : -len(suffix[0])], suffix[1], spelling
    return None


def _diffusers_module(component: str, module: str) -> str:
    module = module.replace(".processor.", ".").removeprefix("text_model.")
    names = PROCESSOR_NAMES["unet" if component == "unet" else "text"]
    head, _, last = module.rpartition(".")
    return f"{head}.{names[last]}" if last in names else module


def _sgm_to_diffusers(name: str, layers_per_block: int) -> str:
    """kohya's SDXL block names (input_blocks_4_1_...) -> diffusers' (down_blocks_1_attentions_0_...), underscored."""
    parts = name.split("_")
    try:
        if name.startswith("input_blocks_"):
            index, inner, rest = int(parts[2]), int(parts[3]), parts[4:]
            if index == 0:
                return "conv_in"
            block, layer = divmod(index - 1, layers_per_block + 1)
            if rest[:1] == ["op"]:
                return f"down_blocks_{block}_downsamplers_0_conv"
            name = "_".join([f"down_blocks_{block}", ("resnets", "attentions")[inner], str(layer), *rest])
        elif name.startswith("middle_block_"):
            inner_name = {0: "resnets_0", 1: "attentions_0", 2: "resnets_1"}[int(parts[2])]
            name = "_".join([f"mid_block_{inner_name}", *parts[3:]])
        elif name.startswith("output_blocks_"):
            index, inner, rest = int(parts[2]), int(parts[3]), parts[4:]
            block, layer = divmod(index, layers_per_block + 1)
            inner_name = ("resnets", "attentions", "upsamplers")[inner]
            name = "_".join([f"up_blocks_{block}", inner_name, str(layer if inner < 2 else 0), *rest])
    except (IndexError, KeyError, ValueError):
        return name
    if name == "out_2":
        return "conv_out"
    for old, new in SGM_RENAMES:
        name = name.replace(old, new)
    return name


def check_lora(
    source: str,
    model: str,
    path: Path,
    shapes: dict[str, list[int]],
    bases: dict[str, dict[str, list[int]]],
    layers_per_block: int,
) -> tuple[str, ...]:
    """Every layer of the LoRA must exist in the base model with matching widths; returns the components it touches.
    `bases` holds the model's components (None-free); a layer for a component it lacks is refused too."""
    touched: list[str] = []
    underscored = {name: {module.replace(".", "_"): module for module in layers} for name, layers in bases.items()}
    recognised = False
    for key, shape in shapes.items():
        split = _split(key)
        if split is None:
            continue
        recognised = True
        component, module, part, spelling = split
        if component not in bases:
            raise ExportError(
                f"--lora {source} has layers for {component} (e.g. {key}), which {model} does not have; "
                f"it was made for another base model, so pass a LoRA trained for {model}."
            )
        if part is None:
            continue
        if not bases[component]:  # a pickled base checkpoint has no header: this layer goes unchecked
            touched += [component] if component not in touched else []
            continue
        sgm = (
            spelling == "kohya"
            and component == "unet"
            and re.match(r"(input_blocks|middle_block|output_blocks|out_2|time_embed|label_emb)", module)
        )
        if spelling == "diffusers":
            target = _diffusers_module(component, module)
        else:
            name = module.removeprefix("text_model_")
            name = _sgm_to_diffusers(name, layers_per_block) if sgm else name
            target = underscored[component].get(name, name)
        base = bases[component].get(target)
        if base is None:
            if sgm:
                continue  # sgm names diffusers converts in ways we do not mirror exactly: left to diffusers
            raise ExportError(
                f"--lora {source}: its layer {key} has no counterpart in {model}'s {component}; the LoRA "
                f"was made for another base model, so pass a LoRA trained for {model}."
            )
        axis, what = (1, "input width") if part == "down" else (0, "output width")
        if len(shape) < 2 or len(base) < 2 or shape[axis] != base[axis]:
            found = shape[axis] if len(shape) > axis else shape
            raise ExportError(
                f"--lora {source}: layer {component}.{target} has {what} {found} in the LoRA but "
                f"{base[axis]} in {model}; the LoRA was made for another base model, so pass a LoRA "
                f"trained for {model}."
            )
        if component not in touched:
            touched.append(component)
    if not recognised or not touched:
        first = next(iter(shapes), "(none)")
        raise ExportError(
            f"--lora {source}: {path.name} has no LoRA layers for a Stable Diffusion UNet or text encoder "
            f"(its first key is {first}); pass a diffusers, PEFT or kohya LoRA made for {model}."
        )
    return tuple(touched)


def key_prefixes(component: str) -> tuple[str, ...]:
    """The key prefixes that hold `component`'s layers in a LoRA file, in every spelling."""
    diffusers = [prefix for prefix, name in DIFFUSERS_PREFIXES.items() if name == component]
    kohya = [prefix for prefix, name in KOHYA_PREFIXES.items() if name == component]
    return (*diffusers, *kohya)


# --- finding the file -------------------------------------------------------------------------------


def pick_weight_name(source: str, names: list[str], where: str) -> str:
    """The one adapter file among `names` (as diffusers picks it), or one sentence asking for --lora-weight-name."""
    candidates = sorted(
        n
        for n in names
        if n.endswith(SAFETENSORS) and "/" not in n and not any(word in n for word in NOT_ADAPTER_WORDS)
    )
    if DIFFUSERS_WEIGHT_NAME in candidates:
        return DIFFUSERS_WEIGHT_NAME
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

    offline = offline or os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")  # as resolve_source reads it
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


def locate(
    source: str, weight_name: str | None, token: str | None, cache_dir: Path | None, offline: bool
) -> tuple[Path, str, str | None]:
    """--lora (a file, a directory, or a hub id) and its --lora-weight-name -> (file, weight name, hub commit)."""
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


def resolve_loras(
    config: Any, model: str, bases: dict[str, dict[str, list[int]]], layers_per_block: int
) -> tuple[LoraAdapter, ...]:
    """Each --lora found and checked against the model's headers, in the order given."""
    adapters = []
    for index, source in enumerate(config.lora):
        weight_name = (config.lora_weight_name[index] or None) if config.lora_weight_name else None  # '': the only file
        path, weight_name, commit = locate(source, weight_name, config.token, config.hub_cache_dir, config.offline)
        shapes, _ = read_header(path)
        touched = check_lora(source, model, path, shapes, bases, layers_per_block)
        adapters.append(
            LoraAdapter(
                source=source,
                weight_name=weight_name,
                adapter_name=(config.lora_adapter_name[index] if config.lora_adapter_name else "")
                or f"default_{index}",
                scale=float(config.lora_scale[index]) if config.lora_scale else 1.0,
                path=path,
                commit=commit,
                components=touched,
            )
        )
    return tuple(adapters)


def plan_loras(config: Any, facts: Any, hashes: Any) -> tuple[LoraAdapter, ...]:
    """Every --lora of `config` checked against `facts`' weight headers and hashed (once per file, remembered)."""
    if not config.lora:
        return ()
    bases = {
        name: base_layers(facts.weight_files[name])
        for name in ("text_encoder", "text_encoder_2", "unet")
        if name in facts.components
    }
    layers_per_block = facts.unet.get("layers_per_block", 2)  # kohya's sgm names count blocks with it
    layers_per_block = int(layers_per_block[0] if isinstance(layers_per_block, list) else layers_per_block)
    adapters = resolve_loras(config, config.model, bases, layers_per_block)
    return tuple(LoraAdapter(**{**a.__dict__, "sha256": hashes.sha256(a.path)}) for a in adapters)


def fusions_for(component: str, adapters: tuple[LoraAdapter, ...], xl: bool) -> tuple[LoraFusion, ...]:
    """The adapters that touch `component`, in order, as its worker fuses them."""
    return tuple(
        LoraFusion(
            path=a.path,
            sha256=a.sha256,
            adapter_name=a.adapter_name,
            scale=a.scale,
            key_prefixes=key_prefixes(component),
            unet_config_mapping=xl and component == "unet",
        )
        for a in adapters
        if component in a.components
    )
