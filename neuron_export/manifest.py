"""The manifest written beside every export: what was built, from what, with which compiler, and whether it was checked.

Read back by `inspect`, `verify` and `generate`; it is a pydantic model so readers get types, not dicts.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from neuron_export.errors import ExportError
from neuron_export.files import MANIFEST_NAME

MANIFEST_FORMAT = 1
HASH_CHUNK = 8 * 2**20


class FileRecord(BaseModel):
    path: str  # relative to the export (or source) root, with forward slashes
    sha256: str
    size: int


class TensorRecord(BaseModel):
    name: str
    shape: list[int]
    dtype: str


class ValidationRecord(BaseModel):
    status: Literal["passed", "failed", "skipped"]
    reason: str | None = None
    max_abs_diff: float | None = None
    # Who ran this check: None on this host; "signer" / "uploader" for a downloaded component (its signed or
    # unsigned uploader's report, not repeated here).
    by: Literal["signer", "uploader"] | None = None
    atol: float | None = None  # the tolerance this export required
    # True: the difference was measured before this export (by the artifact's build or an earlier check) and
    # only compared with `atol` now; False: measured by this export.
    reused: bool = False


class ComponentRecord(BaseModel):
    name: str
    model_type: str
    backend: str
    compiler_type: str
    compiler_version: str
    compiler_args: list[str]  # the flags passed to the compiler (empty for the cpu backend)
    neuron_compiler_args: list[str]  # the neuronx-cc flags of this component role, recorded on every backend
    inline_weights: bool
    cpu_backend: bool | None = None  # neuron backend: traced on a host without a NeuronCore
    after_trace: list[str] = []  # torch_neuronx calls made on the traced module before saving
    inputs: list[TensorRecord]
    outputs: list[str]
    files: list[FileRecord]
    source_files: list[FileRecord]
    parameter_count: int
    cache_key: str = ""
    built_at: str = ""
    build_seconds: float
    peak_rss_bytes: int  # measured: the build's high-water mark, compiler subprocesses included
    estimated_peak_bytes: int = 0  # what the plan predicted, so estimates can be checked
    validation: ValidationRecord
    # Where the cached bytes came from: "built" on this host or "downloaded" from the remote cache `remote`
    # (None in manifests written before remote caches existed).
    origin: Literal["built", "downloaded"] | None = None
    remote: str | None = None
    # A downloaded component's signer (ed25519:<base64> public key) and its signature over neuron_export.signing's
    # signed_message; None when built here, or downloaded unsigned with --remote-cache-allow-unsigned.
    signed_by: str | None = None
    signature: str | None = None
    model: str | None = None  # the model its weights come from (`cache ls`; None in records written before)


class LoraRecord(BaseModel):
    """One LoRA adapter fused into the export before tracing."""

    source: str  # the hub id, directory or file given to --lora
    weight_name: str
    adapter_name: str
    scale: float
    sha256: str
    commit: str | None = None
    components: list[str]  # the components it changed


class AddOnRecord(BaseModel):
    """A model added to the pipeline (a ControlNet, an IP-Adapter); its weight hashes are in its component's source_files."""

    model_id: str
    commit: str | None = None
    file: str | None = None  # the IP-Adapter's weight file, relative to its repository


class SourceRecord(BaseModel):
    model_id: str
    revision: str | None = None
    commit: str | None = None
    unet_id: str | None = None
    unet_commit: str | None = None
    vae_id: str | None = None
    vae_commit: str | None = None
    loras: list[LoraRecord] = []
    controlnets: list[AddOnRecord] = []  # in component order (the first --controlnet first)
    ip_adapter: AddOnRecord | None = None


