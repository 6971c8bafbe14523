"""torch_neuronx.trace with explicit neuronx-cc flags per component kind and model family.

The flags come from a table, never from a model's path or class name (the reference exporter's
substring matching silently drops them for local paths).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

NAME = "neuron"
COMPILER_TYPE = "neuronx-cc"

FAST_LOADING = "--enable-fast-loading-neuron-binaries"
# Per component kind and model family: the model-type hint and whether fast loading is on.
# The SDXL UNet is compiled without fast loading, as optimum-neuron does.
MODEL_FLAGS: dict[tuple[str, bool], tuple[str, ...]] = {
    ("text_encoder", False): ("--model-type=transformer", FAST_LOADING),
    ("text_encoder", True): ("--model-type=transformer", FAST_LOADING),
    ("text_encoder_2", True): ("--model-type=transformer", FAST_LOADING),
    ("unet", False): (FAST_LOADING, "--model-type=unet-inference"),
    ("unet", True): ("--model-type=unet-inference",),
    ("vae_encoder", False): (FAST_LOADING, "--model-type=unet-inference"),
    ("vae_encoder", True): (FAST_LOADING, "--model-type=unet-inference"),
    ("vae_decoder", False): (FAST_LOADING, "--model-type=unet-inference"),
    ("vae_decoder", True): (FAST_LOADING, "--model-type=unet-inference"),
}
AUTO_CAST_FLAG = {"none": "none", "matmul": "matmult", "all": "all"}  # neuronx-cc spells it "matmult"
# Set while tracing diffusion models: fused softmax in attention and the custom SiLU kernel.
COMPILE_ENVIRONMENT = {"NEURON_FUSE_SOFTMAX": "1", "NEURON_CUSTOM_SILU": "1"}


def compiler_args(component: str, is_xl: bool, auto_cast: str, auto_cast_type: str | None,
                  optlevel: int, target: str) -> list[str]:
    args = ["--auto-cast", AUTO_CAST_FLAG[auto_cast]]
    if auto_cast != "none" and auto_cast_type:
        args += ["--auto-cast-type", auto_cast_type]
    args += ["--optlevel", str(optlevel), "--target", target]
    return args + list(MODEL_FLAGS[(component, is_xl)])


def compiler_version() -> str:
    try:
        import neuronxcc

        return str(getattr(neuronxcc, "__version__", "unknown"))
    except Exception:
        return "unknown"


@contextlib.contextmanager
def compile_environment() -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in COMPILE_ENVIRONMENT}
    os.environ.update(COMPILE_ENVIRONMENT)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def compile(wrapper: Any, example_inputs: list[Any], compiler_args: list[str], inline_weights: bool,
            workdir: Path) -> Any:
    import torch_neuronx

    workdir.mkdir(parents=True, exist_ok=True)
    with compile_environment():
        return torch_neuronx.trace(
            wrapper,
            tuple(example_inputs),
            compiler_args=compiler_args,
            inline_weights_to_neff=inline_weights,
            compiler_workdir=str(workdir),
        )


def load(path: Path) -> Any:
    import torch
    import torch_neuronx  # noqa: F401  (registers the Neuron ops TorchScript needs to load)

    return torch.jit.load(str(path))


def validation_skip_reason() -> str | None:
    """Running a compiled NEFF needs a NeuronCore; compiling does not."""
    if not any(Path("/dev").glob("neuron*")):
        return "skipped: no Neuron device"
    return None
