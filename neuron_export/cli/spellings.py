"""optimum-cli's list options, which take several values after one flag (argparse `nargs="*"`:
`--controlnet_ids A B`, `--lora_scales 0.9 -0.5`), become our options (`--controlnet A --controlnet B`,
`--lora-scale 0.9 --lora-scale -0.5`), so existing optimum-cli scripts port unchanged. Plain underscore
spellings (--batch_size) are mapped in main.normalize_argv."""

from __future__ import annotations

import re

from neuron_export.errors import ExportError

# optimum-cli's list flag (and the plural its Python API uses) -> our flag, and whether ours is repeatable.
LIST_SPELLINGS: dict[str, tuple[str, bool]] = {
    "--lora_model_ids": ("--lora", True),
    "--lora_weight_names": ("--lora-weight-name", True),
    "--lora_adapter_names": ("--lora-adapter-name", True),
    "--lora_scales": ("--lora-scale", True),
    "--controlnet_ids": ("--controlnet", True),
    "--ip_adapter_id": ("--ip-adapter", False),
    "--ip_adapter_ids": ("--ip-adapter", False),
    "--ip_adapter_subfolder": ("--ip-adapter-subfolder", False),
    "--ip_adapter_subfolders": ("--ip-adapter-subfolder", False),
    "--ip_adapter_weight_name": ("--ip-adapter-weight-name", False),
    "--ip_adapter_weight_names": ("--ip-adapter-weight-name", False),
    "--ip_adapter_scale": ("--ip-adapter-scale", False),
    "--ip_adapter_scales": ("--ip-adapter-scale", False),
}
# argparse reads "-0.5" as a value, not an option, when no option looks like a negative number (none does).
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def expand_list_options(argv: list[str]) -> list[str]:
    """Each value after a list flag (up to the next option) becomes one use of our flag; where ours takes one
    value (neuron-export exports one IP-Adapter), several are refused in one sentence."""
    result: list[str] = []
    index = 0
    while index < len(argv):
        name, sep, inline = argv[index].partition("=")
        index += 1
        if name not in LIST_SPELLINGS:
            result.append(argv[index - 1])
            continue
        flag, repeatable = LIST_SPELLINGS[name]
        values = [inline] if sep else []
        while not sep and index < len(argv) and (not argv[index].startswith("-") or _NEGATIVE_NUMBER.match(argv[index])):
            values.append(argv[index])
            index += 1
        if not values:
            raise ExportError(f"{name} has no value; give one after it, e.g. {name} VALUE.")
        if len(values) > 1 and not repeatable:
            raise ExportError(f"{name} {' '.join(values)}: neuron-export exports one IP-Adapter; pass one value.")
        for value in values:
            result += [flag, value]
    return result
