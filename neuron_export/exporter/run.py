"""From options to finished exports: the steps the Python API runs (and so every export command)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from neuron_export.exporter.build import BuildEvent, EventHandler, run_export
from neuron_export.exporter.config import FAMILIES, make_configs, parse_set_options, read_config_file
from neuron_export.exporter.plan import Plan, make_plan
from neuron_export.manifest import Manifest


@dataclass(frozen=True)
class ExportResult:
    """One finished export."""

    output: Path
    manifest: Manifest
    up_to_date: bool  # the output already held exactly this export; nothing was built or rewritten
    origins: dict[str, str]  # per component: "built", "cached" or "downloaded" (from the remote cache)


def option_layers(family_or_config: str | Path, overrides: Sequence[str], options: dict[str, Any]) -> list[dict[str, Any]]:
    """Built-in defaults < a YAML file (or a family name) < `key=value` overrides < options."""
    if isinstance(family_or_config, str) and (family_or_config in FAMILIES or not family_or_config.endswith((".yaml", ".yml"))):
        base: dict[str, Any] = {"family": family_or_config}
    else:
        base = read_config_file(Path(family_or_config))
    return [base, parse_set_options(list(overrides)), options]


def plan_exports(family_or_config: str | Path, overrides: Sequence[str] = (), **options: Any) -> list[Plan]:
    """Every export the options name (a shape matrix names several), all checked before any is built."""
    return [make_plan(config) for config in make_configs(*option_layers(family_or_config, overrides, options))]


def run_plan(plan: Plan, on_event: Optional[EventHandler] = None) -> ExportResult:
    up_to_date = plan.up_to_date  # decided before the build: a fresh export is not "up to date"
    manifest, origins = run_export(plan, on_event or _ignore)
    return ExportResult(output=plan.output, manifest=manifest, up_to_date=up_to_date, origins=origins)


def _ignore(event: BuildEvent) -> None:
    pass
