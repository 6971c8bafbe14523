"""From options to finished exports: the steps the Python API runs (and so every export command)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.errors import ExportError
from neuron_export.exporter.config import FAMILIES, make_configs, parse_set_options, read_config_file
from neuron_export.exporter.plan import Plan, make_plan, refuse_unless_ready
from neuron_export.manifest import Manifest, read_manifest

if TYPE_CHECKING:  # the build machinery is imported only when something is built: a rerun answers without it
    from neuron_export.exporter.build import BuildEvent, EventHandler


@dataclass(frozen=True)
class ExportResult:
    """One finished export."""

    output: Path
    manifest: Manifest
    up_to_date: bool  # the output already held exactly this export; nothing was built or rewritten
    origins: dict[str, str]  # per component: "built", "cached" or "downloaded" (from the remote cache)


def option_layers(
    family_or_config: str | Path, overrides: Sequence[str], options: dict[str, Any]
) -> list[dict[str, Any]]:
    """Built-in defaults < a YAML file (or a family name) < `key=value` overrides < options."""
    if isinstance(family_or_config, str) and (
        family_or_config in FAMILIES or not family_or_config.endswith((".yaml", ".yml"))
    ):
        base: dict[str, Any] = {"family": family_or_config}
    else:
        base = read_config_file(Path(family_or_config))
    return [base, parse_set_options(list(overrides)), options]


def layer_labels(family_or_config: str | Path) -> tuple[str | None, ...]:
    """How messages name a value from each of option_layers' layers: the YAML file, --set, the flags."""
    is_file = not (
        isinstance(family_or_config, str)
        and (family_or_config in FAMILIES or not family_or_config.endswith((".yaml", ".yml")))
    )
    return (str(family_or_config) if is_file else None, "--set", "flags")


def plan_exports(
    family_or_config: str | Path | Sequence[str | Path],
    overrides: Sequence[str] = (),
    planning: bool = False,
    **options: Any,
) -> list[Plan]:
    """Every export the options name (a shape matrix, or several configs, name several), all checked before any
    is built; two that would write the same output are refused. `planning`: for a report (see make_plan)."""
    sources = [family_or_config] if isinstance(family_or_config, (str, Path)) else list(family_or_config)
    if len(sources) > 1 and options.get("output") is not None:  # several configs: --output is their parent folder
        options = {
            **{key: value for key, value in options.items() if key != "output"},
            "output_root": Path(options["output"]),
        }
    plans = [
        make_plan(config, planning)
        for source in sources
        for config in make_configs(*option_layers(source, overrides, options), labels=layer_labels(source))
    ]
    seen: dict[Path, Plan] = {}
    for plan in plans:
        where = plan.output.absolute()
        if where in seen:
            raise ExportError(
                f"Two exports would both write --output {plan.output} ({seen[where].source.model_id} at "
                f"{seen[where].height}x{seen[where].width} and {plan.source.model_id} at "
                f"{plan.height}x{plan.width}); give each config its own output."
            )
        seen[where] = plan
    return plans


def fan_out(plans: list[Plan], on_event: EventHandler | None = None) -> None:
    """With --executor ray, build every component the plans miss on the cluster first, each cache key once;
    run_plan then assembles each export from the remote cache. The local executor builds in run_plan.
    Every plan is checked first: what a plan only reported (no SDK, an existing output) an export refuses."""
    for plan in plans:
        refuse_unless_ready(plan)
    on_cluster = [plan for plan in plans if plan.config.executor == "ray" and not plan.up_to_date]
    if on_cluster:
        from neuron_export.exporter.ray_executor import build_on_cluster

        build_on_cluster(on_cluster, on_event or _ignore)


def run_plan(plan: Plan, on_event: EventHandler | None = None) -> ExportResult:
    if plan.up_to_date:  # decided before the build: a fresh export is not "up to date"
        origins = {job.component: "cached" for job in plan.jobs}  # supply.CACHED, without importing the build
        return ExportResult(output=plan.output, manifest=read_manifest(plan.output), up_to_date=True, origins=origins)
    from neuron_export.exporter.build import run_export

    manifest, origins = run_export(plan, on_event or _ignore)
    return ExportResult(output=plan.output, manifest=manifest, up_to_date=False, origins=origins)


def _ignore(event: BuildEvent) -> None:
    pass