class PipelineRecord(BaseModel):
    family: str
    task: str
    # sd, sdxl, sdxl-refiner; older manifests say kind
    architecture: str = Field(validation_alias=AliasChoices("architecture", "kind"))
    is_lcm: bool
    diffusers_pipeline: str
    optimum_pipeline: str
    data_parallel_mode: str
    height: int
    width: int
    batch_size: int
    num_images_per_prompt: int


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = MANIFEST_FORMAT
    tool: str = "neuron-export"
    tool_version: str
    created_at: str  # when the newest component was built (not when assembled: reruns stay byte-identical)
    config: dict[str, Any]
    pipeline: PipelineRecord
    source: SourceRecord
    environment: dict[str, str | None]
    components: dict[str, ComponentRecord]
    files: list[FileRecord]  # every other file of the export (configs, tokenizers, scheduler)

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    def all_files(self) -> list[FileRecord]:
        return [f for record in self.components.values() for f in record.files] + list(self.files)


def read_manifest(directory: Path) -> Manifest:
    """The export's manifest, or a one-sentence ExportError naming the directory and what to do.
    The one reader: export (up to date?), inspect, verify, generate and push all read through it."""
    from pydantic import ValidationError

    directory = Path(directory)
    if not directory.exists():
        raise ExportError(f"EXPORT_DIR {directory} does not exist; pass the directory a neuron-export export wrote.")
    if not directory.is_dir():
        raise ExportError(f"EXPORT_DIR {directory} is a file, not a directory; pass the export's directory.")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(
            f"EXPORT_DIR {directory} has no {MANIFEST_NAME}, so it is not a neuron-export export; "
            "export it with `neuron-export sd|sd-xl|lcm`."
        )
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "(top level)"
        raise ExportError(
            f"{path} is not a valid neuron-export manifest ({where}: {first.get('msg')}); restore it or re-export."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} cannot be read ({exc}); check its permissions or re-export.") from None


def is_export(directory: Path) -> bool:
    """Whether `directory` holds a neuron-export export: the only non-empty directory --force may replace."""
    try:
        return read_manifest(directory).tool == "neuron-export"
    except ExportError:  # no manifest, unreadable, not JSON, or not ours
        return False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path, root: Path) -> FileRecord:
    return FileRecord(path=path.relative_to(root).as_posix(), sha256=sha256_file(path), size=path.stat().st_size)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(backend: str) -> dict[str, str | None]:
    """Versions that decide whether an artifact loads; the Neuron ones only when the SDK really imports."""
    env = {
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "huggingface_hub": _version("huggingface_hub"),
        "torch_neuronx": None,
        "neuronx_cc": None,
    }
    if backend == "neuron":  # the Neuron SDK's versions (torch is above); neuronx-distributed only where installed
        env["torch_neuronx"] = _version("torch-neuronx")
        env["neuronx_cc"] = _version("neuronx-cc")
        if _version("neuronx-distributed") is not None:
            env["neuronx_distributed"] = _version("neuronx-distributed")
    return env


def normalized_config(config: Any) -> dict[str, Any]:
    """What the export is, as recorded: the config's ExportSpec whole (how it was built, BuildOptions, is left
    out, so an unchanged export is byte-identical wherever and however it was built)."""
    return config.spec.model_dump(mode="json")


def unlisted_files(output: Path) -> list[str]:
    """What an earlier export holds beyond its manifest's files (and the manifest): a user's, so --force must not
    replace it. Paths relative to `output`, sorted; folders that hold no listed file count too."""
    listed = {f.path for f in read_manifest(output).all_files()} | {MANIFEST_NAME}
    folders = {parent.as_posix() for path in listed for parent in Path(path).parents}
    found = []
    for path in sorted(output.rglob("*")):
        relative = path.relative_to(output).as_posix()
        if path.is_dir() and not path.is_symlink():
            if relative not in folders:
                found.append(relative + "/")
        elif relative not in listed or path.is_symlink():
            found.append(relative)
    return [path for path in found if not any(path.startswith(f) for f in found if f.endswith("/") and f != path)]


def refuse_unlisted(output: Path) -> None:
    extra = unlisted_files(output)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise ExportError(
            f"--output {output} holds files its manifest does not list ({shown}), so --force does not "
            "replace it; move them out, or choose another --output."
        )
