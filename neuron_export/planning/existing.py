"""The output directory before anything is built: its default name, what may already be there, and whether what
is there is this very export (compared as resolved, not as typed)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from neuron_export.errors import ExportError
from neuron_export.files import MANIFEST_NAME
from neuron_export.manifest import Manifest, is_export, read_manifest, refuse_unlisted
from neuron_export.planning.config import ExportConfig

# The short task names in a default output name (text-to-image, the default, adds nothing).
TASK_TAGS = {"image-to-image": "img2img", "inpainting": "inpaint", "instruct-pix2pix": "pix2pix"}
# Config keys that name a local path or a hub id: compared as absolute paths when they exist here.
PATH_KEYS = ("model", "unet", "vae", "lora", "controlnet", "ip_adapter")


def model_name(value: str) -> str:
    """The last part of a hub id or directory (`models/sd/` -> `sd`; a pipeline's `unet/` folder -> the pipeline's)."""
    path = (
        Path(os.path.abspath(Path(value).expanduser()))
        if Path(value).expanduser().exists()
        else Path(value.rstrip("/"))
    )
    name = path.parent.name if path.name == "unet" and path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def default_output(config: ExportConfig, height: int, width: int) -> Path:
    """`{model}-{family}[-{task}][-{add-ons}]-neuron-{H}x{W}-b{batch}[-n{images}]`: the model is the --unet's name
    when one is given; exports of one model that differ in task, add-ons or shapes get different names."""
    parts = [model_name(config.spec.unet or config.spec.model or ""), config.spec.family]
    if config.spec.task in TASK_TAGS:
        parts.append(TASK_TAGS[config.spec.task])
    add_ons = {
        "controlnet": config.spec.controlnet,
        "ip-adapter": config.spec.ip_adapter,
        "lora": config.spec.lora,
        "vae": config.spec.vae,
    }
    parts += [tag for tag, given in add_ons.items() if given]
    name = "-".join(parts) + f"-neuron-{height}x{width}-b{config.spec.batch_size}"
    if config.spec.num_images_per_prompt > 1:
        name += f"-n{config.spec.num_images_per_prompt}"
    return (config.options.output_root or Path()) / name


def check_output(output: Path, force: bool) -> None:
    """An existing output is refused unless --force, or unless it already holds this very export
    (that is decided once the plan exists: see Plan.up_to_date). --force replaces only an earlier
    export or an empty directory: neuron-export never deletes what it did not make."""
    above = next((parent for parent in output.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise ExportError(f"--output {output}: {above} is a file, not a directory; choose another --output.")
    if output.is_symlink():  # dangling or not: publishing would replace the link, not what it points to
        raise ExportError(
            f"--output {output} is a symbolic link (to {os.readlink(output)}); pass the directory itself "
            "or another --output."
        )
    if output.exists() and not output.is_dir():
        raise ExportError(f"--output {output} is a file, not a directory; choose another --output.")
    if not output.exists():
        return
    if is_export(output):
        if force:
            refuse_unlisted(output)
        return
    if any(output.iterdir()):
        raise ExportError(
            f"--output {output} already exists and is not a neuron-export export (it has no {MANIFEST_NAME} of ours), "
            "so it is not replaced even with --force; choose another --output, or empty that directory yourself."
        )
    if not force:
        raise ExportError(
            f"--output {output} already exists (empty); pass --force to use it, or choose another --output."
        )


def _local(value: Any) -> Any:
    if isinstance(value, list):
        return [_local(item) for item in value]
    if isinstance(value, str) and Path(value).expanduser().exists():
        return os.path.abspath(Path(value).expanduser())  # a trailing slash, `..` or another cwd: the same folder
    return value


def resolve_config(
    recorded: dict[str, Any], *, height: int, width: int, backend: str, atol: float | None, components: list[str]
) -> dict[str, Any]:
    """A normalized config with what the export resolved spelled out: the native height and width, the backend
    `auto` chose, the default tolerance, the components built, and local paths made absolute."""
    resolved = dict(recorded)
    resolved["height"], resolved["width"] = recorded.get("height") or height, recorded.get("width") or width
    if recorded.get("backend") in (None, "auto"):
        resolved["backend"] = backend
    if recorded.get("atol") is None and not recorded.get("disable_validation"):
        resolved["atol"] = atol
    resolved["components"] = sorted(recorded.get("components") or components)
    for key in PATH_KEYS:
        if resolved.get(key) is not None:
            resolved[key] = _local(resolved[key])
    return resolved


def recorded_config(manifest: Manifest) -> dict[str, Any]:
    """The manifest's config resolved the same way (manifests written before recorded it as typed)."""
    validations = [record.validation.atol for record in manifest.components.values()]
    backends = [record.backend for record in manifest.components.values()]
    return resolve_config(
        manifest.config,
        height=manifest.pipeline.height,
        width=manifest.pipeline.width,
        backend=backends[0] if backends else "auto",
        atol=validations[0] if validations else None,
        components=list(manifest.components),
    )


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def difference(output: Path, resolved: dict[str, Any], keys: dict[str, str]) -> str | None:
    """Why `output` does not hold the export `resolved` + `keys` describe (None: it does, complete). The first
    option that differs is named; an export whose files are gone is incomplete, not different."""
    try:
        manifest = read_manifest(output)
    except ExportError:
        return "holds no readable export"
    there = recorded_config(manifest)
    for key in resolved:
        if there.get(key) != resolved[key]:
            return f"holds a different export (its {_flag(key)} is {there.get(key)!r}, this one's {resolved[key]!r})"
    recorded = {name: record.cache_key for name, record in manifest.components.items()}
    for name in sorted(set(recorded) | set(keys)):
        if recorded.get(name) != keys.get(name):
            return (
                f"holds a different export (its {name} was built from other inputs: weights, configs, add-ons "
                "or tool and library versions)"
            )
    # A stat per file, no hashing: a rerun stays instant; `neuron-export verify` hashes everything.
    damaged = [
        f"{f.path} missing" if not (output / f.path).is_file() else f"{f.path} changed"
        for f in manifest.all_files()
        if not (output / f.path).is_file() or (output / f.path).stat().st_size != f.size
    ]
    if damaged:
        return f"is incomplete: {damaged[0]}{f' (and {len(damaged) - 1} more)' if len(damaged) > 1 else ''}"
    return None


def refusal(output: Path, why: str) -> str:
    """The sentence for an output that exists but does not hold this export."""
    if why.startswith("is incomplete"):
        return f"--output {output} {why}; --force rebuilds it from the cache, or choose another --output."
    return f"--output {output} already exists and {why}; pass --force to replace it, or choose another --output."
