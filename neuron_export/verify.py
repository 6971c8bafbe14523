"""`verify`: is an export intact, will it load here, and does it fit the instance it is meant for?

Three checks, each with a verdict and an exit code CI can branch on:
  integrity      every file the manifest lists is there with its size and sha256; nothing the loader
                 would trip on was added                                                       -> exit 3
  compatibility  this host's torch / torch-neuronx / neuronx-cc / diffusers against the manifest,
                 by the rules in RULES                                                         -> exit 4
  fit            device memory per NeuronCore and host RAM to load, estimated from the manifest by
                 `estimate` (a pure function), against the instance table in targets.py        -> exit 5
                 (a fit above 85% of a resource passes as "fits, tight", naming the estimate)
When several fail, the first in that order decides the exit code. Bad arguments or an unreadable
manifest are user errors (exit 2).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable, Iterable

from neuron_export.errors import UserError
from neuron_export.manifest import MANIFEST_NAME
from neuron_export.targets import GIB, INSTANCES, Instance, by_size

if TYPE_CHECKING:
    from neuron_export.manifest import Manifest

OK_EXIT = 0
INTEGRITY_EXIT = 3
COMPATIBILITY_EXIT = 4
FIT_EXIT = 5

CPU_COMPILER = "torchscript-cpu"
NEURON_COMPILER = "neuronx-cc"


class IntegrityError(UserError):
    """An export whose files do not match its manifest (push refuses it)."""

    exit_code = INTEGRITY_EXIT


@dataclass
class CheckResult:
    name: str
    verdict: str  # ok | failed | unchecked | skipped
    summary: str
    problems: list[str] = field(default_factory=list)  # each names the file / package / resource at fault
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.verdict == "failed"


# ---------------------------------------------------------------------------------------------------
# integrity

# Files the Hub adds to a repository (and `push` uploads the model card as README.md): never a problem.
HUB_FILES = frozenset({"README.md", ".gitattributes"})
HUB_DIRS = frozenset({".cache", ".git", ".huggingface"})  # huggingface_hub's local-dir metadata, a git clone
# Folders optimum-neuron's diffusion loader opens by name: a config.json or model.neuron in one is loaded.
LOADER_FOLDERS = frozenset({"text_encoder", "text_encoder_2", "unet", "transformer", "vae_encoder",
                            "vae_decoder", "image_encoder"})
LOADER_FOLDER_PREFIXES = ("controlnet",)  # every controlnet* folder is loaded
# Folders diffusers/transformers load through model_index.json: every file in them is read by from_pretrained.
PROCESSOR_FOLDERS = frozenset({"scheduler", "tokenizer", "tokenizer_2", "feature_extractor"})


def _unsafe(relative: str) -> bool:
    path = PurePosixPath(relative)
    return path.is_absolute() or ".." in path.parts or relative == ""


def _files_on_disk(directory: Path) -> Iterable[str]:
    for root, dirs, files in os.walk(directory):
        rel_root = Path(root).relative_to(directory)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in HUB_DIRS]
        dirs.sort()
        for name in sorted(files):
            yield (rel_root / name).as_posix()


def loader_trip_reason(relative: str, components: set[str], directory: Path) -> str | None:
    """Why an unlisted file could change what optimum-neuron's loader loads, or None if it cannot."""
    parts = PurePosixPath(relative).parts
    top = parts[0] if len(parts) > 1 else None
    if relative.endswith(".neuron"):
        return "it is a stray compiled artifact (*.neuron) that could be loaded or shipped instead of the recorded one"
    if top is None:
        return None
    if top in LOADER_FOLDERS or top.startswith(LOADER_FOLDER_PREFIXES):
        if top not in components:
            return f"optimum-neuron's loader loads a {top}/ folder, but this export has no {top} component"
        return f"it sits in {top}/, a component folder optimum-neuron's loader reads"
    if top in PROCESSOR_FOLDERS:
        return f"it sits in {top}/, which the pipeline loads with from_pretrained (an extra file there can change it)"
    if (directory / top / "config.json").is_file():
        return f"{top}/ has a config.json, so it looks like a component folder the manifest does not know"
    return None


