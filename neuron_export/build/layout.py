"""The optimum-neuron directory layout, written into a hidden sibling and renamed into place in one step.

An output directory is either a complete export or untouched: a failure, Ctrl-C or kill leaves at most
a hidden `.NAME.partial-*` sibling, which the next run of the same export removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.errors import ExportError
from neuron_export.files import COMPONENT_CONFIG
from neuron_export.manifest import is_export, refuse_unlisted
from neuron_export.planning.source import PROCESSOR_FOLDERS
from neuron_export.planning.source_files import files_inside, model_roots
from neuron_export.roles.image_encoder import MODEL_TYPE as IMAGE_ENCODER_TYPE
from neuron_export.store.storage import storage_error, writing

if TYPE_CHECKING:
    from neuron_export.manifest import ComponentRecord
    from neuron_export.planning.jobs import Plan

# --torch-dtype -> the neuron block's float_dtype, as optimum-neuron spells it (its loader casts inputs to it)
FLOAT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# optimum-neuron 0.4.5 runs a UNet as LCM when its config's _name_or_path contains one of these.
LCM_NAME_MARKERS = ("lcm", "latent-consistency")


def _sibling(output: Path, tag: str) -> Path:
    return output.parent / f".{output.name}.{tag}"


STAGING_TAG = "partial-"


def _is_staging_of(name: str, output: Path) -> bool:
    """Whether `name` is exactly one of our staging folders for `output` (never a glob: `exp[1]` is not `exp1`)."""
    return re.fullmatch(re.escape(f".{output.name}.{STAGING_TAG}") + "[0-9a-f]{8}", name) is not None


@contextlib.contextmanager
def claim_output(output: Path) -> Iterator[None]:
    """One export at a time per output: a lock file beside it (`.NAME.lock`), held until the export is published
    or abandoned, then removed; a second export to the same output is refused at once. flock, as filelock uses,
    taken directly so the file can be removed safely (the holder checks it locked the file still in place)."""
    output = output.absolute()
    path = _sibling(output, "lock")
    with writing("the export", output, 0, "--output"):
        output.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(handle)
                raise ExportError(
                    f"--output {output} is being written by another export right now; wait for it to "
                    "finish, or choose another --output."
                ) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(handle).st_ino:
                    break
            os.close(handle)  # its last holder removed it as we opened it: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # still holding it: an export that opens it now finds it gone and makes a new one
        os.close(handle)


@contextlib.contextmanager
def staging_directory(output: Path) -> Iterator[Path]:
    """A fresh hidden directory beside `output` (same filesystem, so the final rename is atomic),
    removed with everything in it unless the export is published. Call it holding claim_output."""
    output = output.absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.iterdir():
        if _is_staging_of(stale.name, output) and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run of this same export (we hold its lock)
    staging = _sibling(output, f"{STAGING_TAG}{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_writable(output: Path, needed: int, fix: str) -> None:
    """Before anything is built: the output's parent must take a new directory (a read-only or foreign place
    fails in the first second, not after the compile)."""
    output = output.absolute()
    parent = next(p for p in output.parents if p.exists())
    if not parent.is_dir():
        raise ExportError(f"{fix} {output}: {parent} is a file, not a directory; choose another {fix}.")
    probe = _sibling(parent / output.name, f"probe-{uuid.uuid4().hex[:8]}")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        error = storage_error(exc, "the export", output, needed, fix)
        if error is None:  # e.g. /proc or /sys: a place that takes no directories of ours
            raise ExportError(
                f"{fix} {output}: a directory cannot be created there ({exc.strerror}); choose another {fix}."
            ) from None
        raise error from None


def publish(staging: Path, output: Path, force: bool) -> None:
    """Rename the finished export into place; an existing one is replaced only with --force, and only when it
    is still an earlier export or an empty directory (checked again here: it may have changed while building)."""
    output = output.absolute()
    if output.exists():
        if not force:
            raise ExportError(f"--output {output} appeared while exporting; pass --force to replace it.")
        if output.is_symlink() or not (is_export(output) or (output.is_dir() and not any(output.iterdir()))):
            raise ExportError(
                f"--output {output} is no longer a neuron-export export or an empty directory, so it is "
                "not replaced; choose another --output."
            )
        if is_export(output):
            refuse_unlisted(output)
        retired = _sibling(output, f"old-{uuid.uuid4().hex[:8]}")
        output.rename(retired)
        try:
            staging.rename(output)
        except BaseException:
            retired.rename(output)  # the earlier export goes back where it was
            raise
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)


def neuron_section(plan: Plan, record: ComponentRecord, spec: Any) -> dict[str, Any]:
    """The `neuron` object optimum-neuron's loader rebuilds its input specs from."""
    config = plan.config
    section: dict[str, Any] = {
        "compiler_type": record.compiler_type,
        "compiler_version": record.compiler_version,
        "inline_weights_to_neff": config.spec.inline_weights,
        **{f"static_{key}": value for key, value in spec.static_shapes.items()},
        "dynamic_batch_size": config.spec.dynamic_batch_size,
        "tensor_parallel_size": int(spec.traced.get("tensor_parallel_size", 1)),
        "optlevel": str(config.spec.optlevel),
        "auto_cast": config.spec.auto_cast,
        "auto_cast_type": config.spec.auto_cast_type,
        "instance_type": config.spec.target,
        "int_dtype": "int64",
        "float_dtype": FLOAT_DTYPES[config.spec.torch_dtype],
        "model_type": spec.model_type,
        "output_attentions": False,
        # The exporter's --output_hidden_states option in optimum-neuron; SDXL's need is the top-level key's. The
        # image encoder's outputs are named from this one (it returns the hidden states the pipeline reads).
        "output_hidden_states": spec.model_type == IMAGE_ENCODER_TYPE,
        "task": spec.task,
    }
    return section


