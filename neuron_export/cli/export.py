"""The export commands (`sd`, `sd-xl`, `lcm`, `build`) and their `plan` twins: parse, call the API, render."""

import inspect
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from neuron_export.cli import rerun
from neuron_export.cli.options import (
    Atol,
    AutoCast,
    AutoCastType,
    Backend,
    BatchSize,
    CacheDir,
    Choice,
    Components,
    ConfigFiles,
    ControlNet,
    DisableValidation,
    DynamicBatchSize,
    Executor,
    Force,
    Height,
    HubCacheDir,
    ImagesPerPrompt,
    InlineWeights,
    IpAdapter,
    IpAdapterScale,
    IpAdapterSubfolder,
    IpAdapterWeightName,
    Jobs,
    Json,
    Lora,
    LoraAdapterName,
    LoraScale,
    LoraWeightName,
    MaxMemory,
    Model,
    Offline,
    Optlevel,
    Output,
    OutputArgument,
    RayAddress,
    RemoteCacheAllowUnsigned,
    RemoteCacheRequired,
    RemoteCacheSigningKey,
    RemoteCacheTrustedKey,
    RemoteCacheUrl,
    Revision,
    SequenceLength,
    SetOptions,
    Target,
    Task,
    TensorParallelSize,
    Token,
    TorchDtype,
    Unet,
    Vae,
    Width,
)

if TYPE_CHECKING:
    from neuron_export.cli.render import Sink

FAMILY_HELP = {
    "sd": "Stable Diffusion 1.x / 2.x (text-to-image, image-to-image, inpainting).",
    "sd-xl": "SDXL base, turbo and refiner (the refiner is recognised from the model); LCM-SDXL with --unet.",
    "lcm": "Latent consistency models distilled from Stable Diffusion (e.g. SimianLuo/LCM_Dreamshaper_v7).",
    "pixart": "PixArt-α and PixArt-Σ diffusion transformers with their T5 encoder (recognised from the model).",
    "flux": "Flux diffusion transformers with their CLIP and T5 encoders, tensor parallel (FLUX.1-dev, -schnell).",
}
BUILD_HELP = "Export from YAML config files (several: one set of jobs, shared components built once): defaults < file < --set < flags."


# Where a value counts as given: typed on the command line, or an option's environment variable (HF_TOKEN).
GIVEN_SOURCES = ("COMMANDLINE", "ENVIRONMENT")  # ParameterSource names (typer keeps its Click copy private)


def given_options(context: typer.Context, values: dict[str, Any]) -> dict[str, Any]:
    """The options the user gave, as Click's parameter source says: a flag given equal to its default still
    overrides a YAML file or --set, one never given does not. Choices as their plain values."""
    sources = {key: context.get_parameter_source(key) for key in values}
    return {
        key: value.value if isinstance(value, Enum) else value
        for key, value in values.items()
        if getattr(sources[key], "name", None) in GIVEN_SOURCES
    }


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def export_and_render(family_or_config: Any, overrides: list[str], options: dict[str, Any], sink: "Sink") -> None:
    """Plan every export (a shape matrix or several configs make several) before building any, then build them
    in turn (components they share come from the cache after the first build), or, with --executor ray, build
    what they all miss on the cluster first and assemble each from the remote cache. An answer "up to date"
    (given now, or due after the build) is kept for the quick rerun (cli/rerun.py)."""
    from neuron_export.build.run import fan_out, run_plan
    from neuron_export.cli.render import result_object
    from neuron_export.planning.exports import plan_exports

    since = time.time_ns()
    plans = plan_exports(family_or_config, overrides, **options)
    if all(plan.up_to_date for plan in plans):
        transcript = up_to_date_answer(plans, sink.json_mode)
        rerun.Transcript.replay(transcript.parts)
        if rerun.Recording.on:
            rerun.keep(transcript, plans, config_files(family_or_config), since)
        return
    try:
        fan_out(plans, on_event=sink.event)
    finally:
        sink.close()
    results = []
    for plan in plans:
        sink.plan(plan)
        if plan.up_to_date:
            sink.line(up_to_date_line(plan))
            result = run_plan(plan)  # reads the manifest back; every component counts as cached
        else:
            started = time.monotonic()
            try:
                result = run_plan(plan, on_event=sink.event)
            finally:
                sink.close()
            sink.summary(result.manifest, plan.output, result.origins, time.monotonic() - started)
        results.append(
            {**result_object(result.manifest, result.output, result.origins), "up_to_date": result.up_to_date}
        )
    sink.result(results[0] if len(results) == 1 else {"ok": True, "exports": results})
    if rerun.Recording.on:
        keep_the_next_answer(family_or_config, overrides, options, sink.json_mode)


def up_to_date_line(plan: Any) -> str:
    return f"{plan.output} is up to date: every component matches; nothing was rebuilt or rewritten."


