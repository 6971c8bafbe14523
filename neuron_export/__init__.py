"""neuron-export: compile Stable Diffusion pipelines for AWS Inferentia2 / Trainium.

The Python API, the one the `neuron-export` commands call:

    import neuron_export

    plan = neuron_export.plan("sd", model="stable-diffusion-v1-5/stable-diffusion-v1-5", height=512, width=512)
    plan.estimated_wall_seconds, neuron_export.builds(plan)  # its schedule; the CI builds of one or more plans
    result = neuron_export.export("sd", model="stable-diffusion-v1-5/stable-diffusion-v1-5", output="sd_neuron")
    result.output, result.manifest, result.up_to_date, result.origins
    pipe = neuron_export.load(result.output)  # a ready diffusers pipeline

Options are the export commands' flags with underscores (`batch_size=2`, `auto_cast="matmul"`); a YAML config
path may stand for the family, with `overrides=["height=768"]` as `--set` does. Bad input raises
`ExportError` with the CLI's one-sentence message. Importing this package imports neither torch nor diffusers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.errors import ExportError
from neuron_export.version import __version__

if TYPE_CHECKING:
    from neuron_export.build.run import ExportResult
    from neuron_export.events import EventHandler
    from neuron_export.planning.jobs import Plan

__all__ = ["ExportError", "__version__", "builds", "export", "load", "order_controlnets", "plan"]


def plan(
    family_or_config: str | Path | Sequence[str | Path], *, overrides: Sequence[str] = (), **options: Any
) -> Plan | list[Plan]:
    """What an export would build (jobs, shapes, flags, cache hits, memory and time estimates); loads no model.
    One Plan, or a list when height, width or batch_size name several values (a shape matrix) or when a list
    of YAML configs is given."""
    from neuron_export.planning.exports import plan_exports

    plans = plan_exports(family_or_config, overrides, planning=True, **options)
    return plans[0] if len(plans) == 1 else plans


def builds(plans: Plan | Sequence[Plan]) -> list[dict[str, Any]]:
    """What a CI matrix fans out for these plans (`plan --json`'s `builds`): each cache key once, with its
    component, estimates, the outputs that need it, whether the local or remote cache already has it, and the
    config that builds exactly it. Each Plan's own `estimated_wall_seconds` is its build's schedule."""
    from neuron_export.planning.fleet import builds as fleet_builds
    from neuron_export.planning.jobs import Plan

    return fleet_builds([plans] if isinstance(plans, Plan) else list(plans))


def export(
    family_or_config: str | Path | Plan | Sequence[str | Path | Plan],
    *,
    overrides: Sequence[str] = (),
    on_event: EventHandler | None = None,
    **options: Any,
) -> ExportResult | list[ExportResult]:
    """Export (or find up to date) and return the result: output path, manifest, up_to_date, per-component origin.
    Takes a family name ("sd", "sd-xl", "lcm"), a YAML config path, a Plan from `plan()`, or a list of either
    (with executor="ray" their missing components are built on the cluster together, each once)."""
    from neuron_export.build.run import fan_out, run_plan
    from neuron_export.planning.exports import plan_exports
    from neuron_export.planning.jobs import Plan

    if isinstance(family_or_config, Plan):
        plans = [family_or_config]
    elif isinstance(family_or_config, (list, tuple)) and all(isinstance(one, Plan) for one in family_or_config):
        plans = list(family_or_config)
    else:
        plans = plan_exports(family_or_config, overrides, **options)  # type: ignore[arg-type]  # Plans were taken above
    fan_out(plans, on_event)
    results = [run_plan(one, on_event) for one in plans]
    return results[0] if len(results) == 1 else results


def load(export_dir: str | Path) -> Any:
    """The export behind the matching diffusers pipeline, ready to call (what `neuron-export generate` runs)."""
    from neuron_export.runtime.loading import load_pipeline

    return load_pipeline(Path(export_dir))


def order_controlnets(pipe: Any) -> Any:
    """A multi-ControlNet pipeline loaded by optimum-neuron, its ControlNets put back in --controlnet order (its loader
    takes the ControlNet folders in directory-listing order, a hash order on ext4). Returns the pipeline."""
    from neuron_export.runtime.controlnets import order_controlnets as reorder

    return reorder(pipe)