def component_config(plan: Plan, job: Any, record: ComponentRecord) -> dict[str, Any]:
    config = json.loads((job.source_folder / COMPONENT_CONFIG).read_text())
    config.setdefault("model_type", job.spec.model_type)  # diffusers configs have none; the loader falls back to it
    if job.spec.model_type.startswith("clip-text"):
        # optimum-neuron names the text encoders' outputs from this top-level key, not the neuron block's.
        config["output_hidden_states"] = job.spec.output_hidden_states
    if job.component == "unet":
        config.pop("_name_or_path", None)
        if plan.facts.is_lcm:
            # optimum-neuron places the pipeline on both cores only when this name says LCM (saving drops it).
            name = plan.config.spec.unet or plan.config.spec.model or ""
            config["_name_or_path"] = name if LCM_NAME_MARKERS[0] in name.lower() else f"lcm:{name}"
    config["neuron"] = neuron_section(plan, record, job.spec)
    return config


def use_lcm_scheduler(index: dict[str, Any], scheduler_folder: Path) -> None:
    """An LCM UNet swapped into a pipeline (LCM-SDXL) needs the LCM scheduler: built from the source's
    scheduler config as diffusers' LCM docs do, and saved with only the keys LCMScheduler takes (others warn)."""
    import inspect

    from diffusers import LCMScheduler

    index["scheduler"] = ["diffusers", "LCMScheduler"]
    path = scheduler_folder / "scheduler_config.json"
    scheduler = LCMScheduler.from_config(json.loads(path.read_text()))
    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) | {"_class_name", "_diffusers_version"}
    config = {key: value for key, value in scheduler.config.items() if key in accepted}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# CLIP's own normalisation: what diffusers' IP-Adapter loader gives a pipeline that has no feature extractor.
CLIP_IMAGE_MEAN, CLIP_IMAGE_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def add_image_encoder(index: dict[str, Any], directory: Path, encoder: dict[str, Any]) -> None:
    """model_index.json names the IP-Adapter's image encoder, and a feature extractor sized for it (when the
    source has none), as the pipeline holds them once diffusers has loaded the adapter."""
    index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
    if (directory / "feature_extractor").is_dir():
        return
    side = int(encoder["image_size"])
    processor = {
        "crop_size": {"height": side, "width": side},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_IMAGE_MEAN,
        "image_processor_type": "CLIPImageProcessor",
        "image_std": CLIP_IMAGE_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": side},
    }
    (directory / "feature_extractor").mkdir()
    (directory / "feature_extractor" / "preprocessor_config.json").write_text(
        json.dumps(processor, indent=2, sort_keys=True) + "\n"
    )
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]


def write_layout(plan: Plan, directory: Path, records: dict[str, ComponentRecord]) -> None:
    """model_index.json, the processors it names, and each component's config.json with its neuron section."""
    source = plan.source.path
    index = json.loads((source / "model_index.json").read_text())
    for name in PROCESSOR_FOLDERS:
        entry = index.get(name)
        if entry and entry[0] is not None and (source / name).is_dir():
            files_inside(source / name, model_roots(source))  # checked again: nothing outside the model is copied
            shutil.copytree(source / name, directory / name, dirs_exist_ok=True)
    if plan.facts.is_lcm and index.get("scheduler", [None, None])[1] != "LCMScheduler":
        use_lcm_scheduler(index, directory / "scheduler")
    if plan.facts.image_encoder is not None:
        add_image_encoder(index, directory, plan.facts.image_encoder)
    (directory / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for job in plan.jobs:
        config = component_config(plan, job, records[job.component])
        (directory / job.component / COMPONENT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
