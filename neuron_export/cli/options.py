"""Options the commands share, each declared once as a `typing.Annotated` alias."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from neuron_export.roles.registry import component_spellings


class Choice(str, Enum):
    """A choice option's values: typer lists them in --help and shell completion offers them."""


def choice(name: str, values: tuple[str, ...]) -> type[Choice]:
    return Choice(name, {value.replace("-", "_"): value for value in values})  # type: ignore[call-overload]


AutoCastChoice = choice("AutoCastChoice", ("none", "matmul", "all"))
AutoCastTypeChoice = choice("AutoCastTypeChoice", ("bf16", "fp16", "tf32"))
TargetChoice = choice("TargetChoice", ("inf2", "trn1", "trn2"))
BackendChoice = choice("BackendChoice", ("auto", "neuron", "cpu"))
ExecutorChoice = choice("ExecutorChoice", ("local", "ray"))


OutputArgument = Annotated[
    Path | None,
    typer.Argument(metavar="[OUTPUT]", help="Output directory (same as --output; as optimum-cli takes it)."),
]
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Hub id or local pipeline directory [default: the family's canonical checkpoint].",
        rich_help_panel="Model",
    ),
]
Task = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="text-to-image | image-to-image | inpainting | instruct-pix2pix [default: text-to-image].",
        rich_help_panel="Model",
    ),
]
Revision = Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit.", rich_help_panel="Model")]
Unet = Annotated[
    str | None,
    typer.Option(
        "--unet",
        help="Replacement UNet (hub id or directory), e.g. latent-consistency/lcm-sdxl.",
        rich_help_panel="Model",
    ),
]
Output = Annotated[
    Path | None,
    typer.Option(
        "--output", "-o", help="Output directory [default: derived from family and shapes].", rich_help_panel="Output"
    ),
]
BatchSize = Annotated[
    str | None,
    typer.Option(
        "--batch-size",
        metavar="N[,N...]",
        help="Prompts per call; a comma list builds one export per value [default: 1].",
        rich_help_panel="Shapes",
    ),
]
Height = Annotated[
    str | None,
    typer.Option(
        "--height",
        metavar="PX[,PX...]",
        help="Image height in pixels, a multiple of 8; a comma list builds one export per value [default: the model's].",
        rich_help_panel="Shapes",
    ),
]
Width = Annotated[
    str | None,
    typer.Option(
        "--width",
        metavar="PX[,PX...]",
        help="Image width in pixels, a multiple of 8; a comma list builds one export per value [default: the model's].",
        rich_help_panel="Shapes",
    ),
]
ImagesPerPrompt = Annotated[
    int | None,
    typer.Option("--num-images-per-prompt", help="Images per prompt [default: 1].", rich_help_panel="Shapes"),
]
SequenceLength = Annotated[
    int | None,
    typer.Option(
        "--sequence-length",
        help="Text tokens the T5 encoder and transformer take (pixart, flux) [default: the tokenizer's model_max_length].",
        rich_help_panel="Shapes",
    ),
]
TensorParallelSize = Annotated[
    int | None,
    typer.Option(
        "--tensor-parallel-size",
        help="NeuronCores the T5 encoder and transformer are sharded over (flux) [default: 1].",
        rich_help_panel="Shapes",
    ),
]
TorchDtypeChoice = choice("TorchDtypeChoice", ("float32", "bfloat16", "float16"))
TorchDtype = Annotated[
    TorchDtypeChoice | None,
    typer.Option(
        "--torch-dtype",
        help="float32 | bfloat16 | float16: load and trace the models in this dtype (pixart, flux) [default: float32].",
        rich_help_panel="Compiler",
    ),
]
AutoCast = Annotated[
    AutoCastChoice | None,
    typer.Option("--auto-cast", help="none | matmul | all [default: matmul].", rich_help_panel="Compiler"),
]
AutoCastType = Annotated[
    AutoCastTypeChoice | None,
    typer.Option(
        "--auto-cast-type", help="bf16 | fp16 | tf32 [default: bf16 when auto-casting].", rich_help_panel="Compiler"
    ),
]
Optlevel = Annotated[
    int | None,
    typer.Option(
        "--optlevel",
        "-O",
        min=1,
        max=3,
        help="neuronx-cc optimization level 1 | 2 | 3 [default: 2].",
        rich_help_panel="Compiler",
    ),
]
InlineWeights = Annotated[
    bool | None,
    typer.Option(
        "--inline-weights/--no-inline-weights",
        help="Inline weights into the NEFF [default: inline].",
        rich_help_panel="Compiler",
    ),
]
DynamicBatchSize = Annotated[
    bool,
    typer.Option(
        "--dynamic-batch-size", help="Allow batches that are multiples of the compiled one.", rich_help_panel="Shapes"
    ),
]
Target = Annotated[
    TargetChoice | None,
    typer.Option("--target", help="inf2 | trn1 | trn2 [default: inf2].", rich_help_panel="Compiler"),
]
Backend = Annotated[
    BackendChoice | None,
    typer.Option(
        "--backend",
        help="auto | neuron | cpu [default: auto: neuron when the SDK imports].",
        rich_help_panel="Compiler",
    ),
]
DisableValidation = Annotated[
    bool,
    typer.Option(
        "--disable-validation", help="Skip comparing each artifact with the eager model.", rich_help_panel="Compiler"
    ),
]
Atol = Annotated[
    float | None,
    typer.Option(
        "--atol",
        help="Largest allowed difference from the eager model [default: per backend and auto-cast].",
        rich_help_panel="Compiler",
    ),
]
Components = Annotated[
    str | None,
    typer.Option(
        "--components",
        help=f"Comma list of {component_spellings()} [default: every component the model has].",
        rich_help_panel="Compiler",
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output directory.", rich_help_panel="Output")]
Json = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print one machine-readable result object on stdout (progress lines go to stderr).",
        rich_help_panel="Output",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="HF_TOKEN",
        show_envvar=False,
        help="Hugging Face token for private models.",
        rich_help_panel="Model",
    ),
]
HubCacheDir = Annotated[
    Path | None,
    typer.Option(
        "--hub-cache-dir", help="Where hub downloads are cached [default: huggingface_hub's].", rich_help_panel="Model"
    ),
]
Offline = Annotated[bool, typer.Option("--offline", help="Use only the local hub cache.", rich_help_panel="Model")]
Jobs = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        help="Components built at once, each in its own process [default: 1].",
        rich_help_panel="Compiler",
    ),
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="Host memory the builds may use together, e.g. 20GiB [default: what is available].",
        rich_help_panel="Compiler",
    ),
]
CacheDir = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Component cache [default: $NEURON_EXPORT_CACHE or ~/.cache/neuron-export].",
        rich_help_panel="Cache",
    ),
]
SetOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--set", metavar="KEY=VALUE", help="Override one key: --set height=768 (repeatable).", rich_help_panel="Output"
    ),
]

