"""optimum-cli's list options, which take several values after one flag (argparse `nargs="*"`:
`--lora_scales 0.9 -0.5`), become our repeatable options (`--lora-scale 0.9 --lora-scale -0.5`), so existing
optimum-cli scripts port unchanged."""

from __future__ import annotations

import re

# optimum-cli's list flag -> the repeatable flag it becomes here.
LIST_SPELLINGS = {
    "--lora_model_ids": "--lora",
    "--lora_weight_names": "--lora-weight-name",
    "--lora_adapter_names": "--lora-adapter-name",
    "--lora_scales": "--lora-scale",
}
# argparse reads "-0.5" as a value, not an option, when no option looks like a negative number (none does).
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def expand_list_options(argv: list[str]) -> list[str]:
    """Each value after a list flag (up to the next option) becomes one use of our repeatable flag."""
    result: list[str] = []
    index = 0
    while index < len(argv):
        name, sep, value = argv[index].partition("=")
        index += 1
        if name not in LIST_SPELLINGS:
            result.append(argv[index - 1])
            continue
        flag = LIST_SPELLINGS[name]
        if sep:
            result += [flag, value]
            continue
        while index < len(argv) and (not argv[index].startswith("-") or _NEGATIVE_NUMBER.match(argv[index])):
            result += [flag, argv[index]]
            index += 1
    return result
