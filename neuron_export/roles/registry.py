"""Every component role an export can hold, and each role's facts: the one place that knows them all.

A role is one registered `Role`: how it names its components (`controlnet_0`, `controlnet_1`, ... for a numbered
role), the pipeline folder it reads, how to describe it, its compiler flags, build-cost factors, core placement
and runtime adapter. Every other module asks this registry (`role_of(name)`, `roles()`), so adding a role is
one `register(Role(...))` plus its module. No torch here: planning, the runtime and deploy import it;
its module (tracing, torch) is imported only when `Role.module()` is called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuron_export.roles.spec import ComponentSpec, Shapes

ModelFacts = Any  # planning/source.py's ModelFacts: named, not imported (planning imports this module)

# The model architectures (planning/source.py's ModelFacts.architecture) each role can serve.
UNET_ARCHITECTURES = frozenset({"sd", "sdxl", "sdxl-refiner"})
PIXART_ARCHITECTURES = frozenset({"pixart-alpha", "pixart-sigma"})
FLUX_ARCHITECTURES = frozenset({"flux"})  # Kontext ("flux-kontext") is recognised and refused: no roles serve it
ALL_ARCHITECTURES = UNET_ARCHITECTURES | PIXART_ARCHITECTURES | FLUX_ARCHITECTURES

FAST_LOADING = "--enable-fast-loading-neuron-binaries"
TRANSFORMER = ("--model-type=transformer", FAST_LOADING)
UNET_LIKE = (FAST_LOADING, "--model-type=unet-inference")


@dataclass(frozen=True)
class BuildCost:
    """What one component of a role costs to build on one backend (planning/estimate.py has the formula):
    host bytes grow with weight bytes by `weight_factor` and with pixels by `pixel_bytes`, seconds with
    pixels by `seconds_per_pixel` (parameters count the same for every role)."""

    weight_factor: float
    pixel_bytes: int = 0
    seconds_per_pixel: float = 0.0


def _costs(cpu: BuildCost, neuron: BuildCost) -> Mapping[str, BuildCost]:
    return {"cpu": cpu, "neuron": neuron}


# Measured on a 2-core host for the cpu backend; for neuronx-cc taken from public reports (see planning/estimate.py).
CLIP_COSTS = _costs(BuildCost(1.05), BuildCost(6.0))
UNET_COSTS = _costs(BuildCost(1.10), BuildCost(8.0, 2000))
# Largest difference from the eager model a component may show on fresh inputs, by (backend, auto-cast).
# TorchScript on the CPU is the same arithmetic; NeuronCores with bf16/fp16 auto-cast round matmuls, the UNet
# most of all. Every role states its own; today's all share these.
TOLERANCES: Mapping[tuple[str, str], float] = {
    ("cpu", "none"): 1e-4,
    ("cpu", "matmul"): 1e-4,
    ("cpu", "all"): 1e-4,
    ("neuron", "none"): 1e-3,
    ("neuron", "matmul"): 5e-2,
    ("neuron", "all"): 1e-1,
}


@dataclass(frozen=True)
class Role:
    """One kind of component and everything the exporter, runtime and deploy checks need to know about it."""

    name: str  # the component's name, or the prefix of a numbered role's names
    module_path: str  # the module that describes, loads, wraps and checks it (imported only when needed)
    source_folder: str | None  # the pipeline folder its config and weights are in (None: an add-on's own folder)
    slot: str  # the diffusers pipeline argument the runtime passes it as
    adapter: str  # "module:function" building the runtime's stand-in from the loaded parts of this slot
    costs: Mapping[str, BuildCost]  # per backend
    flags: tuple[str, ...]  # neuronx-cc flags for an SD 1.x/2.x pipeline
    xl_flags: tuple[str, ...] | None = None  # for SDXL (None: the same as `flags`)
    numbered: bool = False  # several components: name_0, name_1, ...
    default: bool = False  # exported unless --components says otherwise
    tensor_prefixes: tuple[str, ...] = ()  # its tensors in a weight file shared with another role (none: all)
    feature_map: tuple[int, int] = (0, 1)  # (channels, upscale) of its largest activation, per input pixel
    with_unet: bool = False  # placed on every NeuronCore when only the UNet is data-parallel
    lazy_load: bool = False  # torch_neuronx.lazy_load: its weights stream to the device on first use
    async_load: bool = True  # torch_neuronx.async_load: loads alongside the others
    count: Callable[[ModelFacts], int] = lambda facts: 1  # how many components of this role a pipeline has
    tolerances: Mapping[tuple[str, str], float] = field(default_factory=lambda: TOLERANCES)  # see TOLERANCES
    # the architectures whose pipelines have this role; two roles may share a component name (`text_encoder` is
    # CLIP in a UNet pipeline, T5 in PixArt) when they serve different architectures
    architectures: frozenset[str] = UNET_ARCHITECTURES
    key: str = ""  # its registry name when that is not `name` (a second role with the same component name)
    # neuronx-distributed ModelBuilder roles: weights kept out of the NEFF, in weights/tp{r}_sharded_checkpoint
    sharded: bool = False
    # a sharded role whose modules are made of neuronx-distributed's parallel layers (roles/parallel.py), so it can
    # be split over --tensor-parallel-size ranks on Neuron
    tensor_parallel: bool = False
    # its ModelBuilder trace runs with LOCAL_WORLD_SIZE set to the tensor parallel size (as optimum-neuron's Flux
    # transformer config sets it; its T5 config does not, outside trn2)
    local_world_size: bool = False
    generic_flags: bool = True  # False: `flags` are the whole compiler string (no --auto-cast, --optlevel, --target)

    @property
    def registry_name(self) -> str:
        return self.key or self.name

    def serves(self, architecture: str | None) -> bool:
        """Whether a pipeline of this architecture has this role (None: any, for lookups by name alone)."""
        return architecture is None or architecture in self.architectures

    def matches(self, component: str) -> bool:
        if not self.numbered:
            return component == self.name
        number = component.removeprefix(f"{self.name}_")
        return number != component and number.isdigit()

    def component(self, index: int) -> str:
        """The name of this role's `index`-th component (the role's own name when it is not numbered)."""
        return f"{self.name}_{index}" if self.numbered else self.name

    def index(self, component: str) -> int:
        """controlnet_3 -> 3 (numeric order: controlnet_10 comes after controlnet_9); 0 for an unnumbered role."""
        return int(component.removeprefix(f"{self.name}_")) if self.numbered else 0

    def spelling(self) -> str:
        return f"{self.name}_N" if self.numbered else self.name

    def module(self) -> Any:
        return importlib.import_module(self.module_path)

    def describe(self, component: str, facts: ModelFacts, shapes: Shapes) -> ComponentSpec:
        spec: ComponentSpec = self.module().describe(component, facts, shapes)
        return spec

    def compiler_flags(self, is_xl: bool) -> tuple[str, ...]:
        return self.xl_flags if is_xl and self.xl_flags is not None else self.flags

    def tolerance(self, backend: str, auto_cast: str) -> float:
        """The validation tolerance (atol) of this role's components when --atol is not given."""
        return self.tolerances[(backend, auto_cast)]

    def make_adapter(self) -> Any:
        module, function = self.adapter.split(":")
        return getattr(importlib.import_module(module), function)


