"""verify's fit check: device memory per NeuronCore and host RAM to load, estimated from the manifest by
`estimate` (a pure function), against the instance table in instances.py (exit 5); above 85% of a resource
it passes as "fits, tight", naming the estimate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from neuron_export.deploy.checks import CheckResult
from neuron_export.deploy.instances import GIB, INSTANCES, Instance, by_size
from neuron_export.roles.registry import Role, find_role

if TYPE_CHECKING:
    from neuron_export.manifest import Manifest


# Calibrated against published deployments (the table in tests/test_verify.py): AWS's inf2 benchmarks run
# SD 1.5, SD 2.1, SD 2 inpainting and SDXL base 1024 on inf2.xlarge and SDXL base + refiner on inf2.8xlarge.

FP32_BYTES = 4
HALF_BYTES = 2  # bf16 / fp16
# Host: Python + torch + torch-neuronx + diffusers/transformers imports, the Neuron runtime's host side,
# and the OS's share of a small instance. An allowance, not a measurement.
HOST_BASE_BYTES = 3 * GIB
# Device, per NeuronCore in use: runtime, instruction and I/O buffers.
CORE_RESERVE_BYTES = GIB // 2
# Device, per loaded model: scratch for activations, at least this much ...
ACTIVATION_FLOOR_BYTES = GIB // 4
# ... or this many live copies of the model's widest full-resolution feature map (fp32).
LIVE_FEATURE_MAPS = 4
# Each role's widest feature map (Role.feature_map) and whether it goes with the UNet (Role.with_unet) are in roles/registry.py.
NO_ROLE = Role("", "", None, "", "", {}, ())  # a component no registered role knows: no feature map, core 0 only
# Above this share of a resource a fit is reported as tight: the evidence for SDXL on inf2.xlarge is mixed.
TIGHT_SHARE = 0.85
HOST_RAM = "host RAM"
DEVICE_MEMORY = "device memory"

ASSUMPTIONS = (
    "host RAM: each component is deserialised once and kept on the host (a TorchScript module keeps its NEFF), at "
    "max(artifact bytes, 4 bytes x parameters) as the traced modules are fp32 (2 bytes for a --torch-dtype bfloat16 "
    "or float16 export); a component on both NeuronCores is not "
    "held twice (torch_neuronx.DataParallel loads consecutive cores from one module, without a copy); plus 3 GiB for "
    "Python, torch, torch-neuronx, diffusers/transformers, the runtime and the OS",
    "loading: lazy_load and async_load (the manifest's after_trace) change when and on which thread a component is "
    "loaded onto the device, not what the host keeps, so they do not change the estimate",
    "device weights: 2 bytes per parameter when auto-cast is matmul/all with bf16/fp16 (the compiler casts matmul and "
    "convolution weights, which are >99% of these models' parameters), else 4 (fp32); never more than the export's "
    "--torch-dtype holds, and exactly that for a component compiled with its own fixed flags (the T5 encoder's "
    "--auto-cast=none)",
    "device activations: per model, max(0.25 GiB, 4 x batch x widest channels x full-resolution H x W x 4 bytes) (UNet "
    "320 channels at the latent size, VAE 128 at the image size); a NeuronCore needs only its largest model's, since "
    "the runtime shares one scratchpad between the models loaded on a core; plus 0.5 GiB runtime reserve per core",
    "tensor parallelism: a sharded component (Flux's T5 and transformer at --tensor-parallel-size N) holds 1/N of "
    "its device weights on each of NeuronCores 0..N-1, and the whole model once on the host",
    "placement: data-parallel mode 'unet' puts a UNet replica on NeuronCores 0 and 1 and every other component on core 0; "
    "'all' puts every component on both cores; each core gets an equal share of its chip's HBM; pipelines loaded "
    "together are placed the same way, each on the same cores",
    f"tight: an estimate above {TIGHT_SHARE:.0%} of a resource is reported as 'fits, tight' (exit 0): published "
    "deployments run SDXL base 1024 on inf2.xlarge while users report host out-of-memory there",
)
# The assumption a tight verdict rests on, per resource, in a few words for the summary line.
TIGHT_ASSUMPTION = {
    HOST_RAM: "assuming one fp32 host copy of each component, none per extra NeuronCore, plus 3 GiB for the process",
    DEVICE_MEMORY: "assuming 2 bytes per parameter with bf16/fp16 auto-cast and one shared activation scratchpad per core",
}


@dataclass(frozen=True)
class ComponentFootprint:
    """What the estimate needs to know about one component."""

    name: str
    parameter_count: int
    artifact_bytes: int
    input_shapes: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class ComponentNeed:
    name: str
    cores: tuple[int, ...]  # the NeuronCores it is loaded on
    host_bytes: int  # held once on the host, however many cores it runs on
    device_weight_bytes: int  # on each of its cores
    activation_bytes: int  # scratch it needs while it runs

    @property
    def copies(self) -> int:
        return len(self.cores)

    @property
    def device_bytes(self) -> int:
        return self.device_weight_bytes + self.activation_bytes


@dataclass(frozen=True)
class Footprint:
    data_parallel_mode: str
    components: tuple[ComponentNeed, ...]
    core_bytes: tuple[int, ...]  # device memory needed on NeuronCore 0, 1, ...
    host_bytes: int

    @property
    def cores_needed(self) -> int:
        return len(self.core_bytes)


def device_bytes_per_parameter(auto_cast: str | None, auto_cast_type: str | None) -> int:
    return 2 if auto_cast in ("matmul", "all") and auto_cast_type in ("bf16", "fp16") else FP32_BYTES


def activation_bytes(name: str, input_shapes: Iterable[tuple[int, ...]]) -> int:
    channels, scale = (find_role(name) or NO_ROLE).feature_map
    largest = 0
    for shape in input_shapes:
        if len(shape) == 4:
            batch, _, height, width = shape
            largest = max(largest, batch * channels * height * scale * width * scale * FP32_BYTES)
    return max(ACTIVATION_FLOOR_BYTES, LIVE_FEATURE_MAPS * largest)


def _totals(mode: str, needs: tuple[ComponentNeed, ...]) -> Footprint:
    cores = max((core + 1 for n in needs for core in n.cores), default=1)
    core_bytes = []
    for core in range(cores):
        here = [n for n in needs if core in n.cores]
        weights = sum(n.device_weight_bytes for n in here)
        scratch = max((n.activation_bytes for n in here), default=0)
        core_bytes.append(CORE_RESERVE_BYTES + weights + scratch)
    host = HOST_BASE_BYTES + sum(n.host_bytes for n in needs)
    return Footprint(mode, needs, tuple(core_bytes), host)


def estimate(
    components: Iterable[ComponentFootprint],
    data_parallel_mode: str,
    auto_cast: str | None = "matmul",
    auto_cast_type: str | None = "bf16",
    label: str = "",
    torch_dtype: str = "float32",
    architecture: str | None = None,
    tensor_parallel_size: int = 1,
) -> Footprint:
    """Device memory per NeuronCore and host RAM to load the pipeline; see ASSUMPTIONS."""
    held = HALF_BYTES if torch_dtype in ("bfloat16", "float16") else FP32_BYTES  # bytes per parameter, as traced
    cast = min(held, device_bytes_per_parameter(auto_cast, auto_cast_type))
    cores = 1 if data_parallel_mode == "none" else 2
    needs = []
    for c in components:
        role = find_role(c.name, architecture) or NO_ROLE
        per_param = cast if role.generic_flags else held
        # "unet": the UNet and what goes with it on every core; "none": one core; "all" (and unknown): every core
        on_all = data_parallel_mode not in ("unet", "transformer", "none") or (
            data_parallel_mode in ("unet", "transformer") and role.with_unet
        )
        if role.sharded and tensor_parallel_size > 1:  # a slice of its weights on each of the tp cores
            needs.append(
                ComponentNeed(
                    name=f"{label}{c.name}",
                    cores=tuple(range(tensor_parallel_size)),
                    host_bytes=c.parameter_count * held,  # every rank's slice is read: the whole model, once
                    device_weight_bytes=c.parameter_count * per_param // tensor_parallel_size,
                    activation_bytes=activation_bytes(c.name, c.input_shapes),
                )
            )
            continue
        needs.append(
            ComponentNeed(
                name=f"{label}{c.name}",
                cores=tuple(range(cores)) if on_all else (0,),
                host_bytes=max(c.artifact_bytes, c.parameter_count * held),
                device_weight_bytes=c.parameter_count * per_param,
                activation_bytes=activation_bytes(c.name, c.input_shapes),
            )
        )
    return _totals(data_parallel_mode, tuple(needs))


def together(*footprints: Footprint) -> Footprint:
    """Several pipelines loaded in one process (SDXL base + refiner): one host base, one scratchpad per core."""
    needs = tuple(n for f in footprints for n in f.components)
    return _totals("+".join(f.data_parallel_mode for f in footprints), needs)


@dataclass(frozen=True)
class FitVerdict:
    instance: Instance
    fits: bool
    reasons: tuple[str, ...]  # why not, one sentence each
    tight: tuple[tuple[str, int, int], ...] = ()  # (resource, bytes needed, bytes available) above TIGHT_SHARE

    @property
    def roomy(self) -> bool:
        return self.fits and not self.tight


def fits(footprint: Footprint, instance: Instance) -> FitVerdict:
    reasons = []
    tight = []
    if instance.neuron_cores < footprint.cores_needed:
        reasons.append(
            f"NeuronCores: the placement needs {footprint.cores_needed}, {instance.name} has {instance.neuron_cores}"
        )
    if footprint.host_bytes > instance.host_memory_bytes:
        reasons.append(
            f"host RAM: loading needs about {footprint.host_bytes / GIB:.1f} GiB, "
            f"{instance.name} has {instance.host_memory_gib} GiB"
        )
    elif footprint.host_bytes > TIGHT_SHARE * instance.host_memory_bytes:
        tight.append((HOST_RAM, footprint.host_bytes, instance.host_memory_bytes))
    per_core = instance.device_memory_per_core_bytes
    for core, need in enumerate(footprint.core_bytes):
        if need > per_core:
            reasons.append(
                f"device memory: NeuronCore {core} needs about {need / GIB:.1f} GiB, "
                f"{instance.name} has {per_core / GIB:.0f} GiB per NeuronCore"
            )
        elif need > TIGHT_SHARE * per_core:
            tight.append((f"{DEVICE_MEMORY} (NeuronCore {core})", need, per_core))
    return FitVerdict(instance, not reasons, tuple(reasons), tuple(tight))


def tight_text(verdict: FitVerdict) -> str:
    """'15.9 of 16 GiB host RAM on inf2.xlarge (assuming ...)' for each tight resource, joined."""
    parts = []
    for resource, need, have in verdict.tight:
        assumption = TIGHT_ASSUMPTION[HOST_RAM if resource == HOST_RAM else DEVICE_MEMORY]
        parts.append(f"{need / GIB:.1f} of {have / GIB:.0f} GiB {resource} on {verdict.instance.name} ({assumption})")
    return "; ".join(parts)


def smallest_fit(footprint: Footprint, target: str | None = None, roomy: bool = False) -> Instance | None:
    """The smallest instance that fits (with roomy, without being tight), preferring the export's compile target."""
    fitting = [i for i in by_size() if (fits(footprint, i).roomy if roomy else fits(footprint, i).fits)]
    same = [i for i in fitting if i.target == target]
    found = same or fitting
    return found[0] if found else None


