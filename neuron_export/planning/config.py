"""Every user-facing option as validated pydantic values, what is built (ExportSpec) apart from how (BuildOptions);
all input checks live here.

Precedence: field defaults < YAML file < `--set key=value` < command-line flags. Nothing heavy is
imported, so a bad option fails in milliseconds, before any model file is opened.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from neuron_export.errors import ExportError
from neuron_export.planning.add_on_options import conditioning_checks
from neuron_export.planning.config_messages import explain_validation_error, unknown_key
from neuron_export.roles.registry import component_spellings, find_role
from neuron_export.store.remote_trust import SIGNING_KEY_ENV, resolve_trust, trust_of

Family = Literal["sd", "sd-xl", "lcm", "pixart", "flux"]
Task = Literal["text-to-image", "image-to-image", "inpainting", "instruct-pix2pix"]
AutoCast = Literal["none", "matmul", "all"]
AutoCastType = Literal["bf16", "fp16", "tf32"]
TorchDtype = Literal["float32", "bfloat16", "float16"]
Target = Literal["inf2", "trn1", "trn2"]
Backend = Literal["auto", "neuron", "cpu"]
ComponentName = str  # a registered role's component (roles/registry.py): checked in _known_components

FAMILIES: tuple[str, ...] = ("sd", "sd-xl", "lcm", "pixart", "flux")
TEXT_FAMILIES = ("pixart", "flux")  # the families whose text encoder takes --sequence-length (T5)

# The checkpoint each command exports when --model is not given.
CANONICAL_MODELS = {
    "sd": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd-xl": "stabilityai/stable-diffusion-xl-base-1.0",
    "lcm": "SimianLuo/LCM_Dreamshaper_v7",
    "pixart": "PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
    "flux": "black-forest-labs/FLUX.1-dev",
}

MIN_SIDE, MAX_SIDE = 64, 4096
# LoRA scales people use run from about -2 (negative "slider" LoRAs) to 2; beyond 10 the fused weights are noise.
MAX_LORA_SCALE = 10.0
REMOTE_ENV = "NEURON_EXPORT_REMOTE_CACHE"
RAY_ADDRESS_ENV = "RAY_ADDRESS"
RAY_INSTALL = "pip install 'neuron-export[ray]'"


class ExportSpec(BaseModel):
    """What one export builds: the manifest records it whole, cache keys and the up-to-date check read it.
    Defaults that follow from other options (the canonical model, bf16 auto-casting, the IP-Adapter scale,
    pix2pix's dynamic batch) are filled in before the fields are checked; the value is never changed after."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Family
    task: Task = "text-to-image"
    model: str | None = None  # the family's canonical checkpoint unless given
    revision: str | None = None
    unet: str | None = None
    # --- replacement VAE and LoRA adapters (fused before tracing) ---
    vae: str | None = None
    lora: tuple[str, ...] = ()
    lora_weight_name: tuple[str, ...] = ()
    lora_adapter_name: tuple[str, ...] = ()
    lora_scale: tuple[float, ...] = ()
    batch_size: int = 1
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    sequence_length: int | None = Field(default=None, ge=1, le=4096)  # T5 tokens (PixArt); None: the tokenizer's
    # ranks the neuronx-distributed components (Flux's T5 and transformer) are sharded over; optimum-cli's default
    tensor_parallel_size: int = Field(default=1, ge=1, le=128)
    torch_dtype: TorchDtype = "float32"  # the dtype the models are loaded and traced in (optimum-cli's --torch_dtype)
    auto_cast: AutoCast = "matmul"
    auto_cast_type: AutoCastType | None = None  # bf16 unless given, when auto-casting
    optlevel: Literal[1, 2, 3] = 2
    inline_weights: bool = True
    dynamic_batch_size: bool = False
    target: Target = "inf2"
    backend: Backend = "auto"
    disable_validation: bool = False
    atol: float | None = Field(default=None, gt=0)
    components: tuple[ComponentName, ...] | None = None
    # --- ControlNet and IP-Adapter (checked in conditioning_checks; built by roles/controlnet.py and
    # roles/image_encoder.py) ---
    controlnet: tuple[str, ...] = ()  # hub ids or directories, in the order their control images are given
    ip_adapter: str | None = None
    ip_adapter_subfolder: str | None = None
    ip_adapter_weight_name: str | None = None
    ip_adapter_scale: float | None = None  # 1.0 when an IP-Adapter is given

    @model_validator(mode="before")
    @classmethod
    def _derived(cls, values: Any) -> Any:
        return derived_spec_values(values) if isinstance(values, dict) else values

    @field_validator("controlnet", mode="before")
    @classmethod
    def _one_or_more(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("components")
    @classmethod
    def _known_components(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for name in value or ():
            if find_role(name) is None:
                raise ValueError(f"names {name!r}, which is not a component; use {component_spellings()}")
        return value

    @model_validator(mode="after")
    def _conditioning(self) -> ExportSpec:
        conditioning_checks(self)
        return self

    @field_validator("height", "width")
    @classmethod
    def _side(cls, value: int | None) -> int | None:
        if value is None:
            return value
        if value < MIN_SIDE or value > MAX_SIDE:
            raise ValueError(f"must be between {MIN_SIDE} and {MAX_SIDE} pixels")
        if value % 8:
            nearest = max(MIN_SIDE, round(value / 8) * 8)
            raise ValueError(f"must be a multiple of 8; use {nearest}")
        return value

    @field_validator("batch_size", "num_images_per_prompt")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be 1 or more")
        return value

    @field_validator("components")
    @classmethod
    def _no_repeats(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("names a component twice; list each once")
        if value is not None and not value:
            raise ValueError("is empty; name at least one component or leave it out")
        return value

    @field_validator("lora", "lora_weight_name", "lora_adapter_name", "lora_scale", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        value = (value,) if isinstance(value, (str, int, float)) else value
        return tuple("" if item is None else item for item in value) if isinstance(value, (list, tuple)) else value

    @field_validator("lora_scale")
    @classmethod
    def _scale_range(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        for scale in value:
            if not math.isfinite(scale) or abs(scale) > MAX_LORA_SCALE:
                raise ValueError(
                    f"{scale} is out of range; each scale must be finite, from -{MAX_LORA_SCALE:g} to "
                    f"{MAX_LORA_SCALE:g} (1.0 applies the LoRA as trained)"
                )
        return value

    @model_validator(mode="after")
    def _lora_lists(self) -> ExportSpec:
        check_lora_lists(self)
        return self

    @model_validator(mode="after")
    def _sequence_length_family(self) -> ExportSpec:
        if self.sequence_length is not None and self.family not in TEXT_FAMILIES:
            raise ValueError(
                f"sequence_length = {self.sequence_length} is for `neuron-export pixart` and `flux` (T5 encoders); CLIP text "
                f"encoders of `{self.family}` always take 77 tokens, so drop it"
            )
        return self

    @model_validator(mode="after")
    def _tensor_parallel_family(self) -> ExportSpec:
        if self.tensor_parallel_size != 1 and self.family != "flux":
            raise ValueError(
                f"tensor_parallel_size = {self.tensor_parallel_size} is for `neuron-export flux`; `{self.family}` "
                "components run on one NeuronCore each, so drop it"
            )
        return self

    @model_validator(mode="after")
    def _torch_dtype_family(self) -> ExportSpec:
        if self.torch_dtype != "float32" and self.family not in TEXT_FAMILIES:
            raise ValueError(
                f"torch_dtype = '{self.torch_dtype}' is for `neuron-export pixart` and `flux`; `{self.family}` exports trace in "
                "float32 and cast with --auto-cast, so drop it"
            )
        return self

    @model_validator(mode="after")
    def _auto_cast_pair(self) -> ExportSpec:
        if self.auto_cast == "none" and self.auto_cast_type is not None:
            raise ValueError(
                f"auto_cast_type = '{self.auto_cast_type}' has no effect with auto_cast = 'none'; "
                "drop --auto-cast-type or pass --auto-cast matmul"
            )
        return self


def derived_spec_values(given: dict[str, Any]) -> dict[str, Any]:
    """The spec's options with the defaults that depend on other options filled in (a new dict)."""
    values = dict(given)
    if values.get("model") is None and values.get("family") in CANONICAL_MODELS:
        values["model"] = CANONICAL_MODELS[values["family"]]
    if values.get("auto_cast_type") is None and values.get("auto_cast", "matmul") != "none":
        values["auto_cast_type"] = "bf16"
    if values.get("ip_adapter") is not None and values.get("ip_adapter_scale") is None:
        values["ip_adapter_scale"] = 1.0
    if values.get("task") == "instruct-pix2pix" and values.get("family") == "sd":
        # Its only valid value: with guidance the UNet runs three times the prompt batch, split over two NeuronCores.
        values["dynamic_batch_size"] = True
    return values


class BuildOptions(BaseModel):
    """How one export is built: where it goes, the caches, the remote cache and whom it trusts, the executor,
    the budget. Never recorded, in no cache key. Values taken from the environment ($NEURON_EXPORT_REMOTE_CACHE,
    $RAY_ADDRESS, the trust keys) are read and checked before the fields are; the value is never changed after."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: Path | None = None
    force: bool = False
    token: str | None = Field(default=None, repr=False)
    hub_cache_dir: Path | None = None
    offline: bool = False
    jobs: int = 1
    max_memory: int | None = None  # bytes; None = what the host has available
    cache_dir: Path | None = None
    output_root: Path | None = None  # a shape matrix writes one export per combination below this
    remote_cache: str | None = None  # an fsspec URL shared by hosts; default $NEURON_EXPORT_REMOTE_CACHE
    remote_cache_required: bool = False  # fail instead of building locally when the remote cannot be used
    # Who is trusted (store/remote_trust.py): uploads signed with this key, entries used when one of these signed them.
    remote_cache_signing_key: Path | None = None
    remote_cache_trusted_keys: tuple[str, ...] = ()
    remote_cache_allow_unsigned: bool = False  # a private bucket: unsigned entries are used, uploads may go unsigned
    executor: Literal["local", "ray"] = "local"  # where missing components build: here, or as tasks on a Ray cluster
    ray_address: str | None = None  # the cluster for executor ray; default $RAY_ADDRESS

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, values: Any) -> Any:
        return resolved_options(values) if isinstance(values, dict) else values

    @field_validator("max_memory", mode="before")
    @classmethod
    def _memory_size(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("jobs")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be 1 or more")
        return value

    @model_validator(mode="after")
    def _remote_and_executor(self) -> BuildOptions:
        if not self.remote_cache and self.remote_cache_required:
            raise ValueError(
                f"remote_cache_required is set but no remote cache is given; pass --remote-cache URL "
                f"(or set {REMOTE_ENV}), or drop --remote-cache-required"
            )
        if self.executor == "ray":
            check_ray_executor(self)
        return self


def resolved_options(given: dict[str, Any]) -> dict[str, Any]:
    """The build options with what the environment supplies filled in and checked (a new dict): the remote
    cache URL, the Ray address, the signing and trusted keys."""
    values = dict(given)
    remote, where = values.get("remote_cache"), "remote_cache"
    if not remote and os.environ.get(REMOTE_ENV):
        remote, where = os.environ[REMOTE_ENV], REMOTE_ENV
        values["remote_cache"] = remote
    if remote:
        check_remote_url(remote, where)
    if not values.get("ray_address") and os.environ.get(RAY_ADDRESS_ENV):
        values["ray_address"] = os.environ[RAY_ADDRESS_ENV]
    trusted = values.get("remote_cache_trusted_keys") or ()
    trust = resolve_trust(
        values.get("remote_cache_signing_key"),
        (trusted,) if isinstance(trusted, str) else tuple(trusted),
        bool(values.get("remote_cache_allow_unsigned")),
    )
    values["remote_cache_signing_key"], values["remote_cache_trusted_keys"] = trust.signing_key, trust.trusted
    return values


# Every option a YAML file, --set or a flag may name: what is built, then how.
OPTION_KEYS: tuple[str, ...] = (*ExportSpec.model_fields, *BuildOptions.model_fields)


@dataclass(frozen=True)
class ExportConfig:
    """One export as planning passes it around: what is built (`spec`) and how (`options`), each validated once.
    Read through its halves: config.spec.batch_size, config.options.jobs."""

    spec: ExportSpec
    options: BuildOptions


def check_ray_executor(config: BuildOptions) -> None:
    """--executor ray: Ray installed (looked up, not imported: that takes seconds), a cluster, a remote cache."""
    import importlib.util

    try:
        installed = importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        raise ValueError(
            f"executor 'ray' needs Ray, which is not installed; run {RAY_INSTALL}, or use --executor local"
        )
    if not config.ray_address:
        raise ValueError(
            f"executor 'ray' needs a cluster; pass --ray-address HOST:PORT (or 'auto' for the one "
            f"started on this host), or set {RAY_ADDRESS_ENV}"
        )
    if not config.remote_cache:
        raise ValueError(
            "executor 'ray' needs --remote-cache URL (or "
            f"{REMOTE_ENV}): cluster nodes hand their builds back through it"
        )
    if not trust_of(config).can_upload:
        raise ValueError(
            "executor 'ray' needs --remote-cache-signing-key FILE (cluster nodes sign what they upload; "
            f"set {SIGNING_KEY_ENV} on every node, or the same path), or --remote-cache-allow-unsigned "
            "for a private bucket"
        )


def check_lora_lists(config: ExportSpec) -> None:
    """--lora-weight-name, --lora-adapter-name and --lora-scale each come once per --lora (or not at all)."""
    count = len(config.lora)
    for flag, values in (
        ("--lora-weight-name", config.lora_weight_name),
        ("--lora-adapter-name", config.lora_adapter_name),
        ("--lora-scale", config.lora_scale),
    ):
        if values and len(values) != count:
            raise ValueError(
                f"{flag} is given {len(values)} time(s) for {count} --lora; give it after the --lora it "
                "belongs to (at most once each), or once per --lora in the same order, or leave it out"
            )
    names = tuple(name for name in config.lora_adapter_name if name)  # '': that adapter's default name
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--lora-adapter-name {repeated[0]} is given twice; name each adapter differently")
    if any(not name.strip() or not name.replace("_", "").replace("-", "").isalnum() for name in names):
        bad = next(name for name in names if not name.strip() or not name.replace("_", "").replace("-", "").isalnum())
        raise ValueError(f"--lora-adapter-name {bad!r} is not a valid adapter name; use letters, digits, - and _")


def check_remote_url(url: str, where: str) -> None:
    """A remote cache URL fsspec can open: a known scheme whose filesystem package is installed (no network)."""
    import fsspec

    protocol = fsspec.core.split_protocol(url)[0]
    if protocol is None:
        raise ValueError(
            f"{where} {url!r} has no scheme; write it as s3://bucket/prefix, file:///shared/path "
            "or hf://datasets/org/name"
        )
    if protocol not in fsspec.available_protocols():
        raise ValueError(
            f"{where} {url!r} has an unknown scheme {protocol!r}; use s3://bucket/prefix, "
            "file:///shared/path or hf://datasets/org/name"
        )
    try:
        fsspec.get_filesystem_class(protocol)
    except ImportError:
        extra = (
            "pip install 'neuron-export[s3]'"
            if protocol in ("s3", "s3a")
            else f"install fsspec's {protocol} filesystem"
        )
        raise ValueError(f"{where} {url!r} needs the {protocol} filesystem, which is not installed; {extra}") from None


SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 10**3,
    "kib": 2**10,
    "m": 2**20,
    "mb": 10**6,
    "mib": 2**20,
    "g": 2**30,
    "gb": 10**9,
    "gib": 2**30,
    "t": 2**40,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'24GiB', '16G', '3.5 GB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in SIZE_UNITS:
        raise ValueError("write a memory size like 16GiB or 24G")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def unknown_key_message(key: str, where: str) -> str:
    return unknown_key(key, where, list(OPTION_KEYS))


def _normalize_keys(values: dict[str, Any], where: str) -> dict[str, Any]:
    normalized: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in OPTION_KEYS:
            raise ExportError(unknown_key_message(str(key), where))
        normalized[name] = value
    return normalized


def read_config_file(path: Path) -> dict[str, Any]:
    """A YAML file of ExportConfig keys (kebab-case or snake_case), checked for unknown keys."""
    import yaml

    if not path.is_file():
        raise ExportError(
            f"Config file {path} does not exist; pass a path to a YAML file such as configs/sd15-512.yaml."
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, RecursionError):
        raise ExportError(
            f"Config file {path} cannot be read as text; pass a YAML file such as configs/sd15-512.yaml."
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ExportError(f"Config file {path} is not valid YAML{where}; fix its syntax.") from None
    if not isinstance(data, dict):
        raise ExportError(f"Config file {path} must hold a mapping of option: value, not {type(data).__name__}.")
    return _normalize_keys(data, str(path))


def parse_set_options(pairs: list[str]) -> dict[str, Any]:
    """`--set key=value` pairs; values are read as YAML scalars so numbers and booleans keep their type."""
    if not pairs:  # yaml is imported only when there is something to read (a rerun answers without it)
        return {}
    import yaml

    result: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ExportError(f"--set {pair!r} is not key=value; write it like --set height=768.")
        try:
            result[key.strip()] = yaml.safe_load(raw) if raw else None
        except (yaml.YAMLError, RecursionError):
            raise ExportError(
                f"--set {pair!r}: the value is not valid YAML; quote it, e.g. --set {key.strip()}='...'."
            ) from None
    return _normalize_keys(result, "--set")


MATRIX_KEYS = ("height", "width", "batch_size")
MAX_MATRIX = 64  # exports one shape matrix may make: each is a full export on disk


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str) and "," in value:
        parts = [part.strip() for part in value.split(",") if part.strip()]
        return [int(part) if part.isdigit() else part for part in parts]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _merge(layers: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({key: value for key, value in layer.items() if value is not None})
    if isinstance(merged.get("components"), str):
        merged["components"] = [name.strip() for name in merged["components"].split(",") if name.strip()]
    if "family" not in merged:
        raise ExportError(f"No model family given; set family to one of {', '.join(FAMILIES)} in the config file.")
    return merged


def _validate(values: dict[str, Any], origins: dict[str, str] | None = None) -> ExportConfig:
    what = {key: value for key, value in values.items() if key in ExportSpec.model_fields}
    how = {key: value for key, value in values.items() if key not in ExportSpec.model_fields}  # unknown keys: refused
    try:
        return ExportConfig(ExportSpec(**what), BuildOptions(**how))
    except ValidationError as exc:
        raise ExportError(explain_validation_error(exc, list(OPTION_KEYS), origins)) from None


def make_configs(*layers: dict[str, Any], labels: tuple[str | None, ...] = ()) -> list[ExportConfig]:
    """Merge option layers (later wins; None means 'not given'); comma lists or YAML lists of height,
    width and batch_size make a shape matrix: one config per combination, all validated up front.
    `labels` name each layer for messages: "flags", "--set" or a YAML file's path."""
    merged = _merge(layers)
    origins = {
        key: label
        for layer, label in zip(layers, labels)
        if label is not None
        for key, value in layer.items()
        if value is not None
    }
    axes = {key: _as_list(merged[key]) for key in MATRIX_KEYS if key in merged}
    count = math.prod(len(values) for values in axes.values())
    if count > MAX_MATRIX:
        sizes = " x ".join(f"{len(values)} {key}" for key, values in axes.items())
        raise ExportError(
            f"{sizes} make {count} exports, more than the {MAX_MATRIX} one command may start; split the "
            "shape matrix over several commands."
        )
    combinations = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] or [{}]
    if len(combinations) == 1:
        return [_validate({**merged, **combinations[0]}, origins)]
    root = merged.pop("output", None) or merged.get("output_root")
    return [_validate({**merged, **combination, "output_root": root}, origins) for combination in combinations]


def make_config(*layers: dict[str, Any]) -> ExportConfig:
    """One config; a shape matrix is refused here (callers that accept one use make_configs)."""
    configs = make_configs(*layers)
    if len(configs) > 1:
        raise ExportError("This command takes one shape; pass single values for height, width and batch_size.")
    return configs[0]