_ROLES: dict[str, Role] = {}


def register(role: Role) -> Role:
    """Add a role (after the ones already known); its components are then planned, built and loaded."""
    if role.registry_name in _ROLES:
        raise ValueError(f"a role named {role.registry_name!r} is already registered")
    clash = next(
        (other for other in _ROLES.values() if other.name == role.name and other.architectures & role.architectures),
        None,
    )
    if clash is not None:
        raise ValueError(f"the role {clash.registry_name!r} already names {role.name!r} for the same architectures")
    _ROLES[role.registry_name] = role
    return role


def unregister(name: str) -> None:
    """Remove the role registered under `name` (its registry name)."""
    _ROLES.pop(name, None)


def roles() -> tuple[Role, ...]:
    """Every registered role, in export order."""
    return tuple(_ROLES.values())


def find_role(component: str, architecture: str | None = None) -> Role | None:
    """The role of a component in a pipeline of `architecture` (None: the first registered of that name, for
    facts every role of the name shares, such as its folder)."""
    return next((role for role in _ROLES.values() if role.matches(component) and role.serves(architecture)), None)


def role_of(component: str, architecture: str | None = None) -> Role:
    role = find_role(component, architecture)
    if role is None:
        raise KeyError(f"{component!r} is not a component of any registered role")
    return role


