"""The command-line app: every command group registered in one place, and the one place where an exception
becomes a message and an exit code. Imports typer, not the libraries a build needs (`main` comes here after the
quick rerun could not answer)."""

import copy
import os
import signal
import sys
import traceback
from typing import Any

import typer

try:  # typer vendors click since 0.2x and does not re-export this one
    from typer._click.exceptions import NoArgsIsHelpError
except ImportError:
    from click.exceptions import NoArgsIsHelpError  # type: ignore[assignment]

from neuron_export.cli import cache, deploy, export, generate
from neuron_export.cli.spellings import expand_list_options, pair_lora_options
from neuron_export.errors import ExitCode, ExportError

DEBUG_VARIABLE = "NEURON_EXPORT_DEBUG"

app = typer.Typer(
    name="neuron-export",
    help="Compile Stable Diffusion pipelines for AWS Inferentia2 / Trainium into optimum-neuron's layout, with a manifest.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # rich help: options grouped in panels (model, shapes, compiler, add-ons, cache, output)
    context_settings={"help_option_names": ["-h", "--help"]},
)
export.register(app)
cache.register(app)
deploy.register(app)
generate.register(app)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM: cleans up as Ctrl-C does, then exits 143 instead of 130."""


TERMINATED: list[int] = []  # set by the SIGTERM handler: the parser may wrap our exception in its own Abort


def _stopped() -> tuple[int, str]:
    code, word = (ExitCode.TERMINATED, "terminated") if TERMINATED else (ExitCode.INTERRUPTED, "interrupted")
    return code, (
        f"{word}; the output was left as it was (components finished before this stay in the cache, "
        "so a rerun resumes)."
    )


def exit_status(exc: BaseException) -> tuple[int, str | None]:
    """An exception's exit code and the one sentence to show (None: nothing more to say). Unknown ones are bugs."""
    if isinstance(exc, ExportError):
        return exc.exit_code, str(exc)
    if isinstance(exc, (KeyboardInterrupt, typer.Abort)):
        return _stopped()
    if isinstance(exc, typer.Exit):
        return exc.exit_code, None
    if isinstance(exc, NoArgsIsHelpError):  # a bare group: its help, as a success
        print(exc.format_message())
        return ExitCode.OK, None
    if isinstance(exc, OSError) and exc.filename is not None:  # a path no check foresaw: name it, no traceback
        return ExitCode.USAGE, (
            f"Cannot use {exc.filename}: {(exc.strerror or str(exc)).lower()}; check that path or "
            f"choose another (set {DEBUG_VARIABLE}=1 to see where it failed)."
        )
    if isinstance(exc, typer.TyperException):  # usage errors from the command-line parser
        other_family = _other_family_option(exc)
        if other_family:
            return ExitCode.USAGE, other_family
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        message = message.replace("Value error, ", "")
        return getattr(exc, "exit_code", ExitCode.USAGE), message.rstrip(".") + ". See --help."
    raise exc


def _other_family_option(exc: Exception) -> str | None:
    """An export flag that another family takes ("--ip-adapter" given to sd-xl): say which family does."""
    option, ctx = getattr(exc, "option_name", None), getattr(exc, "ctx", None)
    family = getattr(ctx, "info_name", None)
    if not option or family not in export.FAMILY_TASKS:
        return None
    takers = [name for name in export.FAMILY_TASKS if option in export.family_options(name)]
    if not takers or family in takers:
        return None
    return (
        f"{option} is not available for `neuron-export {family}`; "
        f"only `neuron-export {'` and `neuron-export '.join(takers)}` {'takes' if len(takers) == 1 else 'take'} it."
    )


def _terminate(signum: int, frame: Any) -> None:
    TERMINATED.append(signum)
    raise Terminated


def _print_version(value: bool) -> None:
    if value:
        from neuron_export.version import __version__

        print(f"neuron-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
    ),
) -> None:
    """Compile Stable Diffusion pipelines for AWS Inferentia2 / Trainium into optimum-neuron's layout, with a manifest."""


def parser_for(args: list[str]) -> Any:
    """The command-line parser, holding only the command the arguments start with (building every command's
    parser costs a rerun ~40 ms); help, --version, completion and an unknown name get the whole app."""
    commands = [info for info in app.registered_commands if args and info.name == args[0]]
    groups = [info for info in app.registered_groups if args and info.name == args[0]]
    if not commands and not groups:
        return typer.main.get_command(app)
    narrowed = copy.copy(app)  # shares everything but the two lists, so `app` stays whole
    narrowed.registered_commands, narrowed.registered_groups = commands, groups
    return typer.main.get_command(narrowed)


def known_long_options(args: list[str], command: Any) -> set[str]:
    """The long flags whose underscore spelling is mapped: the command's own, or every command's when a flag
    is not the command's own (so an error names it as before)."""
    known = _known_long_options(command)
    foreign = [
        arg
        for arg in args
        if arg.startswith("--") and "_" in arg and arg.partition("=")[0].replace("_", "-") not in known
    ]
    if foreign:
        known = _known_long_options(typer.main.get_command(app))
    return known


def run(args: list[str]) -> int:
    """Run one command; its exit code. One sentence and a non-zero code for every user error, never a traceback
    (unless NEURON_EXPORT_DEBUG=1, which prints the full traceback, the worker's too)."""
    command = parser_for(args)
    json_mode = "--json" in args
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # library chatter is not our output
    # pydantic looks for plugins in every installed distribution's entry points (~20 ms of a rerun), as typer
    # already spares its own parameters; an explicit setting is kept
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    TERMINATED.clear()
    signal.signal(signal.SIGTERM, _terminate)  # a CI job's timeout cleans up like Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started from a shell that ignores it
    try:
        args = expand_list_options(args)
        args = pair_lora_options(normalize_argv(args, known_long_options(args, command)))
        returned = command.main(args=args, prog_name="neuron-export", standalone_mode=False)
        if returned == ExitCode.INTERRUPTED:  # the parser turns KeyboardInterrupt into this code after cleanup ran
            raise KeyboardInterrupt
        code, message = (returned if isinstance(returned, int) else 0), None
    except (Exception, KeyboardInterrupt) as exc:
        code, message = exit_status(exc)
        if os.environ.get(DEBUG_VARIABLE) == "1" and message is not None:
            _print_traceback(exc)
    if message is not None:
        from neuron_export.cli.render import Sink

        Sink(json_mode).error(message, code)
    return code


def _print_traceback(exc: BaseException) -> None:
    traceback.print_exception(exc, file=sys.stderr)
    worker_traceback = getattr(exc, "worker_traceback", None)
    if worker_traceback:
        print(f"The worker's traceback:\n{worker_traceback}", file=sys.stderr, flush=True)
