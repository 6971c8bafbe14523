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
# optimum-cli's single-value options whose underscore spelling would mean something else here (our --cache-dir
# is the component cache; its --cache_dir is the Hub download cache) or nothing: -> our flag.
RENAMED: dict[str, str] = {"--cache_dir": "--hub-cache-dir", "--instance_type": "--target"}
# optimum-cli's --instance_type values -> our --target (trn1n is a trn1 with more network: the same compile).
INSTANCE_TYPES = {"inf2": "inf2", "trn1": "trn1", "trn1n": "trn1", "trn2": "trn2"}
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
        if name in RENAMED:
            result += renamed_option(name, inline if sep else (argv[index] if index < len(argv) else None))
            index += 0 if sep else 1
            continue
        if name not in LIST_SPELLINGS:
            result.append(argv[index - 1])
            continue
        flag, repeatable = LIST_SPELLINGS[name]
        values = [inline] if sep else []
        while (
            not sep and index < len(argv) and (not argv[index].startswith("-") or _NEGATIVE_NUMBER.match(argv[index]))
        ):
            values.append(argv[index])
            index += 1
        if not values:
            raise ExportError(f"{name} has no value; give one after it, e.g. {name} VALUE.")
        if len(values) > 1 and not repeatable:
            raise ExportError(f"{name} {' '.join(values)}: neuron-export exports one IP-Adapter; pass one value.")
        for value in values:
            result += [flag, value]
    return result


def renamed_option(name: str, value: str | None) -> list[str]:
    """One optimum-cli option with its value, as ours (`--instance_type trn1n` -> `--target trn1`)."""
    if value is None or value.startswith("--"):
        raise ExportError(f"{name} has no value; give one after it, e.g. {name} VALUE.")
    if name == "--instance_type":
        if value not in INSTANCE_TYPES:
            raise ExportError(
                f"--instance_type {value} is not one of optimum-cli's {', '.join(INSTANCE_TYPES)}; "
                "pass one of them, or --target inf2|trn1|trn2."
            )
        value = INSTANCE_TYPES[value]
    return [RENAMED[name], value]


# Each per-adapter option, and what stands for "not given" for one adapter (the only file, default_N, 1.0).
PER_LORA: dict[str, str] = {"--lora-weight-name": "", "--lora-adapter-name": "", "--lora-scale": "1.0"}


def pair_lora_options(argv: list[str]) -> list[str]:
    """A per-adapter option given for fewer adapters than there are --lora belongs to the --lora it follows
    (`--lora A --lora-weight-name a.safetensors --lora B`); the adapters without one get its default. Given once
    per --lora, the options pair in order, as optimum-cli's lists do."""
    found: list[tuple[int, int, str, str]] = []  # (position, tokens, flag, value)
    index = 0
    while index < len(argv):
        name, sep, inline = argv[index].partition("=")
        if name in ("--lora", *PER_LORA) and (sep or index + 1 < len(argv)):
            found.append((index, 1 if sep else 2, name, inline if sep else argv[index + 1]))
            index += 1 if sep else 2
            continue
        index += 1
    loras = [position for position, _, flag, _ in found if flag == "--lora"]
    drop: set[int] = set()
    added: list[str] = []
    for flag, unset in PER_LORA.items():
        given = [(position, tokens, value) for position, tokens, name, value in found if name == flag]
        if not 0 < len(given) < len(loras) or given[0][0] < loras[0]:
            continue  # none, one per --lora (in order), or before any --lora: config.check_lora_lists judges
        owner = [sum(1 for lora in loras if lora < position) - 1 for position, _, _ in given]
        if len(set(owner)) != len(owner):
            continue  # two for one adapter: refused there too
        values = dict(zip(owner, (value for _, _, value in given)))
        for position, tokens, _ in given:
            drop.update(range(position, position + tokens))
        for number in range(len(loras)):
            added += [flag, values.get(number, unset)]
    return [arg for position, arg in enumerate(argv) if position not in drop] + added
