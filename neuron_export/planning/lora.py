"""LoRA adapters, the plan's side: find each file, read its safetensors header, check every layer against the
base model's headers, and say which components it touches. No tensor is read and torch is not imported, so a
LoRA for another base model is refused in the first second, naming the layer that does not fit.

Layer names come in three spellings: diffusers / PEFT (`unet.down_blocks.0...to_q.lora_A.weight`), the older
diffusers attention-processor one (`...attn1.processor.to_q_lora.down.weight`) and kohya's
(`lora_unet_down_blocks_0_..._to_q.lora_down.weight`, SDXL ones in the original UNet's `input_blocks` naming).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.errors import ExportError
from neuron_export.planning.source import ModelSource
from neuron_export.planning.source_files import read_header as safetensors_header

if TYPE_CHECKING:
    from neuron_export.planning.config import ExportConfig

SAFETENSORS = ".safetensors"
DIFFUSERS_PREFIXES = {
    "unet.": "unet",
    "transformer.": "transformer",  # Flux (diffusers' FluxLoraLoaderMixin format)
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}
# The components diffusers' Flux pipeline fuses a LoRA into (FluxLoraLoaderMixin: transformer and the CLIP encoder).
FLUX_LORA_COMPONENTS = ("transformer", "text_encoder")
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
    names = PROCESSOR_NAMES["unet" if component in ("unet", "transformer") else "text"]
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
            f"--lora {source}: {path.name} has no LoRA layers for this model's UNet, transformer or text encoders "
            f"(its first key is {first}); pass a diffusers, PEFT or kohya LoRA made for {model}."
        )
    return tuple(touched)


def key_prefixes(component: str) -> tuple[str, ...]:
    """The key prefixes that hold `component`'s layers in a LoRA file, in every spelling."""
    diffusers = [prefix for prefix, name in DIFFUSERS_PREFIXES.items() if name == component]
    kohya = [prefix for prefix, name in KOHYA_PREFIXES.items() if name == component]
    return (*diffusers, *kohya)


def check_loras(
    config: ExportConfig, source: ModelSource, bases: dict[str, dict[str, list[int]]], layers_per_block: int
) -> tuple[LoraAdapter, ...]:
    """Each --lora's file (resolved in planning/sources.py) checked against the model's headers, in the order given."""
    adapters = []
    for index, lora in enumerate(source.loras):
        shapes, _ = read_header(lora.path)
        touched = check_lora(lora.source, config.spec.model or "", lora.path, shapes, bases, layers_per_block)
        adapters.append(
            LoraAdapter(
                source=lora.source,
                weight_name=lora.weight_name,
                adapter_name=(config.spec.lora_adapter_name[index] if config.spec.lora_adapter_name else "")
                or f"default_{index}",
                scale=float(config.spec.lora_scale[index]) if config.spec.lora_scale else 1.0,
                path=lora.path,
                commit=lora.commit,
                components=touched,
            )
        )
    return tuple(adapters)


def plan_loras(config: ExportConfig, source: ModelSource, facts: Any, hashes: Any) -> tuple[LoraAdapter, ...]:
    """Every --lora checked against `facts`' weight headers and hashed (once per file, remembered)."""
    if not source.loras:
        return ()
    if facts.is_pixart:
        raise ExportError(
            f"--lora {source.loras[0].source}: neuron-export fuses LoRA into Stable Diffusion and Flux exports, not "
            "PixArt's; export without --lora."
        )
    bases = {
        name: base_layers(facts.weight_files[name])
        for name in ("text_encoder", "text_encoder_2", "unet", "transformer")
        if name in facts.components
    }
    layers_per_block = (facts.unet or {}).get("layers_per_block", 2)  # kohya's sgm names count blocks with it
    layers_per_block = int(layers_per_block[0] if isinstance(layers_per_block, list) else layers_per_block)
    adapters = check_loras(config, source, bases, layers_per_block)
    for adapter in adapters if facts.is_flux else ():
        others = [name for name in adapter.components if name not in FLUX_LORA_COMPONENTS]
        if others:
            raise ExportError(
                f"--lora {adapter.source} has layers for {others[0]}, which diffusers' Flux pipeline does not fuse "
                f"a LoRA into; pass a LoRA for {' and '.join(FLUX_LORA_COMPONENTS)} only."
            )
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
