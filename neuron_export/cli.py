"""The Typer commands: parse flags into an ExportConfig, call the pipeline, render. Nothing heavy at import."""


import os
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from neuron_export.errors import UserError

app = typer.Typer(
    name="neuron-export",
    help="Compile Stable Diffusion pipelines for AWS Inferentia2 / Trainium into optimum-neuron's layout, with a manifest.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

FAMILY_HELP = {
    "sd": "Stable Diffusion 1.x / 2.x (text-to-image, image-to-image, inpainting).",
    "sd-xl": "SDXL base, turbo and refiner (the refiner is recognised from the model); LCM-SDXL with --unet.",
    "lcm": "Latent consistency models distilled from Stable Diffusion (e.g. SimianLuo/LCM_Dreamshaper_v7).",
}


def _export_options(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id or local pipeline directory [default: the family's canonical checkpoint]."),
    task: Optional[str] = typer.Option(None, "--task", help="text-to-image | image-to-image | inpainting [default: text-to-image]."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub branch, tag or commit."),
    unet: Optional[str] = typer.Option(None, "--unet", help="Replacement UNet (hub id or directory), e.g. latent-consistency/lcm-sdxl."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory [default: derived from family and shapes]."),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", metavar="N[,N...]", help="Prompts per call; a comma list builds one export per value [default: 1]."),
    height: Optional[str] = typer.Option(None, "--height", metavar="PX[,PX...]", help="Image height in pixels, a multiple of 8; a comma list builds one export per value [default: the model's]."),
    width: Optional[str] = typer.Option(None, "--width", metavar="PX[,PX...]", help="Image width in pixels, a multiple of 8; a comma list builds one export per value [default: the model's]."),
    num_images_per_prompt: Optional[int] = typer.Option(None, "--num-images-per-prompt", help="Images per prompt [default: 1]."),
    auto_cast: Optional[str] = typer.Option(None, "--auto-cast", help="none | matmul | all [default: matmul]."),
    auto_cast_type: Optional[str] = typer.Option(None, "--auto-cast-type", help="bf16 | fp16 | tf32 [default: bf16 when auto-casting]."),
    optlevel: Optional[int] = typer.Option(None, "--optlevel", "-O", help="neuronx-cc optimization level 1 | 2 | 3 [default: 2]."),
    inline_weights: Optional[bool] = typer.Option(None, "--inline-weights/--no-inline-weights", help="Inline weights into the NEFF [default: inline]."),
    dynamic_batch_size: bool = typer.Option(False, "--dynamic-batch-size", help="Allow batches that are multiples of the compiled one."),
    target: Optional[str] = typer.Option(None, "--target", help="inf2 | trn1 | trn2 [default: inf2]."),
    backend: Optional[str] = typer.Option(None, "--backend", help="auto | neuron | cpu [default: auto: neuron when the SDK imports]."),
    disable_validation: bool = typer.Option(False, "--disable-validation", help="Skip comparing each artifact with the eager model."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Largest allowed difference from the eager model [default: per backend and auto-cast]."),
    components: Optional[str] = typer.Option(None, "--components", help="Comma list: text_encoder,text_encoder_2,unet,vae_encoder,vae_decoder."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    json_output: bool = typer.Option(False, "--json", help="Print one machine-readable result object and nothing else."),
    token: Optional[str] = typer.Option(None, "--token", envvar="HF_TOKEN", show_envvar=False, help="Hugging Face token for private models."),
    hub_cache_dir: Optional[Path] = typer.Option(None, "--hub-cache-dir", help="Where hub downloads are cached [default: huggingface_hub's]."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local hub cache."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Components built at once, each in its own process [default: 1]."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Host memory the builds may use together, e.g. 20GiB [default: what is available]."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Component cache [default: $NEURON_EXPORT_CACHE or ~/.cache/neuron-export]."),
) -> dict[str, Any]:
    """Only a signature: the flags every export command shares (see `_export_command`)."""
    raise NotImplementedError


# On/off flags whose absence must not override a YAML file's `true`.
_PLAIN_FLAGS = {"dynamic_batch_size", "disable_validation", "force", "offline"}


def _flag_values(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user actually gave on the command line."""
    return {key: value for key, value in values.items()
            if value is not None and not (key in _PLAIN_FLAGS and value is False) and key != "json_output"}


def _run_export(layers: list[dict[str, Any]], json_mode: bool) -> None:
    """Plan every export (a shape matrix makes several) before building any, then build them in turn;
    components they share come from the cache after the first build."""
    from neuron_export.build import run_export
    from neuron_export.config import make_configs
    from neuron_export.plan import make_plan
    from neuron_export.render import Reporter, result_object

    configs = make_configs(*layers)
    plans = [make_plan(config) for config in configs]
    reporter = Reporter(json_mode=json_mode)
    results = []
    for plan in plans:
        reporter.plan(plan)
        if plan.up_to_date:
            reporter.line(f"{plan.output} is up to date: every component matches; nothing was rebuilt or rewritten.")
            manifest, origins = run_export(plan)  # reads the manifest back; every component counts as cached
        else:
            try:
                manifest, origins = run_export(plan, reporter)
            finally:
                reporter.close()
            reporter.summary(manifest, plan.output)
        results.append({**result_object(manifest, plan.output, origins), "up_to_date": plan.up_to_date})
    if json_mode:
        import json

        print(json.dumps(results[0] if len(results) == 1 else {"ok": True, "exports": results}), flush=True)


def _run_plan(layers: list[dict[str, Any]], json_mode: bool) -> None:
    from neuron_export.config import make_configs
    from neuron_export.plan import make_plan
    from neuron_export.render import render_plans

    render_plans([make_plan(config) for config in make_configs(*layers)], json_mode)


def _export_command(family: str, plan_only: bool = False):  # noqa: ANN202 - a Typer command built per family
    def command(
        output_dir: Optional[Path] = typer.Argument(None, metavar="[OUTPUT]", help="Output directory (same as --output; as optimum-cli takes it)."),
        **flags: Any,
    ) -> None:
        json_mode = bool(flags.get("json_output"))
        values = _flag_values(flags)
        if output_dir is not None:
            values.setdefault("output", output_dir)
        (_run_plan if plan_only else _run_export)([{"family": family}, values], json_mode)

    import inspect

    parameters = [inspect.signature(command).parameters["output_dir"],
                  *inspect.signature(_export_options).parameters.values()]
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__doc__ = FAMILY_HELP[family]
    return command


plan_app = typer.Typer(
    help="Show what an export would build, from cache or not, with memory and time estimates; exits 6 when "
         "the largest job cannot fit --max-memory. Takes the export commands' flags.",
    no_args_is_help=True,
)
app.add_typer(plan_app, name="plan")
for _family in ("sd", "sd-xl", "lcm"):
    app.command(_family, help=FAMILY_HELP[_family])(_export_command(_family))
    plan_app.command(_family, help=f"Plan: {FAMILY_HELP[_family]}")(_export_command(_family, plan_only=True))


def _build_command(plan_only: bool):  # noqa: ANN202
    def build_command(
        config_file: Path = typer.Argument(..., metavar="CONFIG.yaml", help="A YAML config, e.g. configs/sdxl-base-1024.yaml."),
        set_options: list[str] = typer.Option([], "--set", help="Override one key: --set height=768 (repeatable)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output directory."),
        backend: Optional[str] = typer.Option(None, "--backend", help="auto | neuron | cpu."),
        disable_validation: bool = typer.Option(False, "--disable-validation", help="Skip validation."),
        jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Components built at once."),
        max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Host memory the builds may use together."),
        cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Component cache directory."),
        force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
        json_output: bool = typer.Option(False, "--json", help="Print one machine-readable result object."),
    ) -> None:
        """Export from a YAML config file: defaults < file < --set < flags."""
        from neuron_export.config import parse_set_options, read_config_file

        flags = _flag_values({"output": output, "backend": backend, "disable_validation": disable_validation,
                              "jobs": jobs, "max_memory": max_memory, "cache_dir": cache_dir, "force": force})
        layers = [read_config_file(config_file), parse_set_options(set_options), flags]
        (_run_plan if plan_only else _run_export)(layers, json_output)

    return build_command


app.command("build", help="Export from a YAML config file: defaults < file < --set < flags.")(_build_command(False))
plan_app.command("build", help="Plan an export from a YAML config file.")(_build_command(True))


def _known_long_options(command: Any) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        names.update(opt for opt in [*param.opts, *param.secondary_opts] if opt.startswith("--"))
    for sub in getattr(command, "commands", {}).values():
        names |= _known_long_options(sub)
    return names


def normalize_argv(argv: list[str], known: set[str]) -> list[str]:
    """optimum-cli's underscore spellings (--batch_size, --auto_cast_type) map to our kebab-case flags."""
    result = []
    for arg in argv:
        if arg.startswith("--") and "_" in arg:
            name, sep, value = arg.partition("=")
            kebab = name.replace("_", "-")
            if kebab in known:
                arg = kebab + sep + value
        result.append(arg)
    return result


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point: one sentence and a non-zero exit for every user error, never a traceback."""
    command = typer.main.get_command(app)
    args = normalize_argv(list(sys.argv[1:] if argv is None else argv), _known_long_options(command))
    json_mode = "--json" in args
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # library chatter is not our output
    signal.signal(signal.SIGTERM, _interrupt)  # a CI job's timeout cleans up like Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started from a shell that ignores it
    from neuron_export.render import error

    try:
        returned = command.main(args=args, prog_name="neuron-export", standalone_mode=False)
        if returned == 130:  # the parser turns KeyboardInterrupt into exit code 130 after cleanup ran
            raise KeyboardInterrupt
        if isinstance(returned, int) and returned:
            sys.exit(returned)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        error("interrupted; nothing was written.", json_mode, 130)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors from the command-line parser
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if type(exc).__name__ == "NoArgsIsHelpError":
            print(message)
            sys.exit(0)
        code = getattr(exc, "exit_code", 2)
        error(message.rstrip(".") + ". See --help.", json_mode, code)
        sys.exit(code)
    except UserError as exc:
        error(str(exc), json_mode, exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        error("interrupted; nothing was written (the output directory is untouched).", json_mode, 130)
        sys.exit(130)


def _register_more_commands() -> None:
    """Commands that work on a finished export live in their own modules; each adds itself to `app`."""
    from neuron_export import cache_cli, deploy_cli, generate_cli

    cache_cli.register(app)
    deploy_cli.register(app)
    generate_cli.register(app)


_register_more_commands()
