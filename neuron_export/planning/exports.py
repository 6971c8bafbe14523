"""From options to Plans: every export the options name (a YAML file, --set, flags; a shape matrix or several
configs), each planned and all checked together before any is built."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuron_export.errors import ExportError
from neuron_export.planning.config import FAMILIES, make_configs, parse_set_options, read_config_file
from neuron_export.planning.jobs import Plan, make_plan


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
