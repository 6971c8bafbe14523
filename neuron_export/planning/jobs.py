"""ExportConfig + the model's files -> a Plan: one Job per component, every check done before any weight loads."""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuron_export.compiler import (
    NXD_INSTALL_HINT,
    after_trace_calls,
    compiler_version,
    neuron_sdk_error,
    neuronx_distributed_error,
    resolve_backend,
)
from neuron_export.compiler import compiler_args as neuron_compiler_args
from neuron_export.errors import ExportError, MemoryBudgetError
from neuron_export.files import default_cache_dir
from neuron_export.pipelines import pipeline_for
from neuron_export.planning.conditioning import read_add_ons
from neuron_export.planning.config import MAX_SIDE, MIN_SIDE, ExportConfig
from neuron_export.planning.estimate import (
    WeightStats,
    available_memory_bytes,
    estimate_peak_bytes,
    estimate_seconds,
    schedule_seconds,
    weight_stats,
)
from neuron_export.planning.existing import check_output, default_output, difference, refusal, resolve_config
from neuron_export.planning.keys import cache_key, component_model, traced_library_versions
from neuron_export.planning.lora import LoraAdapter, LoraFusion, fusions_for, plan_loras
from neuron_export.planning.source import ModelFacts, ModelSource, check_safetensors, read_facts
from neuron_export.planning.sources import resolve_sources
from neuron_export.roles.registry import FLUX_ARCHITECTURES, default_components, role_of, roles
from neuron_export.roles.spec import ComponentSpec, Shapes
from neuron_export.store.cache import ComponentCache, HashIndex


