"""The ControlNet order of a pipeline optimum-neuron loaded.

optimum-neuron 0.4.5 reads an export's ControlNet folders in directory-listing order, which on ext4 is a hash
order (the third, first, second on one filesystem, another order on the next), and pairs the control images and
scales of each call with the ControlNets in that order. `order_controlnets` puts them back in the order they were
exported (the first --controlnet first), so images pair as given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuron_export.roles.registry import CONTROLNET


def folder_index(path: str | Path) -> int:
    """A ControlNet's folder (or its model.neuron) -> its number in export order; -1 for any other folder."""
    path = Path(path)
    name = path.parent.name if path.suffix else path.name
    return CONTROLNET.index(name) if CONTROLNET.matches(name) else -1


def order_controlnets(pipe: Any) -> Any:
    """Reorder, in place, the ControlNets of an optimum-neuron pipeline to export order; returns the pipeline.
    A pipeline with one ControlNet or none is returned unchanged."""
    saved = getattr(pipe, "model_and_config_save_paths", None) or {}
    models, configs = saved.get("controlnet", ([], []))
    nets = getattr(getattr(pipe, "controlnet", None), "nets", None)
    if nets is None or len(models) < 2 or len(nets) != len(models):
        return pipe
    order = sorted(range(len(models)), key=lambda position: folder_index(models[position]))
    multi = pipe.controlnet
    multi.nets = [nets[position] for position in order]
    for owner, attribute in ((multi, "config"), (multi, "neuron_config")):
        value = getattr(owner, attribute, None)
        if isinstance(value, list) and len(value) == len(order):
            setattr(owner, attribute, [value[position] for position in order])
    for mapping in (getattr(pipe, "configs", None), getattr(pipe, "neuron_configs", None)):
        if isinstance(mapping, dict) and isinstance(mapping.get("controlnet"), list):
            mapping["controlnet"] = [mapping["controlnet"][position] for position in order]
    saved["controlnet"] = ([models[position] for position in order], [configs[position] for position in order])
    return pipe