# --- replacement VAE and LoRA adapters (each LoRA option once per --lora, in the same order) ---
Vae = Annotated[
    str | None,
    typer.Option(
        "--vae",
        help="Replacement VAE (hub id or directory), e.g. stabilityai/sd-vae-ft-mse; the source's VAE weights are not read.",
        rich_help_panel="Add-ons",
    ),
]
Lora = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        metavar="PATH_OR_ID",
        help="LoRA to fuse before tracing: hub id, directory or .safetensors file (repeatable; several are combined).",
        rich_help_panel="Add-ons",
    ),
]
LoraWeightName = Annotated[
    list[str] | None,
    typer.Option(
        "--lora-weight-name",
        metavar="NAME",
        help="The LoRA's .safetensors file in its directory or repo (once per --lora).",
        rich_help_panel="Add-ons",
    ),
]
LoraAdapterName = Annotated[
    list[str] | None,
    typer.Option(
        "--lora-adapter-name",
        metavar="NAME",
        help="Adapter name (once per --lora) [default: default_0, default_1, ...].",
        rich_help_panel="Add-ons",
    ),
]
LoraScale = Annotated[
    list[float] | None,
    typer.Option(
        "--lora-scale",
        metavar="F",
        help="Scale of the LoRA, from -10 to 10 (once per --lora) [default: 1.0].",
        rich_help_panel="Add-ons",
    ),
]
RemoteCacheUrl = Annotated[
    str | None,
    typer.Option(
        "--remote-cache",
        metavar="URL",
        help="Shared cache hosts read and write: s3://bucket/prefix, file:///shared/path, hf://datasets/org/name [default: $NEURON_EXPORT_REMOTE_CACHE].",
        rich_help_panel="Cache",
    ),
]
RemoteCacheRequired = Annotated[
    bool,
    typer.Option(
        "--remote-cache-required",
        help="Fail when the remote cache cannot be used, instead of building locally.",
        rich_help_panel="Cache",
    ),
]
RemoteCacheSigningKey = Annotated[
    Path | None,
    typer.Option(
        "--remote-cache-signing-key",
        metavar="FILE",
        help="Ed25519 private key (`cache keygen`) that signs what is uploaded to the remote cache; its public key is trusted too [default: $NEURON_EXPORT_REMOTE_CACHE_SIGNING_KEY].",
        rich_help_panel="Cache",
    ),
]
RemoteCacheTrustedKey = Annotated[
    list[str] | None,
    typer.Option(
        "--remote-cache-trusted-key",
        metavar="KEY",
        help="Public key (ed25519:...) or .pub file whose signed remote entries are used (repeatable) [default: $NEURON_EXPORT_REMOTE_CACHE_TRUSTED_KEYS, comma or space separated].",
        rich_help_panel="Cache",
    ),
]
RemoteCacheAllowUnsigned = Annotated[
    bool,
    typer.Option(
        "--remote-cache-allow-unsigned",
        help="A private bucket: use unsigned or untrusted remote entries too, and upload unsigned without a signing key.",
        rich_help_panel="Cache",
    ),
]
Executor = Annotated[
    ExecutorChoice | None,
    typer.Option(
        "--executor",
        help="local | ray: build missing components here, or as tasks on a Ray cluster (needs --remote-cache) [default: local].",
        rich_help_panel="Compiler",
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        metavar="HOST:PORT",
        help="The Ray cluster for --executor ray ('auto': the one started on this host) [default: $RAY_ADDRESS].",
        rich_help_panel="Compiler",
    ),
]
ConfigFiles = Annotated[
    list[Path],
    typer.Argument(
        metavar="CONFIG.yaml...",
        help="YAML configs, e.g. configs/sdxl-base-1024.yaml; several build as one set of jobs.",
    ),
]