def check_integrity(directory: Path, manifest: Manifest) -> CheckResult:
    """Sizes first (cheap), then a streaming sha256 of every listed file; then look for unlisted files."""
    from neuron_export.manifest import sha256_file

    problems: list[str] = []
    notes: list[str] = []
    listed: set[str] = set()
    hashed = 0
    records = manifest.all_files()
    for record in records:
        rel = record.path
        listed.add(rel)
        if _unsafe(rel):
            problems.append(f"{rel}: the manifest lists a path outside the export")
            continue
        path = directory / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != record.size:
            problems.append(f"{rel}: {size} bytes, the manifest records {record.size}")
            continue
        digest = sha256_file(path)
        hashed += size
        if digest != record.sha256:
            problems.append(f"{rel}: sha256 {digest[:16]}..., the manifest records {record.sha256[:16]}... (content changed)")
    components = set(manifest.components)
    unlisted = 0
    for rel in _files_on_disk(directory):
        if rel == MANIFEST_NAME or rel in listed or rel in HUB_FILES:
            continue
        unlisted += 1
        reason = loader_trip_reason(rel, components, directory)
        if reason:
            problems.append(f"{rel}: not in the manifest, and {reason}")
        else:
            notes.append(f"{rel}: not in the manifest; the loader ignores it and `push` does not upload it")
    if problems:
        summary = f"{len(problems)} problem(s) in {len(records)} listed files: " + "; ".join(p.split(':')[0] for p in problems)
        verdict = "failed"
    else:
        summary = f"{len(records)} files match the manifest ({hashed / GIB:.2f} GiB hashed)"
        verdict = "ok"
    return CheckResult("integrity", verdict, summary, problems, notes,
                       {"listed_files": len(records), "hashed_bytes": hashed, "unlisted_files": unlisted})


# ---------------------------------------------------------------------------------------------------
# compatibility

MIN_DIFFUSERS = (0, 30)  # the oldest diffusers this project supports (pyproject.toml)


@dataclass(frozen=True)
class RuntimeEnv:
    """The versions on the host that will load the export (this one)."""

    torch: str | None
    diffusers: str | None
    torch_neuronx: str | None = None
    neuronx_cc: str | None = None
    sdk_problem: str | None = "not probed"  # None when torch_neuronx imports
    diffusers_pipelines: frozenset[str] | None = None  # pipeline classes the installed diffusers exports

    @property
    def has_sdk(self) -> bool:
        return self.sdk_problem is None


def probe_environment() -> RuntimeEnv:
    from importlib import metadata, util

    from neuron_export.backends import neuron_sdk_error

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    problem = neuron_sdk_error()  # PyPI's placeholder has a distribution but no usable module: import it
    pipelines: frozenset[str] | None = None
    spec = util.find_spec("diffusers")  # finds the package without importing it (importing takes seconds)
    if spec is not None and spec.origin:
        try:
            text = Path(spec.origin).read_text(errors="replace")
            pipelines = frozenset(re.findall(r"\b(\w+Pipeline)\b", text))
        except OSError:
            pipelines = None
    return RuntimeEnv(
        torch=version("torch"), diffusers=version("diffusers"),
        torch_neuronx=version("torch-neuronx") if problem is None else None,
        neuronx_cc=version("neuronx-cc") if problem is None else None,
        sdk_problem=problem, diffusers_pipelines=pipelines,
    )


def release(version: str | None, parts: int = 2) -> tuple[int, ...] | None:
    """'2.13.0+cpu' -> (2, 13); None when there is no leading number."""
    if not version:
        return None
    numbers = re.findall(r"\d+", version.split("+")[0])
    return tuple(int(n) for n in numbers[:parts]) if numbers else None


@dataclass(frozen=True)
class RuleOutcome:
    status: str  # ok | failed | unchecked | n/a
    message: str


@dataclass(frozen=True)
class Rule:
    id: str
    reason: str  # one line: why a mismatch breaks loading
    check: Callable[[Manifest, RuntimeEnv, bool], RuleOutcome]


def _components_by(manifest: Manifest, compiler_type: str) -> list[str]:
    return [name for name, r in manifest.components.items() if r.compiler_type == compiler_type]


def _no_sdk(env: RuntimeEnv) -> RuleOutcome:
    return RuleOutcome("unchecked", f"this host has no usable Neuron SDK (torch_neuronx: {env.sdk_problem}), so a neuron "
                                    "export's runtime compatibility cannot be checked here; run verify on the inf2/trn1 host")


