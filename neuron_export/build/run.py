"""From Plans to finished exports: the build steps the Python API runs (and so every export command)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neuron_export.manifest import Manifest, read_manifest
from neuron_export.planning.jobs import Plan, refuse_unless_ready

if TYPE_CHECKING:  # the build machinery is imported only when something is built: a rerun answers without it
    from neuron_export.events import BuildEvent, EventHandler


@dataclass(frozen=True)
class ExportResult:
    """One finished export."""

    output: Path
    manifest: Manifest
    up_to_date: bool  # the output already held exactly this export; nothing was built or rewritten
    origins: dict[str, str]  # per component: "built", "cached" or "downloaded" (from the remote cache)


def fan_out(plans: list[Plan], on_event: EventHandler | None = None) -> None:
    """With --executor ray, build every component the plans miss on the cluster first, each cache key once;
    run_plan then assembles each export from the remote cache. The local executor builds in run_plan.
    Every plan is checked first: what a plan only reported (no SDK, an existing output) an export refuses."""
    for plan in plans:
        refuse_unless_ready(plan)
    on_cluster = [plan for plan in plans if plan.config.options.executor == "ray" and not plan.up_to_date]
    if on_cluster:
        from neuron_export.build.ray_executor import build_on_cluster

        build_on_cluster(on_cluster, on_event or _ignore)


def run_plan(plan: Plan, on_event: EventHandler | None = None) -> ExportResult:
    if plan.up_to_date:  # decided before the build: a fresh export is not "up to date"
        origins = {job.component: "cached" for job in plan.jobs}  # supply.CACHED, without importing the build
        return ExportResult(output=plan.output, manifest=read_manifest(plan.output), up_to_date=True, origins=origins)
    from neuron_export.build.parent import run_export

    manifest, origins = run_export(plan, on_event or _ignore)
    return ExportResult(output=plan.output, manifest=manifest, up_to_date=False, origins=origins)


def _ignore(event: BuildEvent) -> None:
    pass