# --- ControlNet and IP-Adapter (optimum-cli's --controlnet_ids / --ip_adapter_* spellings: cli/spellings.py) ---
ControlNet = Annotated[
    list[str] | None,
    typer.Option(
        "--controlnet",
        metavar="ID_OR_DIR",
        help="ControlNet (hub id or directory); repeat for several, in the order their control images are given.",
        rich_help_panel="Add-ons",
    ),
]
IpAdapter = Annotated[
    str | None,
    typer.Option(
        "--ip-adapter",
        help="IP-Adapter repository (hub id or directory), e.g. h94/IP-Adapter (SD only).",
        rich_help_panel="Add-ons",
    ),
]
IpAdapterSubfolder = Annotated[
    str | None,
    typer.Option(
        "--ip-adapter-subfolder",
        help="Folder of the adapter's weights in that repository, e.g. models.",
        rich_help_panel="Add-ons",
    ),
]
IpAdapterWeightName = Annotated[
    str | None,
    typer.Option(
        "--ip-adapter-weight-name",
        help="The adapter's weight file, e.g. ip-adapter-full-face_sd15.safetensors.",
        rich_help_panel="Add-ons",
    ),
]
IpAdapterScale = Annotated[
    float | None,
    typer.Option(
        "--ip-adapter-scale", help="Weight of the image prompt, 0 to 1 [default: 1.0].", rich_help_panel="Add-ons"
    ),
]