@dataclass(frozen=True)
class Job:
    """One component to build: where its weights are, what it takes, how to compile it."""

    spec: ComponentSpec
    source_folder: Path
    weight_files: tuple[Path, ...]
    weight_hashes: tuple[str, ...]
    weights: WeightStats
    compiler_args: tuple[str, ...]  # the neuronx-cc flags of this component (passed only on the neuron backend)
    after_trace: tuple[str, ...]  # torch_neuronx calls on the traced module (neuron backend only)
    atol: float
    cache_key: str
    cached: bool  # an entry exists (checked for integrity when it is used)
    estimated_peak_bytes: int
    estimated_seconds: float
    loras: tuple[LoraFusion, ...] = ()  # adapters fused into this component before tracing, in order
    model: str = ""  # the model (hub id or directory) its weights come from, as given
    module_path: str = ""  # the module that loads, wraps and checks it (a worker may not know a role registered later)
    sharded: bool = False  # a ModelBuilder role (Role.sharded): traced with its weights outside, in weights/ shards

    @property
    def component(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class Plan:
    config: ExportConfig
    source: ModelSource
    facts: ModelFacts
    backend: str
    output: Path
    height: int
    width: int
    jobs: tuple[Job, ...]
    diffusers_pipeline: str
    optimum_pipeline: str
    cache_dir: Path
    memory_budget: int
    loras: tuple[LoraAdapter, ...] = ()
    notes: tuple[str, ...] = ()  # what a plan reports where an export would refuse (no SDK, an existing output)

    @functools.cached_property
    def resolved_config(self) -> dict[str, Any]:
        """The config the manifest records: as normalized, with native sizes, backend and local paths resolved."""
        from neuron_export.manifest import normalized_config

        return resolve_config(
            normalized_config(self.config),
            height=self.height,
            width=self.width,
            backend=self.backend,
            atol=self.jobs[0].atol if self.jobs else None,
            components=[job.component for job in self.jobs],
        )

    @functools.cached_property  # decided once, before anything is built
    def existing(self) -> str | None:
        """Why the output does not hold exactly this export (None: it does, complete)."""
        return difference(self.output, self.resolved_config, {job.component: job.cache_key for job in self.jobs})

    @property
    def up_to_date(self) -> bool:
        """The output already holds exactly this export (same resolved config, same component keys, every file)."""
        return self.existing is None

    @property
    def data_parallel_mode(self) -> str:
        """How the runtime spreads the pipeline over an Inferentia2 chip's two NeuronCores."""
        if self.facts.is_flux and self.config.spec.tensor_parallel_size > 1:  # one sharded copy over the cores
            return "none"
        if self.facts.is_pixart or self.facts.is_flux:  # optimum-neuron's name: the transformer on both cores
            return "transformer"
        return "all" if self.facts.is_lcm or self.config.spec.family == "lcm" else "unet"

    @property
    def estimated_wall_seconds(self) -> float:
        """How long building the components no cache holds should take: --jobs at once, within the memory budget."""
        # torch's CPU trace already uses every core, so parallel cpu jobs only share them (measured: 1.02x
        # faster with --jobs 2 on 2 cores); neuronx-cc compiles gain from parallel jobs.
        parallel = 1 if self.backend == "cpu" else self.config.options.jobs
        missing = [(job.estimated_seconds, job.estimated_peak_bytes) for job in self.jobs if not job.cached]
        return schedule_seconds(missing, parallel, self.memory_budget)


def protected_directories(config: ExportConfig, source: ModelSource | None = None) -> list[tuple[str, Path]]:
    """What an export reads from or keeps: the model (local ones are known before resolving it) and the caches."""
    found = [("the component cache", config.options.cache_dir or default_cache_dir())]
    if config.options.hub_cache_dir is not None:
        found.append(("the hub cache", config.options.hub_cache_dir))
    for what, value in (
        ("the source model directory", config.spec.model),
        ("the --unet directory", config.spec.unet),
        ("the --vae directory", config.spec.vae),
        *(("the --lora directory", lora) for lora in config.spec.lora),
    ):
        if value and Path(value).expanduser().is_dir():
            found.append((what, Path(value).expanduser()))
    if source is not None:
        found.append(("the source model directory", source.path))
        if source.unet_path is not None:
            found.append(("the --unet directory", source.unet_path))
        found += [("the --controlnet directory", item.path) for item in source.controlnets]
        if source.ip_adapter is not None:
            found.append(("the --ip-adapter directory", source.ip_adapter.path.parent))
        if source.vae_path is not None:
            found.append(("the --vae directory", source.vae_path))
    return found


def check_output_location(output: Path, protected: list[tuple[str, Path]]) -> None:
    """An output that is, contains or sits inside the model or a cache is refused, with or without --force:
    publishing it would replace (or write into) what the export reads from."""
    where = Path(os.path.realpath(output))
    for what, directory in protected:
        base = Path(os.path.realpath(directory))
        if where == base:
            relation = "is"
        elif base.is_relative_to(where):
            relation = "contains"
        elif where.is_relative_to(base):
            relation = "is inside"
        else:
            continue
        raise ExportError(
            f"--output {output} {relation} {what} {directory}; neuron-export never writes over what it "
            "reads or keeps, so choose an --output outside it."
        )


def refuse_existing_output(plan: Plan) -> None:
    if plan.output.exists() and not plan.config.options.force and plan.existing is not None:
        raise ExportError(refusal(plan.output, plan.existing))


def check_family_and_task(config: ExportConfig, facts: ModelFacts) -> None:
    """A command that does not fit the model says so, naming the command that does."""
    model = config.spec.model
    if config.spec.family == "pixart" or facts.is_pixart:
        check_pixart(config, facts)
        return
    if config.spec.family == "flux" or facts.is_flux:
        check_flux(config, facts)
        return
    if config.spec.family in ("sd", "lcm") and facts.is_xl:
        raise ExportError(f"--model {model} is an SDXL pipeline; export it with `neuron-export sd-xl`.")
    if config.spec.family == "sd-xl" and not facts.is_xl:
        command = "lcm" if facts.is_lcm else "sd"
        raise ExportError(
            f"--model {model} is not an SDXL pipeline (no text_encoder_2 / text_time UNet); export it with `neuron-export {command}`."
        )
    if config.spec.family == "sd" and facts.is_lcm:
        where = f"--unet {config.spec.unet} is" if config.spec.unet else f"--model {model} has"
        raise ExportError(f"{where} an LCM UNet (time_cond_proj_dim is set); export it with `neuron-export lcm`.")
    if config.spec.family == "lcm" and not facts.is_lcm and config.spec.unet:
        raise ExportError(
            f"--unet {config.spec.unet} is not a latent consistency UNet (no time_cond_proj_dim); pass an LCM "
            "UNet, or export with `neuron-export sd`."
        )
    if config.spec.family == "lcm" and not facts.is_lcm:
        raise ExportError(
            f"--model {model} is not a latent consistency model (its UNet has no time_cond_proj_dim); "
            "export it with `neuron-export sd`, or pass an LCM checkpoint."
        )
    channels = facts.unet_in_channels
    if config.spec.task == "instruct-pix2pix" and not facts.is_pix2pix:
        raise ExportError(
            f"--task instruct-pix2pix needs an InstructPix2Pix model (8-channel UNet), but {model} has "
            f"{channels} channels; pass one such as timbrooks/instruct-pix2pix."
        )
    if facts.is_pix2pix and config.spec.task != "instruct-pix2pix":
        raise ExportError(
            f"--task {config.spec.task}: {model} is an InstructPix2Pix model (8-channel UNet, "
            f"{facts.pipeline_class or 'its pipeline class'}); pass --task instruct-pix2pix --dynamic-batch-size."
        )
    if config.spec.task == "inpainting":
        if config.spec.family == "lcm":
            raise ExportError(
                "--task inpainting is not available for `neuron-export lcm`; use --task text-to-image or image-to-image."
            )
        if config.spec.family == "sd" and channels != 9:
            raise ExportError(
                f"--task inpainting needs an inpainting UNet with 9 input channels, but {model} has {channels}; "
                "pass an inpainting checkpoint such as stable-diffusion-v1-5/stable-diffusion-inpainting."
            )
    elif channels == 9:
        raise ExportError(
            f"--task {config.spec.task}: {model} is an inpainting model (9-channel UNet); pass --task inpainting."
        )
    if facts.architecture == "sdxl-refiner" and config.spec.task == "text-to-image":
        raise ExportError(
            f"--task text-to-image: {model} is an SDXL refiner, which refines images; pass --task image-to-image."
        )


def check_pixart(config: ExportConfig, facts: ModelFacts) -> None:
    """`neuron-export pixart` takes PixArt-α/-Σ pipelines only, and they take no other command."""
    model = config.spec.model
    if config.spec.family != "pixart":
        raise ExportError(
            f"--model {model} is a {facts.pipeline_class} (a diffusion transformer); export it with "
            "`neuron-export pixart`."
        )
    if not facts.is_pixart:
        command = "sd-xl" if facts.is_xl else "lcm" if facts.is_lcm else "sd"
        raise ExportError(
            f"--model {model} is not a PixArt pipeline (model_index.json names {facts.pipeline_class or 'no class'}); "
            f"export it with `neuron-export {command}`."
        )


def check_flux(config: ExportConfig, facts: ModelFacts) -> None:
    """`neuron-export flux` takes Flux pipelines (not Kontext), they take no other command, and the tensor parallel
    size divides the heads it shards (the T5's and the transformer's)."""
    model = config.spec.model
    if config.spec.family != "flux":
        raise ExportError(
            f"--model {model} is a {facts.pipeline_class} (a diffusion transformer); export it with "
            "`neuron-export flux`."
        )
    if not facts.is_flux:
        command = "pixart" if facts.is_pixart else "sd-xl" if facts.is_xl else "lcm" if facts.is_lcm else "sd"
        raise ExportError(
            f"--model {model} is not a Flux pipeline (model_index.json names {facts.pipeline_class or 'no class'}); "
            f"export it with `neuron-export {command}`."
        )
    if facts.architecture != "flux":
        raise ExportError(
            f"--model {model} is a {facts.pipeline_class}, which neuron-export cannot export yet (its transformer "
            "takes the reference image's tokens too); export a FluxPipeline model with `neuron-export flux`."
        )
    tp = config.spec.tensor_parallel_size
    heads = {
        "the transformer's num_attention_heads": int((facts.transformer or {}).get("num_attention_heads", 1)),
        "the T5 encoder's num_heads": int((facts.text_encoder_2 or {}).get("num_heads", 1)),
    }
    for what, count in heads.items():
        if count % tp:
            raise ExportError(
                f"--tensor-parallel-size {tp} does not divide {what} ({count}) of --model {model}; pass a divisor "
                f"of {count}."
            )


def check_weight_placement(config: ExportConfig, facts: ModelFacts, names: list[str]) -> None:
    """Separate weights are refused where neuronx-cc cannot build them, rather than silently inlined."""
    if config.spec.inline_weights:
        return
    if config.spec.dynamic_batch_size:
        raise ExportError(
            "--no-inline-weights cannot be combined with --dynamic-batch-size (a dynamically batched "
            "module needs its weights inside the NEFF); drop one of the two."
        )
    if facts.is_xl and "unet" in names:
        raise ExportError(
            "--no-inline-weights: the SDXL UNet does not compile with separate weights (Neuron SDK 2.18 "
            "and later); drop --no-inline-weights, or export the other components with --components."
        )


def native_side(config: ExportConfig, facts: ModelFacts) -> int:
    """The model's own image side (its UNet's sample_size), held to the limits --height and --width have."""
    sample_size = facts.unet.get("sample_size")
    try:
        side = facts.default_side
    except (TypeError, ValueError, OverflowError):
        side = 0
    if not MIN_SIDE <= side <= MAX_SIDE or side % 8:
        raise ExportError(
            f"--model {config.spec.model}: its unet/config.json sample_size {sample_size!r} does not give an "
            f"image side from {MIN_SIDE} to {MAX_SIDE} pixels in multiples of 8; pass --height and --width."
        )
    return side


def check_tensor_parallelism(config: ExportConfig, backend: str) -> None:
    """Tensor parallelism on Neuron needs every sharded role of the family to be built from neuronx-distributed's
    parallel layers (Role.tensor_parallel): otherwise refused before anything is downloaded, rather than compiled
    into shards that would not load."""
    tp = config.spec.tensor_parallel_size
    if backend != "neuron" or tp == 1:
        return
    architectures = FLUX_ARCHITECTURES if config.spec.family == "flux" else frozenset()  # flux alone takes tp
    unsplittable = [
        role.name
        for role in roles()
        if role.sharded and not role.tensor_parallel and role.architectures & architectures
    ]
    if unsplittable or not architectures:
        raise ExportError(
            f"--tensor-parallel-size {tp} with --backend neuron: neuron-export cannot split "
            f"{', '.join(unsplittable) or 'this family'}'s layers across NeuronCores, so those shards would not "
            "load; pass --tensor-parallel-size 1, or --backend cpu to build and check the layout."
        )


def planned_backend(config: ExportConfig, planning: bool) -> tuple[str, list[str]]:
    """The backend, resolved; a plan for --backend neuron needs no SDK (the flags come from a table), and says so."""
    problem = neuron_sdk_error() if planning and config.spec.backend == "neuron" else None
    if problem is None:
        return resolve_backend(config.spec.backend), []
    return "neuron", [
        f"SDK not installed: torch_neuronx does not import here ({problem}); the compiler flags are exact, "
        "but the cache keys assume no torch-neuronx or neuronx-cc version, so a host with the SDK "
        "computes other keys (its hits and misses may differ)."
    ]


def output_note(plan: Plan) -> str | None:
    """What exporting would do with an output that exists: nothing (up to date), replace it, or refuse."""
    if not plan.output.exists() or plan.up_to_date:
        return None
    try:
        check_output(plan.output, plan.config.options.force)
        refuse_existing_output(plan)
    except ExportError as refusal:
        return f"an export would be refused: {refusal}"
    return f"--output {plan.output} exists; an export would replace it (--force)."


def refuse_unless_ready(plan: Plan) -> None:
    """What a plan only reports, an export refuses: a Neuron backend without its SDK (or without neuronx-distributed
    for a sharded role), an output it may not replace."""
    resolve_backend(plan.backend)
    sharded = [job.component for job in plan.jobs if job.sharded]
    if plan.backend == "neuron" and sharded and (problem := neuronx_distributed_error()) is not None:
        raise ExportError(
            f"--backend neuron traces {sharded[0]} with neuronx-distributed's ModelBuilder, but neuronx_distributed "
            f"does not import ({problem}); {NXD_INSTALL_HINT}."
        )
    check_output(plan.output, plan.config.options.force)
    refuse_existing_output(plan)


def check_given_output(config: ExportConfig, planning: bool) -> None:
    """A given --output is checked before any source is resolved (nothing is downloaded for an export refused)."""
    if config.options.output is not None:
        check_output_location(config.options.output, protected_directories(config))
        if not planning:
            check_output(config.options.output, config.options.force)


def exported_components(config: ExportConfig, facts: ModelFacts) -> list[str]:
    """The components this export builds, in export order: --components, checked against what the model has."""
    if config.spec.components is not None:
        missing = [name for name in config.spec.components if name not in facts.components]
        if missing:
            raise ExportError(
                f"--components {missing[0]}: {config.spec.model} has no such component; it has {', '.join(facts.components)}."
            )
    names = [name for name in facts.components if config.spec.components is None or name in config.spec.components]
    check_weight_placement(config, facts, names)
    return names


def destination(config: ExportConfig, source: ModelSource, height: int, width: int, planning: bool) -> Path:
    """The output directory (the default one is named for the export), checked now that a hub model's path is known."""
    output = config.options.output or default_output(config, height, width)
    check_output_location(output, protected_directories(config, source))
    if config.options.output is None and not planning:
        check_output(output, config.options.force)
    return output


def component_cache_dir(config: ExportConfig) -> Path:
    cache_dir = config.options.cache_dir or default_cache_dir()
    if os.path.lexists(cache_dir) and not cache_dir.is_dir():
        raise ExportError(
            f"--cache-dir {cache_dir} is not a directory (a file or a dangling link); pass a directory, "
            "which is created when missing."
        )
    return cache_dir


@dataclass(frozen=True)
class JobContext:
    """What every job of one plan shares."""

    config: ExportConfig
    source: ModelSource
    facts: ModelFacts
    backend: str
    shapes: Shapes
    loras: tuple[LoraAdapter, ...]
    hashes: HashIndex
    cache: ComponentCache


def with_torch_dtype(spec: ComponentSpec, torch_dtype: str) -> ComponentSpec:
    """The spec of a component loaded and traced in `torch_dtype`: its float inputs in that dtype, and the dtype
    among what its trace computes (so in its cache key); float32 leaves it as it is."""
    if torch_dtype == "float32":
        return spec
    inputs = tuple(
        dataclasses.replace(tensor, dtype=torch_dtype) if tensor.dtype == "float32" else tensor
        for tensor in spec.inputs
    )
    return dataclasses.replace(spec, inputs=inputs, traced={**spec.traced, "torch_dtype": torch_dtype})


def _file_stats(path: Path, component: str, architecture: str) -> list[int]:
    return list(weight_stats((path,), component, architecture))


def plan_jobs(names: list[str], context: JobContext) -> list[Job]:
    """One Job per component: its spec, compiler flags, tolerance, cache key and estimates."""
    config, source, facts, backend, hashes = (
        context.config,
        context.source,
        context.facts,
        context.backend,
        context.hashes,
    )
    height, width = context.shapes.height, context.shapes.width
    version = compiler_version(backend)
    libraries = traced_library_versions(backend)
    jobs = []
    for name in names:
        for weight_file in facts.weight_files[name]:
            if weight_file.suffix == ".safetensors":
                hashes.remember(weight_file, "header_checked", lambda f=weight_file: check_safetensors(f) or True)  # type: ignore[misc,func-returns-value]
        role = role_of(name, facts.architecture)
        spec = with_torch_dtype(role.describe(name, facts, context.shapes), config.spec.torch_dtype)
        if name == "unet" and source.ip_adapter is not None:
            spec = dataclasses.replace(
                spec,
                add_ons={
                    "ip_adapter_file": str(source.ip_adapter.path),
                    "ip_adapter_scale": config.spec.ip_adapter_scale,
                },
            )
        args = neuron_compiler_args(
            name,
            facts.is_xl,
            config.spec.auto_cast,
            config.spec.auto_cast_type,
            config.spec.optlevel,
            config.spec.target,
            facts.architecture,
        )
        atol = config.spec.atol or role.tolerance(backend, config.spec.auto_cast)
        weight_hashes = tuple(hashes.sha256(path) for path in facts.weight_files[name])
        after_trace = (
            tuple(after_trace_calls(name, config.spec.dynamic_batch_size, facts.architecture))
            if backend == "neuron"
            else ()
        )
        fusions = fusions_for(name, context.loras, facts.is_xl)
        key = cache_key(
            config,
            backend,
            version,
            spec,
            source.folder(name),
            weight_hashes,
            args,
            after_trace,
            libraries,
            fusions,
            sharded=role.sharded,
        )
        per_file = [
            hashes.remember(f, f"stats:{name}", functools.partial(_file_stats, f, name, facts.architecture))
            for f in facts.weight_files[name]
        ]
        weights = WeightStats(sum(p for p, _ in per_file), sum(b for _, b in per_file))
        batch = spec.static_shapes["batch_size"]
        jobs.append(
            Job(
                spec=spec,
                source_folder=source.folder(name),
                weight_files=facts.weight_files[name],
                weight_hashes=weight_hashes,
                weights=weights,
                compiler_args=tuple(args),
                after_trace=after_trace,
                atol=atol,
                cache_key=key,
                cached=context.cache.peek(key),
                estimated_peak_bytes=estimate_peak_bytes(
                    backend, name, weights, batch, height, width, facts.architecture
                ),
                estimated_seconds=estimate_seconds(backend, name, weights, batch, height, width, facts.architecture),
                loras=fusions,
                model=component_model(source, name),
                module_path=role.module_path,
                sharded=role.sharded,
            )
        )
    hashes.save()
    return jobs


def make_plan(config: ExportConfig, planning: bool = False) -> Plan:
    """In straight steps: every source resolved (planning/sources.py, the one step that downloads), then the
    facts read and checked (source.py, conditioning.py, lora.py; configs and headers, no weights loaded), then
    the jobs and their keys. `planning`: for a report (`plan`), which notes a missing Neuron SDK or an existing
    output instead of refusing."""
    check_given_output(config, planning)
    backend, notes = planned_backend(config, planning)
    check_tensor_parallelism(config, backend)
    source = resolve_sources(config, tuple(config.spec.components or default_components()))
    facts = read_facts(source)
    facts = read_add_ons(config, source, facts)
    check_family_and_task(config, facts)
    names = exported_components(config, facts)

    height = config.spec.height or native_side(config, facts)
    width = config.spec.width or native_side(config, facts)
    output = destination(config, source, height, width, planning)
    cache_dir = component_cache_dir(config)
    hashes = HashIndex(cache_dir, config.options.hub_cache_dir)
    loras = plan_loras(config, source, facts, hashes)
    shapes = Shapes(
        config.spec.batch_size,
        config.spec.num_images_per_prompt,
        height,
        width,
        config.spec.sequence_length,
        config.spec.tensor_parallel_size,
    )
    context = JobContext(config, source, facts, backend, shapes, loras, hashes, ComponentCache(cache_dir))
    jobs = plan_jobs(names, context)
    budget = config.options.max_memory or available_memory_bytes()
    to_build = [job for job in jobs if not job.cached]
    largest = max(to_build, key=lambda job: job.estimated_peak_bytes, default=None)
    # With --executor ray the cluster's nodes build, not this host: ray_executor checks the jobs fit them.
    if largest is not None and config.options.executor == "local" and largest.estimated_peak_bytes > budget:
        raise MemoryBudgetError(
            f"--max-memory {budget / 2**30:.1f} GiB is less than building {largest.component} needs "
            f"(about {largest.estimated_peak_bytes / 2**30:.1f} GiB estimated); raise --max-memory, "
            "free memory, or compile on a larger host."
        )
    pipeline = pipeline_for(
        config.spec.family,
        config.spec.task,
        "controlnet" if config.spec.controlnet else None,
        diffusers=facts.pipeline_class,
    )
    plan = Plan(
        config=config,
        source=source,
        facts=facts,
        backend=backend,
        output=output,
        height=height,
        width=width,
        jobs=tuple(jobs),
        diffusers_pipeline=pipeline.diffusers,
        optimum_pipeline=pipeline.optimum,
        cache_dir=cache_dir,
        memory_budget=budget,
        loras=loras,
    )
    if not planning:
        refuse_existing_output(plan)
        return plan
    note = output_note(plan)
    return dataclasses.replace(plan, notes=(*notes, *([note] if note else [])))