def up_to_date_answer(plans: list[Any], json_mode: bool) -> rerun.Transcript:
    """What the command prints when every export is up to date, as a transcript (printed, and kept for reruns)."""
    from neuron_export.build.run import run_plan
    from neuron_export.cli.render import Sink, result_object

    transcript = rerun.Transcript()
    sink = Sink(json_mode, stream=transcript.err if json_mode else transcript.out, out=transcript.out)
    results = []
    for plan in plans:
        sink.plan(plan)
        sink.line(up_to_date_line(plan))
        result = run_plan(plan)  # reads the manifest back; every component counts as cached
        results.append(
            {**result_object(result.manifest, result.output, result.origins), "up_to_date": result.up_to_date}
        )
    sink.result(results[0] if len(results) == 1 else {"ok": True, "exports": results})
    return transcript


def keep_the_next_answer(family_or_config: Any, overrides: list[str], options: dict[str, Any], json_mode: bool) -> None:
    """After a build, plan again (quietly) and keep the answer a rerun would give, so the first rerun is quick too."""
    import contextlib
    import io

    from neuron_export.errors import ExportError
    from neuron_export.planning.exports import plan_exports

    since = time.time_ns()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            plans = plan_exports(family_or_config, overrides, **options)
            if not all(plan.up_to_date for plan in plans) or any(plan.source.commit for plan in plans):
                return  # a Hub source is asked again on a rerun: no quick answer to keep
            transcript = up_to_date_answer(plans, json_mode)
    except ExportError:
        return
    rerun.keep(transcript, plans, config_files(family_or_config), since)


def config_files(family_or_config: Any) -> list[Path]:
    """The YAML files an export was read from (none for a family's command)."""
    return [Path(source) for source in _as_list(family_or_config) if Path(source).is_file()]


def plan_and_render(family_or_config: Any, overrides: list[str], options: dict[str, Any], sink: "Sink") -> None:
    import neuron_export
    from neuron_export.cli.render import render_plans

    render_plans(_as_list(neuron_export.plan(family_or_config, overrides=overrides, **options)), sink)


Runner = Callable[[Any, list[str], dict[str, Any], "Sink"], None]


# What each family takes: its tasks, and the options it would refuse (so its --help does not list them).
FAMILY_TASKS = {
    "sd": ("text-to-image", "image-to-image", "inpainting", "instruct-pix2pix"),
    "sd-xl": ("text-to-image", "image-to-image", "inpainting"),
    "lcm": ("text-to-image", "image-to-image"),
    "pixart": ("text-to-image",),
    "flux": ("text-to-image", "inpainting"),
}
IP_ADAPTER_OPTIONS = {"ip_adapter", "ip_adapter_subfolder", "ip_adapter_weight_name", "ip_adapter_scale"}
LORA_OPTIONS = {"lora", "lora_weight_name", "lora_adapter_name", "lora_scale"}
UNET_ONLY = {"unet", "controlnet"} | LORA_OPTIONS | IP_ADAPTER_OPTIONS
DIT_ONLY = {"sequence_length", "torch_dtype", "tensor_parallel_size"}
FAMILY_REFUSES = {
    "sd": DIT_ONLY,
    "sd-xl": IP_ADAPTER_OPTIONS | DIT_ONLY,
    "lcm": IP_ADAPTER_OPTIONS | {"controlnet"} | DIT_ONLY,
    "pixart": UNET_ONLY | {"tensor_parallel_size"},
    "flux": UNET_ONLY - LORA_OPTIONS,  # a Flux LoRA is fused into the transformer (and CLIP text encoder)
}


def _template(  # in help-panel order: model, shapes, compiler, add-ons, cache, output
    output_dir: OutputArgument = None,
    model: Model = None,
    task: Task = None,
    revision: Revision = None,
    unet: Unet = None,
    token: Token = None,
    hub_cache_dir: HubCacheDir = None,
    offline: Offline = False,
    batch_size: BatchSize = None,
    height: Height = None,
    width: Width = None,
    num_images_per_prompt: ImagesPerPrompt = None,
    sequence_length: SequenceLength = None,
    tensor_parallel_size: TensorParallelSize = None,
    dynamic_batch_size: DynamicBatchSize = False,
    torch_dtype: TorchDtype = None,
    auto_cast: AutoCast = None,
    auto_cast_type: AutoCastType = None,
    optlevel: Optlevel = None,
    inline_weights: InlineWeights = None,
    target: Target = None,
    backend: Backend = None,
    disable_validation: DisableValidation = False,
    atol: Atol = None,
    components: Components = None,
    jobs: Jobs = None,
    max_memory: MaxMemory = None,
    executor: Executor = None,
    ray_address: RayAddress = None,
    vae: Vae = None,
    lora: Lora = None,
    lora_weight_name: LoraWeightName = None,
    lora_adapter_name: LoraAdapterName = None,
    lora_scale: LoraScale = None,
    controlnet: ControlNet = None,
    ip_adapter: IpAdapter = None,
    ip_adapter_subfolder: IpAdapterSubfolder = None,
    ip_adapter_weight_name: IpAdapterWeightName = None,
    ip_adapter_scale: IpAdapterScale = None,
    cache_dir: CacheDir = None,
    remote_cache: RemoteCacheUrl = None,
    remote_cache_required: RemoteCacheRequired = False,
    remote_cache_signing_key: RemoteCacheSigningKey = None,
    remote_cache_trusted_keys: RemoteCacheTrustedKey = None,
    remote_cache_allow_unsigned: RemoteCacheAllowUnsigned = False,
    output: Output = None,
    force: Force = False,
    json_output: Json = False,
) -> None:
    """Every export flag; each family's command takes the ones it accepts (family_command)."""


