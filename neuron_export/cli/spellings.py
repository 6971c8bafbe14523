"""optimum-cli's list options (argparse nargs="*": `--controlnet_ids A B`) as our repeatable flags, so existing
scripts port unchanged. Plain underscore spellings (--batch_size) are mapped in main.normalize_argv."""

from __future__ import annotations

from neuron_export.errors import ExportError

# optimum-cli spelling (and the plural its Python API uses) -> our flag; True: the flag is repeatable.
LIST_SPELLINGS: dict[str, tuple[str, bool]] = {
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


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def expand_list_options(argv: list[str]) -> list[str]:
    """`--controlnet_ids A B --height 512` -> `--controlnet A --controlnet B --height 512`: the values up to the
    next option, each given to our flag (one value only where we take one)."""
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
        while not sep and index < len(argv) and (not argv[index].startswith("-") or _is_number(argv[index])):
            values.append(argv[index])
            index += 1
        if not values:
            raise ExportError(f"{name} has no value; give one after it, e.g. {name} VALUE.")
        if len(values) > 1 and not repeatable:
            raise ExportError(f"{name} {' '.join(values)}: neuron-export exports one IP-Adapter; pass one value.")
        for value in values:
            result += [flag, value]
    return result
