"""`verify`: is an export intact, will it load here, and does it fit the instance it is meant for?

Three checks, each with a verdict and an exit code CI can branch on:
  integrity      every file the manifest lists is there with its size and sha256; nothing the loader
                 would trip on was added                                                       -> exit 3
  compatibility  this host's torch / torch-neuronx / neuronx-cc / diffusers against the manifest,
                 by the rules in RULES                                                         -> exit 4
  fit            device memory per NeuronCore and host RAM to load, estimated from the manifest by
                 `estimate` (a pure function), against the instance table in instances.py        -> exit 5
                 (a fit above 85% of a resource passes as "fits, tight", naming the estimate)
When several fail, the first in that order decides the exit code. Bad arguments or an unreadable
manifest are user errors (exit 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.deploy.checks import CheckResult
from neuron_export.deploy.compatibility import RuntimeEnv, check_compatibility, probe_environment
from neuron_export.deploy.footprint import check_fit
from neuron_export.deploy.instances import Instance
from neuron_export.deploy.integrity import check_integrity
from neuron_export.errors import ExitCode, IntegrityError

if TYPE_CHECKING:
    from neuron_export.manifest import Manifest


@dataclass
class Report:
    directory: Path
    instance: Instance | None
    checks: dict[str, CheckResult]
    strict: bool = False

    @property
    def exit_code(self) -> int:
        if self.checks["integrity"].failed:
            return ExitCode.INTEGRITY
        compatibility = self.checks["compatibility"]
        if compatibility.failed or (self.strict and compatibility.verdict == "unchecked"):
            return ExitCode.COMPATIBILITY
        if self.checks["fit"].failed:
            return ExitCode.DOES_NOT_FIT
        return ExitCode.OK

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == ExitCode.OK,
            "exit_code": self.exit_code,
            "export": str(self.directory),
            "instance": self.instance.name if self.instance else None,
            "checks": {name: asdict(check) for name, check in self.checks.items()},
        }


def verify(
    directory: Path,
    instance: Instance | None = None,
    env: RuntimeEnv | None = None,
    strict: bool = False,
    trusted: frozenset[str] | None = None,
) -> Report:
    from neuron_export.manifest import read_manifest

    manifest = read_manifest(directory)
    env = env if env is not None else probe_environment()
    checks = {
        "integrity": check_integrity(directory, manifest, trusted),
        "compatibility": check_compatibility(manifest, env, instance),
        "fit": check_fit(manifest, instance),
    }
    return Report(directory, instance, checks, strict)


def require_integrity(directory: Path, manifest: Manifest) -> CheckResult:
    """For push: an export that does not match its manifest is refused (exit 3)."""
    result = check_integrity(directory, manifest)
    if result.failed:
        raise IntegrityError(
            f"{directory} does not match its manifest ({'; '.join(result.problems)}); "
            "refusing it: re-export or restore the files, then run `neuron-export verify`."
        )
    return result


MARK = {"ok": "OK", "failed": "FAILED", "unchecked": "UNCHECKED", "skipped": "SKIPPED"}


def render(report: Report, console: Any, verbose: bool = False) -> None:
    """A verdict line per check (with its problems and notes); `verbose` adds the memory estimate, every
    instance it fits and the estimate's assumptions."""
    from rich.table import Table
    from rich.text import Text

    from neuron_export.format import human_bytes

    where = f" for {report.instance.name}" if report.instance else ""
    console.print(Text(f"Verify {report.directory}{where}", style="bold"))
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
    fitting = [name for name, ok in fit["fits"].items() if ok]
    if verbose:
        table = Table(title=f"Memory estimate (data-parallel mode {fit['data_parallel_mode']})", title_justify="left")
        for column in ("component", "cores", "host", "device weights", "activations"):
            table.add_column(column)
        for c in fit["components"]:
            table.add_row(
                c["name"],
                ",".join(map(str, c["cores"])),
                human_bytes(c["host_bytes"]),
                human_bytes(c["device_weight_bytes"]),
                human_bytes(c["activation_bytes"]),
            )
        table.add_row(
            "total",
            "",
            human_bytes(fit["host_bytes"]) + " host",
            " / ".join(human_bytes(b) for b in fit["core_bytes"]) + " per core",
            "",
        )
        console.print(table)
    if verbose:  # the fit line names the smallest instance that fits; this lists them all
        console.print(Text(f"fits: {', '.join(fitting) or 'no instance in the table'}"))
        console.print(Text("estimate assumptions:", style="dim"))
        for assumption in fit["assumptions"]:
            console.print(Text(f"  - {assumption}", style="dim"))
    if report.exit_code:
        console.print(Text(f"exit code {report.exit_code}"))
    elif not verbose:
        console.print(Text("(--verbose: the memory estimate, every instance it fits, its assumptions)", style="dim"))