def footprint_of(manifest: Manifest, label: str = "") -> Footprint:
    components = [
        ComponentFootprint(
            name, r.parameter_count, sum(f.size for f in r.files), tuple(tuple(t.shape) for t in r.inputs)
        )
        for name, r in manifest.components.items()
    ]
    return estimate(
        components,
        manifest.pipeline.data_parallel_mode,
        manifest.config.get("auto_cast", "matmul"),
        manifest.config.get("auto_cast_type", "bf16"),
        label,
        torch_dtype=str(manifest.config.get("torch_dtype") or "float32"),
        architecture=manifest.pipeline.architecture,
        tensor_parallel_size=int(manifest.config.get("tensor_parallel_size") or 1),
    )


def check_fit(manifest: Manifest, instance: Instance | None) -> CheckResult:
    footprint = footprint_of(manifest)
    target = manifest.config.get("target")
    smallest = smallest_fit(footprint, target)
    table = {i.name: fits(footprint, i).fits for i in INSTANCES}
    smallest_text = smallest.name if smallest else "none in the table"
    details: dict[str, Any] = {
        "data_parallel_mode": footprint.data_parallel_mode,
        "host_bytes": footprint.host_bytes,
        "core_bytes": list(footprint.core_bytes),
        "components": [dict(asdict(n), copies=n.copies, device_bytes=n.device_bytes) for n in footprint.components],
        "fits": table,
        "tight": {i.name: bool(fits(footprint, i).tight) for i in INSTANCES if table[i.name]},
        "smallest_fit": smallest.name if smallest else None,
        "assumptions": list(ASSUMPTIONS),
    }
    needs = (
        f"needs about {footprint.host_bytes / GIB:.1f} GiB host RAM and "
        f"{max(footprint.core_bytes) / GIB:.1f} GiB on the busiest of {footprint.cores_needed} NeuronCore(s)"
    )
    if instance is None:
        return CheckResult(
            "fit",
            "skipped",
            f"no --instance given; the export {needs}; smallest instance that fits: {smallest_text}",
            [],
            [],
            details,
        )
    verdict = fits(footprint, instance)
    details["instance"] = {
        "name": instance.name,
        "neuron_cores": instance.neuron_cores,
        "host_memory_gib": instance.host_memory_gib,
        "device_memory_gib": instance.device_memory_gib,
        "source": instance.source,
    }
    if verdict.fits and verdict.tight:
        roomy = smallest_fit(footprint, target, roomy=True)
        room = f"; {roomy.name} has room" if roomy and roomy != instance else ""
        return CheckResult("fit", "ok", f"fits, tight: {tight_text(verdict)}{room}", [], [], details)
    if verdict.fits:
        return CheckResult("fit", "ok", f"fits {instance.name}: the export {needs}", [], [], details)
    problems = list(verdict.reasons)
    summary = (
        f"does not fit {instance.name} ({'; '.join(verdict.reasons)}); smallest instance that fits: {smallest_text}"
    )
    return CheckResult("fit", "failed", summary, problems, [], details)