def family_options(family: str) -> set[str]:
    """The long flags `neuron-export FAMILY` takes."""
    return {
        "--" + name.replace("_", "-")
        for name in inspect.signature(_template).parameters
        if name not in FAMILY_REFUSES[family]
    } - {"--output-dir", "--json-output"} | {"--json"}


def family_command(family: str, run: Runner) -> Callable[..., None]:
    def command(ctx: typer.Context, **values: Any) -> None:
        output_dir, json_output = values.pop("output_dir", None), values.pop("json_output", False)
        options = given_options(ctx, values)
        if output_dir is not None and values.get("output") is not None and output_dir != values["output"]:
            from neuron_export.errors import ExportError

            raise ExportError(
                f"OUTPUT {output_dir} and --output {values['output']} are both given; name the output directory once."
            )
        if output_dir is not None:
            options.setdefault("output", output_dir)
        from neuron_export.cli.render import Sink

        run(family, [], options, Sink(json_output))

    tasks = Choice(f"{family.replace('-', '')}_tasks", {task.replace("-", "_"): task for task in FAMILY_TASKS[family]})  # type: ignore[call-overload]
    task_option = typer.Option(
        "--task", help="What the pipeline does [default: text-to-image].", rich_help_panel="Model"
    )
    hints = {name: hint for name, hint in _template.__annotations__.items() if name not in FAMILY_REFUSES[family]}
    hints["task"] = Annotated[tasks | None, task_option]
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    signature = inspect.Signature(
        [context]
        + [
            parameter.replace(annotation=hints[name])
            for name, parameter in inspect.signature(_template).parameters.items()
            if name in hints
        ]
    )
    command.__signature__ = signature  # type: ignore[attr-defined]
    command.__annotations__ = {"ctx": typer.Context, **hints}
    command.__doc__ = FAMILY_HELP[family]
    return command


def build_command(run: Runner) -> Callable[..., None]:
    def command(
        ctx: typer.Context,
        config_files: ConfigFiles,
        set_options: SetOptions = None,
        output: Output = None,
        backend: Backend = None,
        disable_validation: DisableValidation = False,
        jobs: Jobs = None,
        max_memory: MaxMemory = None,
        cache_dir: CacheDir = None,
        force: Force = False,
        json_output: Json = False,
        remote_cache: RemoteCacheUrl = None,
        remote_cache_required: RemoteCacheRequired = False,
        remote_cache_signing_key: RemoteCacheSigningKey = None,
        remote_cache_trusted_keys: RemoteCacheTrustedKey = None,
        remote_cache_allow_unsigned: RemoteCacheAllowUnsigned = False,
        executor: Executor = None,
        ray_address: RayAddress = None,
    ) -> None:
        options = given_options(
            ctx,
            {
                "output": output,
                "backend": backend,
                "disable_validation": disable_validation,
                "jobs": jobs,
                "max_memory": max_memory,
                "cache_dir": cache_dir,
                "force": force,
                "remote_cache": remote_cache,
                "remote_cache_required": remote_cache_required,
                "remote_cache_signing_key": remote_cache_signing_key,
                "remote_cache_trusted_keys": remote_cache_trusted_keys,
                "remote_cache_allow_unsigned": remote_cache_allow_unsigned,
                "executor": executor,
                "ray_address": ray_address,
            },
        )
        from neuron_export.cli.render import Sink

        file = config_files if len(config_files) > 1 else config_files[0]
        run(file, list(set_options or []), options, Sink(json_output))

    command.__doc__ = BUILD_HELP
    return command


def register(app: typer.Typer) -> None:
    """The export commands on `app`, and the same flags under `plan`."""
    plan_app = typer.Typer(
        help="Show what an export would build, from cache or not, with memory and time estimates; exits 6 when "
        "the largest job cannot fit --max-memory. Takes the export commands' flags.",
        no_args_is_help=True,
    )
    app.add_typer(plan_app, name="plan")
    for family in FAMILY_HELP:
        app.command(family, help=FAMILY_HELP[family])(family_command(family, export_and_render))
        plan_app.command(family, help=f"Plan: {FAMILY_HELP[family]}")(family_command(family, plan_and_render))
    app.command("build", help=BUILD_HELP)(build_command(export_and_render))
    plan_app.command("build", help="Plan exports from YAML config files.")(build_command(plan_and_render))
