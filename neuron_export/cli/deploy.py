"""Typer commands that look at a finished export: inspect, verify, push (registered by cli.py).

Thin: parse, call inspection / verify / hub, render. Nothing heavy is imported until a command runs.
"""

import sys
from pathlib import Path
from typing import Any

import typer

VERIFY_HELP = """Check an export: integrity, compatibility with this host, fit on an instance.

\b
integrity      every file in manifest.json is present with its size and sha256
               (streamed); unlisted files optimum-neuron's loader would pick up
               (a stray *.neuron, an unknown component folder) are failures;
               README.md and .gitattributes (added by the Hub) are ignored;
               each downloaded component's signature matches its record (and,
               with --remote-cache-trusted-key, is by one of those keys)
compatibility  this host's torch / torch-neuronx / neuronx-cc / diffusers against
               the versions the manifest records; a --backend cpu export cannot
               run on a NeuronCore; without the Neuron SDK here a neuron export
               is reported UNCHECKED, not passed
fit            device memory per NeuronCore and host RAM to load the pipeline
               (estimated from parameter counts, artifact sizes and shapes)
               against --instance; names the smallest instance that fits

\b
Exit codes (the first failing check in this order decides):
  0  every check passed (or was skipped / unchecked)
  3  integrity failed: a file is missing, changed, or stray
  4  compatibility failed (with --strict: also when it could not be checked)
  5  the export does not fit --instance
  2  usage error, or no readable manifest.json
"""


def _console() -> Any:
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160, highlight=False)


def inspect_command(
    export_dir: Path = typer.Argument(..., metavar="EXPORT_DIR", help="A directory written by neuron-export."),
    json_output: bool = typer.Option(False, "--json", help="Print the manifest as one JSON object."),
) -> None:
    """Summarise an export: pipeline, source, component shapes and dtypes, compiler flags, versions, sizes,
    validation, build times and peak RSS."""
    from neuron_export.cli.render import Sink
    from neuron_export.deploy import inspection
    from neuron_export.manifest import read_manifest

    manifest = read_manifest(export_dir)
    sink = Sink(json_output)
    sink.result(manifest.model_dump(mode="json"), indent=2)
    if not sink.json_mode:
        inspection.render(manifest, export_dir, _console())


def verify_command(
    export_dir: Path = typer.Argument(..., metavar="EXPORT_DIR", help="A directory written by neuron-export."),
    instance_name: str | None = typer.Option(
        None,
        "--instance",
        help="Instance to check the fit on: inf2.xlarge | inf2.8xlarge | "
        "inf2.24xlarge | inf2.48xlarge | trn1.2xlarge | trn1.32xlarge | trn1n.32xlarge.",
    ),
    # "target" means the neuronx-cc compile target everywhere else; the old spelling still works, with a notice.
    old_target: str | None = typer.Option(None, "--target", hidden=True),
    strict: bool = typer.Option(
        False, "--strict", help="Fail (exit 4) when compatibility cannot be checked on this host."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON object with each check's verdict and details."
    ),
    trusted_keys: list[str] | None = typer.Option(
        None,
        "--remote-cache-trusted-key",
        metavar="KEY",
        help="Downloaded components must be signed by one of these public keys (ed25519:... or a .pub file; repeatable) [default: $NEURON_EXPORT_REMOTE_CACHE_TRUSTED_KEYS, else any signer whose signature matches].",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print the memory estimate and its assumptions."),
) -> None:
    from neuron_export.cli.render import Sink
    from neuron_export.deploy import verify
    from neuron_export.deploy.instances import get_instance
    from neuron_export.errors import ExportError
    from neuron_export.store.remote_trust import resolve_trusted

    try:
        trusted = resolve_trusted(trusted_keys or [])
    except ValueError as problem:
        raise ExportError(f"{problem}.") from None

    if old_target is not None:
        print(
            "verify --target is now --instance (--target is the compile target of an export); "
            f"use --instance {old_target}.",
            file=sys.stderr,
        )
        instance_name = instance_name or old_target
    instance = get_instance(instance_name) if instance_name else None
    report = verify.verify(export_dir, instance, strict=strict, trusted=frozenset(trusted) if trusted else None)
    sink = Sink(json_output)
    sink.result(report.to_json())
    if not sink.json_mode:
        verify.render(report, _console(), verbose)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def push_command(
    export_dir: Path = typer.Argument(..., metavar="EXPORT_DIR", help="A directory written by neuron-export."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository, org/name (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository as private."),
    revision: str | None = typer.Option(
        None, "--revision", help="Branch to push to (created if missing) [default: main]."
    ),
    token: str | None = typer.Option(
        None, "--token", help="Hugging Face token [default: HF_TOKEN or the saved login]."
    ),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object describing the upload."),
) -> None:
    """Upload an export to the Hugging Face Hub with a generated model card (README.md).

    The export's integrity is verified first and a corrupted export is refused (exit 3). Only the files
    manifest.json lists, and manifest.json itself, are uploaded; the card is uploaded separately, so the
    export directory is not modified.
    """
    from neuron_export.cli.render import Sink
    from neuron_export.deploy import hub

    result = hub.push_export(export_dir, repo_id, private=private, revision=revision, token=token)
    sink = Sink(json_output)
    sink.result(result)
    if sink.json_mode:
        return
    sink.line(
        f"Pushed {len(result['files'])} files and {result['card']} to {result['repo_url'] or repo_id} "
        f"(revision {result['revision']}{', private' if private else ''})."
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("inspect")(inspect_command)
    app.command("verify", help=VERIFY_HELP)(verify_command)
    app.command("push")(push_command)