def _rule_cpu_artifact(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    cpu = _components_by(manifest, CPU_COMPILER)
    if not cpu:
        return RuleOutcome("n/a", "no CPU-traced components")
    names = ", ".join(cpu)
    if on_neuron:
        return RuleOutcome("failed", f"{names}: compiler_type {CPU_COMPILER} (exported with --backend cpu) cannot run on a "
                                     "NeuronCore; re-export with --backend neuron on an inf2/trn1 host")
    return RuleOutcome("ok", f"{names}: CPU TorchScript traces; they run on this host's CPU, never on a NeuronCore")


def _rule_neuronx_cc(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    neuron = _components_by(manifest, NEURON_COMPILER)
    if not neuron:
        return RuleOutcome("n/a", "no Neuron-compiled components")
    if not env.has_sdk:
        return _no_sdk(env)
    if env.neuronx_cc is None:
        return RuleOutcome("unchecked", "torch_neuronx imports but no neuronx-cc distribution is installed to compare with")
    bad = [f"{n} (neuronx-cc {manifest.components[n].compiler_version})" for n in neuron
           if release(manifest.components[n].compiler_version) != release(env.neuronx_cc)]
    if bad:
        return RuleOutcome("failed", f"{', '.join(bad)} compiled by a different neuronx-cc major.minor than this host's "
                                     f"{env.neuronx_cc}; re-export on this SDK or install the recorded neuronx-cc release")
    return RuleOutcome("ok", f"neuronx-cc {env.neuronx_cc} matches the compiler of {', '.join(neuron)}")


def _rule_torch_neuronx(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    if not _components_by(manifest, NEURON_COMPILER):
        return RuleOutcome("n/a", "no Neuron-compiled components")
    if not env.has_sdk:
        return _no_sdk(env)
    recorded = manifest.environment.get("torch_neuronx")
    if recorded is None:
        return RuleOutcome("unchecked", "the manifest does not record the torch-neuronx that traced the export")
    if release(recorded) != release(env.torch_neuronx):
        return RuleOutcome("failed", f"traced with torch-neuronx {recorded}, this host has {env.torch_neuronx}; "
                                     "install the recorded torch-neuronx release or re-export here")
    return RuleOutcome("ok", f"torch-neuronx {env.torch_neuronx} matches the recorded {recorded}")


def _rule_torch(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    recorded = manifest.environment.get("torch")
    if env.torch is None:
        return RuleOutcome("failed", "torch is not installed on this host; install the torch the manifest records "
                                     f"({recorded}) or newer")
    saved, here = release(recorded), release(env.torch)
    if saved is None or here is None:
        return RuleOutcome("unchecked", f"cannot compare torch versions (recorded {recorded}, this host {env.torch})")
    if saved > here:
        return RuleOutcome("failed", f"model.neuron files were saved by torch {recorded}, newer than this host's "
                                     f"{env.torch}; upgrade torch here or re-export with this torch")
    return RuleOutcome("ok", f"torch {env.torch} can read TorchScript saved by torch {recorded}")


def _rule_diffusers(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    wanted = manifest.pipeline.diffusers_pipeline
    if env.diffusers is None:
        return RuleOutcome("failed", f"diffusers is not installed on this host; install diffusers>={'.'.join(map(str, MIN_DIFFUSERS))}")
    if (release(env.diffusers) or (0,)) < MIN_DIFFUSERS:
        return RuleOutcome("failed", f"diffusers {env.diffusers} is older than {'.'.join(map(str, MIN_DIFFUSERS))}, the "
                                     f"oldest this export's runtime supports; upgrade diffusers")
    if env.diffusers_pipelines is not None and wanted not in env.diffusers_pipelines:
        return RuleOutcome("failed", f"diffusers {env.diffusers} has no {wanted}, the pipeline class this export needs; "
                                     "upgrade diffusers")
    return RuleOutcome("ok", f"diffusers {env.diffusers} provides {wanted}")


# The rules, in order. Each names what breaks loading and why, in one line.
RULES: tuple[Rule, ...] = (
    Rule("cpu-artifact-on-neuroncore",
         "a --backend cpu export is a plain TorchScript trace with no NEFF inside: a NeuronCore cannot execute it",
         _rule_cpu_artifact),
    Rule("neuronx-cc-release",
         "a NEFF compiled by one neuronx-cc major.minor is not guaranteed to load under another SDK release's runtime "
         "('Could not load the model status=2')",
         _rule_neuronx_cc),
    Rule("torch-neuronx-release",
         "torch-neuronx deserialises the NEFF wrapper it wrote; another major.minor may not load it",
         _rule_torch_neuronx),
    Rule("torchscript-newer-torch",
         "torch.jit.load cannot read TorchScript written by a newer torch (newer file format and operator versions)",
         _rule_torch),
    Rule("diffusers-pipeline-class",
         "the runtime builds the diffusers pipeline class the manifest records; a diffusers without it cannot",
         _rule_diffusers),
)


def check_compatibility(manifest: Manifest, env: RuntimeEnv, target: Instance | None = None) -> CheckResult:
    """Apply RULES. The export runs on a NeuronCore when a --target is given or this host has the SDK."""
    on_neuron = target is not None or env.has_sdk
    outcomes = [(rule, rule.check(manifest, env, on_neuron)) for rule in RULES]
    problems = [f"{rule.id}: {o.message} ({rule.reason})" for rule, o in outcomes if o.status == "failed"]
    unchecked = [f"{rule.id}: {o.message}" for rule, o in outcomes if o.status == "unchecked"]
    notes = [f"{rule.id}: {o.message}" for rule, o in outcomes if o.status == "ok"]
    where = f"a NeuronCore ({target.name})" if target else ("this host's NeuronCores" if env.has_sdk else "this host's CPU")
    if problems:
        verdict, summary = "failed", f"{len(problems)} rule(s) say this export will not load on {where}: " + \
            ", ".join(rule.id for rule, o in outcomes if o.status == "failed")
    elif unchecked:
        verdict, summary = "unchecked", "not fully checked: " + "; ".join(unchecked)
    else:
        verdict, summary = "ok", f"loads on {where} by every rule that applies"
    details = {
        "runs_on": where,
        "host": {"torch": env.torch, "diffusers": env.diffusers, "torch_neuronx": env.torch_neuronx,
                 "neuronx_cc": env.neuronx_cc, "neuron_sdk": "imports" if env.has_sdk else env.sdk_problem},
        "recorded": {k: manifest.environment.get(k) for k in ("torch", "diffusers", "torch_neuronx", "neuronx_cc")},
        "rules": [{"id": rule.id, "status": o.status, "message": o.message, "reason": rule.reason} for rule, o in outcomes],
    }
    return CheckResult("compatibility", verdict, summary, problems, unchecked + notes, details)


# ---------------------------------------------------------------------------------------------------
# fit: a pure estimate from (component, parameter count, artifact bytes, input shapes, data-parallel mode)
#
# Calibrated against published deployments (the table in tests/test_verify.py): AWS's inf2 benchmarks run
# SD 1.5, SD 2.1, SD 2 inpainting and SDXL base 1024 on inf2.xlarge and SDXL base + refiner on inf2.8xlarge.

FP32_BYTES = 4
# Host: Python + torch + torch-neuronx + diffusers/transformers imports, the Neuron runtime's host side,
# and the OS's share of a small instance. An allowance, not a measurement.
HOST_BASE_BYTES = 3 * GIB
# Device, per NeuronCore in use: runtime, instruction and I/O buffers.
CORE_RESERVE_BYTES = GIB // 2
# Device, per loaded model: scratch for activations, at least this much ...
ACTIVATION_FLOOR_BYTES = GIB // 4
# ... or this many live copies of the model's widest full-resolution feature map (fp32).
LIVE_FEATURE_MAPS = 4
# Widest channel count at full resolution and its upscale from the 4-D input: UNet down/up blocks at the
# latent size (320 channels in SD 1.x/2.x and SDXL); the VAE's outer blocks at the image size (128).
PEAK_FEATURE_MAP = {"unet": (320, 1), "vae_encoder": (128, 1), "vae_decoder": (128, 8)}
REPLICATED = {"unet": frozenset({"unet", "controlnet"}), "none": frozenset()}  # "all" (and unknown): every component
# Above this share of a resource a fit is reported as tight: the evidence for SDXL on inf2.xlarge is mixed.
TIGHT_SHARE = 0.85
HOST_RAM = "host RAM"
DEVICE_MEMORY = "device memory"

ASSUMPTIONS = (
    "host RAM: each component is deserialised once and kept on the host (a TorchScript module keeps its NEFF), at "
    "max(artifact bytes, 4 bytes x parameters) as the traced modules are fp32; a component on both NeuronCores is not "
    "held twice (torch_neuronx.DataParallel loads consecutive cores from one module, without a copy); plus 3 GiB for "
    "Python, torch, torch-neuronx, diffusers/transformers, the runtime and the OS",
    "loading: lazy_load and async_load (the manifest's after_trace) change when and on which thread a component is "
    "loaded onto the device, not what the host keeps, so they do not change the estimate",
    "device weights: 2 bytes per parameter when auto-cast is matmul/all with bf16/fp16 (the compiler casts matmul and "
    "convolution weights, which are >99% of these models' parameters), else 4 (fp32)",
    "device activations: per model, max(0.25 GiB, 4 x batch x widest channels x full-resolution H x W x 4 bytes) (UNet "
    "320 channels at the latent size, VAE 128 at the image size); a NeuronCore needs only its largest model's, since "
    "the runtime shares one scratchpad between the models loaded on a core; plus 0.5 GiB runtime reserve per core",
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
    channels, scale = PEAK_FEATURE_MAP.get(name, (0, 1))
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


def estimate(components: Iterable[ComponentFootprint], data_parallel_mode: str,
             auto_cast: str | None = "matmul", auto_cast_type: str | None = "bf16", label: str = "") -> Footprint:
    """Device memory per NeuronCore and host RAM to load the pipeline; see ASSUMPTIONS."""
    per_param = device_bytes_per_parameter(auto_cast, auto_cast_type)
    replicated = REPLICATED.get(data_parallel_mode)
    cores = 1 if data_parallel_mode == "none" else 2
    needs = []
    for c in components:
        on_all = replicated is None or c.name in replicated
        needs.append(ComponentNeed(
            name=f"{label}{c.name}", cores=tuple(range(cores)) if on_all else (0,),
            host_bytes=max(c.artifact_bytes, c.parameter_count * FP32_BYTES),
            device_weight_bytes=c.parameter_count * per_param,
            activation_bytes=activation_bytes(c.name, c.input_shapes),
        ))
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
        reasons.append(f"NeuronCores: the placement needs {footprint.cores_needed}, {instance.name} has {instance.neuron_cores}")
    if footprint.host_bytes > instance.host_memory_bytes:
        reasons.append(f"host RAM: loading needs about {footprint.host_bytes / GIB:.1f} GiB, "
                       f"{instance.name} has {instance.host_memory_gib} GiB")
    elif footprint.host_bytes > TIGHT_SHARE * instance.host_memory_bytes:
        tight.append((HOST_RAM, footprint.host_bytes, instance.host_memory_bytes))
    per_core = instance.device_memory_per_core_bytes
    for core, need in enumerate(footprint.core_bytes):
        if need > per_core:
            reasons.append(f"device memory: NeuronCore {core} needs about {need / GIB:.1f} GiB, "
                           f"{instance.name} has {per_core / GIB:.0f} GiB per NeuronCore")
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


def smallest_fit(footprint: Footprint, family: str | None = None, roomy: bool = False) -> Instance | None:
    """The smallest instance that fits (with roomy, without being tight), preferring the export's family."""
    fitting = [i for i in by_size() if (fits(footprint, i).roomy if roomy else fits(footprint, i).fits)]
    same = [i for i in fitting if i.family == family]
    return (same or fitting or [None])[0]


def footprint_of(manifest: Manifest, label: str = "") -> Footprint:
    components = [
        ComponentFootprint(name, r.parameter_count, sum(f.size for f in r.files),
                           tuple(tuple(t.shape) for t in r.inputs))
        for name, r in manifest.components.items()
    ]
    return estimate(components, manifest.pipeline.data_parallel_mode,
                    manifest.config.get("auto_cast", "matmul"), manifest.config.get("auto_cast_type", "bf16"), label)


def check_fit(manifest: Manifest, target: Instance | None) -> CheckResult:
    footprint = footprint_of(manifest)
    family = manifest.config.get("target")
    smallest = smallest_fit(footprint, family)
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
    needs = (f"needs about {footprint.host_bytes / GIB:.1f} GiB host RAM and "
             f"{max(footprint.core_bytes) / GIB:.1f} GiB on the busiest of {footprint.cores_needed} NeuronCore(s)")
    if target is None:
        return CheckResult("fit", "skipped", f"no --target given; the export {needs}; smallest instance that fits: "
                                             f"{smallest_text}", [], [], details)
    verdict = fits(footprint, target)
    details["target"] = {"name": target.name, "neuron_cores": target.neuron_cores, "host_memory_gib": target.host_memory_gib,
                         "device_memory_gib": target.device_memory_gib, "source": target.source}
    if verdict.fits and verdict.tight:
        roomy = smallest_fit(footprint, family, roomy=True)
        room = f"; {roomy.name} has room" if roomy and roomy != target else ""
        return CheckResult("fit", "ok", f"fits, tight: {tight_text(verdict)}{room}", [], [], details)
    if verdict.fits:
        return CheckResult("fit", "ok", f"fits {target.name}: the export {needs}", [], [], details)
    problems = list(verdict.reasons)
    summary = f"does not fit {target.name} ({'; '.join(verdict.reasons)}); smallest instance that fits: {smallest_text}"
    return CheckResult("fit", "failed", summary, problems, [], details)


# ---------------------------------------------------------------------------------------------------
# the report

@dataclass
class Report:
    directory: Path
    target: Instance | None
    checks: dict[str, CheckResult]
    strict: bool = False

    @property
    def exit_code(self) -> int:
        if self.checks["integrity"].failed:
            return INTEGRITY_EXIT
        compatibility = self.checks["compatibility"]
        if compatibility.failed or (self.strict and compatibility.verdict == "unchecked"):
            return COMPATIBILITY_EXIT
        if self.checks["fit"].failed:
            return FIT_EXIT
        return OK_EXIT

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == OK_EXIT,
            "exit_code": self.exit_code,
            "export": str(self.directory),
            "target": self.target.name if self.target else None,
            "checks": {name: asdict(check) for name, check in self.checks.items()},
        }


def verify(directory: Path, target: Instance | None = None, env: RuntimeEnv | None = None,
           strict: bool = False) -> Report:
    from neuron_export.inspection import load_manifest

    manifest = load_manifest(directory)
    env = env if env is not None else probe_environment()
    checks = {
        "integrity": check_integrity(directory, manifest),
        "compatibility": check_compatibility(manifest, env, target),
        "fit": check_fit(manifest, target),
    }
    return Report(directory, target, checks, strict)


def require_integrity(directory: Path, manifest: Manifest) -> CheckResult:
    """For push: an export that does not match its manifest is refused (exit 3)."""
    result = check_integrity(directory, manifest)
    if result.failed:
        raise IntegrityError(f"{directory} does not match its manifest ({'; '.join(result.problems)}); "
                             "refusing it: re-export or restore the files, then run `neuron-export verify`.")
    return result


MARK = {"ok": "OK", "failed": "FAILED", "unchecked": "UNCHECKED", "skipped": "SKIPPED"}


def render(report: Report, console: Any) -> None:
    from rich.table import Table
    from rich.text import Text

    from neuron_export.inspection import human_bytes

    target = f" for {report.target.name}" if report.target else ""
    console.print(Text(f"Verify {report.directory}{target}", style="bold"))
    style = {"ok": "green", "failed": "bold red", "unchecked": "yellow", "skipped": "dim"}
    for check in report.checks.values():
        line = Text(f"{check.name:<14}")
        line.append(f"{MARK[check.verdict]:<10}", style=style[check.verdict])
        line.append(check.summary)
        console.print(line)
        for problem in check.problems:
            console.print(Text(f"    - {problem}"))
        if check.name == "integrity":
            for note in check.notes:
                console.print(Text(f"    note: {note}", style="dim"))
    fit = report.checks["fit"].details
    table = Table(title=f"Memory estimate (data-parallel mode {fit['data_parallel_mode']})", title_justify="left")
    for column in ("component", "cores", "host", "device weights", "activations"):
        table.add_column(column)
    for c in fit["components"]:
        table.add_row(c["name"], ",".join(map(str, c["cores"])), human_bytes(c["host_bytes"]),
                      human_bytes(c["device_weight_bytes"]), human_bytes(c["activation_bytes"]))
    table.add_row("total", "", human_bytes(fit["host_bytes"]) + " host",
                  " / ".join(human_bytes(b) for b in fit["core_bytes"]) + " per core", "")
    console.print(table)
    fitting = [name for name, ok in fit["fits"].items() if ok]
    console.print(Text(f"fits: {', '.join(fitting) or 'no instance in the table'}"))
    console.print(Text("estimate assumptions:", style="dim"))
    for assumption in fit["assumptions"]:
        console.print(Text(f"  - {assumption}", style="dim"))
    console.print(Text(f"exit code {report.exit_code}"))
