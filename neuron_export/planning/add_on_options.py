"""The ControlNet, IP-Adapter and InstructPix2Pix options of an ExportSpec, checked together (config.py calls
this from its validator; the models themselves are checked in conditioning.py once their configs are read)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neuron_export.planning.config import ExportSpec

IP_ADAPTER_SCALE_RANGE = (0.0, 1.0)  # 0 ignores the image prompt, 1 weighs it like the text


def conditioning_checks(config: ExportSpec) -> None:
    """ControlNet, IP-Adapter and InstructPix2Pix options that cannot go together, found before any file is read."""
    if config.ip_adapter is None:
        given = [
            name for name in ("ip_adapter_subfolder", "ip_adapter_weight_name") if getattr(config, name) is not None
        ]
        if given or config.ip_adapter_scale is not None:
            name = (given or ["ip_adapter_scale"])[0]
            raise ValueError(
                f"{name} is set but ip_adapter is not; pass --ip-adapter ID_OR_DIR too, or drop --{name.replace('_', '-')}"
            )
    else:
        if config.ip_adapter_weight_name is None:
            raise ValueError(
                f"ip_adapter = '{config.ip_adapter}' needs ip_adapter_weight_name, the adapter's weight file "
                "(e.g. ip-adapter-full-face_sd15.safetensors); add --ip-adapter-weight-name"
            )
        low, high = IP_ADAPTER_SCALE_RANGE
        if config.ip_adapter_scale is not None and not low <= config.ip_adapter_scale <= high:
            raise ValueError(
                f"ip_adapter_scale = {config.ip_adapter_scale} is out of range; pass a value from {low:g} "
                f"(image prompt ignored) to {high:g} (as strong as the text)"
            )
        if config.family != "sd":
            raise ValueError(
                f"ip_adapter is not available for `neuron-export {config.family}`: optimum-neuron 0.4.5's "
                "SDXL and LCM pipelines cannot feed image embeds to a compiled UNet; export with "
                "`neuron-export sd`, or drop --ip-adapter"
            )
    if config.ip_adapter is not None and config.controlnet:
        raise ValueError(
            "ip_adapter and controlnet cannot be combined: optimum-neuron's ControlNet pipelines ignore "
            "IP-Adapter images; drop one of the two"
        )
    if config.controlnet and (config.family == "lcm" or config.task != "text-to-image"):
        what = "`neuron-export lcm`" if config.family == "lcm" else f"--task {config.task}"
        raise ValueError(
            f"controlnet is not available with {what}: optimum-neuron has ControlNet pipelines for SD and "
            "SDXL text-to-image only; use `neuron-export sd` or `sd-xl` with --task text-to-image"
        )
    if (config.ip_adapter is not None) and config.task != "text-to-image":
        raise ValueError(f"ip_adapter is not available with --task {config.task}; use --task text-to-image")
    if config.task == "instruct-pix2pix":
        if config.family != "sd":
            raise ValueError(
                f"--task instruct-pix2pix is not available for `neuron-export {config.family}`; use `neuron-export sd`"
            )