def roles_for(architecture: str | None) -> tuple[Role, ...]:
    """The roles a pipeline of this architecture has, in export order (None: every role)."""
    return tuple(role for role in _ROLES.values() if role.serves(architecture))


def default_components() -> tuple[str, ...]:
    """What an export builds unless --components says otherwise (each exists only where the model has it)."""
    return tuple(dict.fromkeys(role.name for role in _ROLES.values() if role.default))


def component_spellings() -> str:
    """Every component name a user may give, for help and error messages."""
    return ", ".join(dict.fromkeys(role.spelling() for role in _ROLES.values()))


ADAPTERS = "neuron_export.runtime.adapters"
# an SDXL refiner has only the second text encoder
register(
    Role(
        name="text_encoder",
        module_path="neuron_export.roles.text_encoder",
        source_folder="text_encoder",
        slot="text_encoder",
        adapter=f"{ADAPTERS}:text_encoder_slot",
        costs=CLIP_COSTS,
        flags=TRANSFORMER,
        default=True,
        count=lambda facts: int(facts.text_encoder is not None),
        architectures=UNET_ARCHITECTURES | FLUX_ARCHITECTURES,  # Flux's pooled CLIP encoder is a plain trace
    )
)
register(
    Role(
        name="text_encoder_2",
        module_path="neuron_export.roles.text_encoder",
        source_folder="text_encoder_2",
        slot="text_encoder_2",
        adapter=f"{ADAPTERS}:text_encoder_slot",
        costs=CLIP_COSTS,
        flags=TRANSFORMER,
        default=True,
        count=lambda facts: int(facts.text_encoder_2 is not None),
    )
)
# The SDXL UNet compiles without fast loading, as optimum-neuron does.
register(
    Role(
        name="unet",
        module_path="neuron_export.roles.unet",
        source_folder="unet",
        slot="unet",
        adapter=f"{ADAPTERS}:unet_slot",
        costs=UNET_COSTS,
        flags=UNET_LIKE,
        xl_flags=("--model-type=unet-inference",),
        default=True,
        feature_map=(320, 1),
        with_unet=True,
        lazy_load=True,
    )
)
register(
    Role(
        name="vae_encoder",
        module_path="neuron_export.roles.vae",
        source_folder="vae",
        slot="vae",
        adapter=f"{ADAPTERS}:vae_slot",
        costs=_costs(BuildCost(1.10, 3200, 1.2e-4), BuildCost(8.0, 16000, 3.5e-4)),
        flags=UNET_LIKE,
        default=True,
        tensor_prefixes=("encoder.", "quant_conv."),
        feature_map=(128, 1),
        architectures=ALL_ARCHITECTURES,
    )
)
register(
    Role(
        name="vae_decoder",
        module_path="neuron_export.roles.vae",
        source_folder="vae",
        slot="vae",
        adapter=f"{ADAPTERS}:vae_slot",
        costs=_costs(BuildCost(1.10, 3600, 1.3e-4), BuildCost(8.0, 24000, 6.6e-4)),
        flags=UNET_LIKE,
        default=True,
        tensor_prefixes=("decoder.", "post_quant_conv."),
        feature_map=(128, 8),
        architectures=ALL_ARCHITECTURES,
    )
)
# A ControlNet is a UNet's encoder half: its costs and activations are the UNet's, it goes where the UNet goes
# (it takes the UNet's doubled batch) and compiles like the SD UNet, with fast loading even for SDXL; one per
# --controlnet.
CONTROLNET = register(
    Role(
        name="controlnet",
        module_path="neuron_export.roles.controlnet",
        source_folder=None,
        slot="controlnet",
        adapter=f"{ADAPTERS}:controlnet_slot",
        costs=UNET_COSTS,
        flags=UNET_LIKE,
        numbered=True,
        feature_map=(320, 1),
        with_unet=True,
        lazy_load=True,
        count=lambda facts: len(facts.controlnets),
    )
)
# With an IP-Adapter; optimum-neuron leaves the image encoder's loading as it is, and compiles it as a plain
# transformer.
register(
    Role(
        name="image_encoder",
        module_path="neuron_export.roles.image_encoder",
        source_folder=None,
        slot="image_encoder",
        adapter=f"{ADAPTERS}:image_encoder_slot",
        costs=CLIP_COSTS,
        flags=("--model-type=transformer",),
        async_load=False,
        count=lambda facts: int(facts.image_encoder is not None),
    )
)
# PixArt-α / -Σ (and Flux's text_encoder_2): T5 encoders are traced through neuronx-distributed's ModelBuilder
# with their weights kept beside the NEFF, and compiled with optimum-neuron's fixed T5 flags, whatever --auto-cast
# and --optlevel say.
T5_FLAGS = (
    "--model-type=transformer",
    "-O1",
    "--tensorizer-options='--enable-ccop-compute-overlap --cc-pipeline-tiling-factor=4'",
    "--auto-cast=none",
    "--internal-hlo2tensorizer-options='--verify-hlo=true'",
)
T5_COSTS = _costs(BuildCost(1.10), BuildCost(6.0))
# The diffusion transformer: a UNet's activations per pixel at its patch size, and its costs.
DIT_COSTS = _costs(BuildCost(1.10, 1200), BuildCost(8.0, 6000))
T5_ENCODER = register(
    Role(
        name="text_encoder",
        key="t5_text_encoder",
        module_path="neuron_export.roles.t5",
        source_folder="text_encoder",
        slot="text_encoder",
        adapter=f"{ADAPTERS}:t5_encoder_slot",
        costs=T5_COSTS,
        flags=T5_FLAGS,
        default=True,
        architectures=PIXART_ARCHITECTURES,
        sharded=True,
        tensor_parallel=True,
        generic_flags=False,
        count=lambda facts: int(facts.text_encoder is not None),
    )
)
register(
    Role(
        name="transformer",
        module_path="neuron_export.roles.pixart",
        source_folder="transformer",
        slot="transformer",
        adapter=f"{ADAPTERS}:transformer_slot",
        costs=DIT_COSTS,
        flags=TRANSFORMER,  # optimum adds --model-type transformer, and fast loading for a "transformer" class
        default=True,
        feature_map=(96, 1),
        with_unet=True,
        lazy_load=True,
        architectures=PIXART_ARCHITECTURES,
    )
)
# Flux: its T5 is `text_encoder_2` and its transformer is tensor parallel; both ModelBuilder roles, sharded over
# --tensor-parallel-size ranks (weights/tp{r}_sharded_checkpoint.safetensors for every rank).
FLUX_T5_ENCODER = register(
    Role(
        name="text_encoder_2",
        key="flux_t5_text_encoder_2",
        module_path="neuron_export.roles.t5",
        source_folder="text_encoder_2",
        slot="text_encoder_2",
        adapter=f"{ADAPTERS}:t5_encoder_slot",
        costs=T5_COSTS,
        flags=T5_FLAGS,
        default=True,
        architectures=FLUX_ARCHITECTURES,
        sharded=True,
        tensor_parallel=True,
        generic_flags=False,
        count=lambda facts: int(facts.text_encoder_2 is not None),
    )
)
FLUX_TRANSFORMER = register(
    Role(
        name="transformer",
        key="flux_transformer",
        module_path="neuron_export.roles.flux",
        source_folder="transformer",
        slot="transformer",
        adapter=f"{ADAPTERS}:flux_transformer_slot",
        costs=DIT_COSTS,
        # optimum-neuron compiles it as an NxD component: the T5's fixed string (FluxTransformerNeuronConfig
        # get_compiler_args without context parallelism, off trn2), whatever --auto-cast and --optlevel say
        flags=T5_FLAGS,
        generic_flags=False,
        default=True,
        feature_map=(96, 1),
        with_unet=True,
        lazy_load=True,
        architectures=FLUX_ARCHITECTURES,
        sharded=True,
        tensor_parallel=True,
        local_world_size=True,
    )
)
