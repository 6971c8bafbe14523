"""Loading an export's artifacts (CPU TorchScript, optimum-neuron's runtime, or torch-neuronx with the
contract's core placement) into the matching diffusers pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.errors import ExportError
from neuron_export.files import ARTIFACT_NAME, COMPONENT_CONFIG
from neuron_export.manifest import Manifest
from neuron_export.roles.registry import find_role, roles_for
from neuron_export.runtime.controlnets import order_controlnets
from neuron_export.runtime.reading import (
    DATA_PARALLEL_MODES,
    NEURON_DEVICE_IDS,
    _read_json,
    check_export_complete,
    export_backend,
    read_export,
)

if TYPE_CHECKING:
    from neuron_export.runtime.adapters import StaticRunner


# passed whole to every call, whatever the batch: a ControlNet's scale, Flux's rotary embedding (one per position)
UNBATCHED_INPUTS = ("conditioning_scale", "image_rotary_emb")


def data_parallel_components(mode: str, names: Sequence[str]) -> tuple[str, ...]:
    """Which components go on both NeuronCores: the UNet in "unet" mode, everything in "all" mode."""
    if mode not in DATA_PARALLEL_MODES:
        raise ExportError(
            f"data_parallel_mode {mode!r} in the manifest is not one of {', '.join(DATA_PARALLEL_MODES)}; re-export the model."
        )
    if mode == "all":
        return tuple(names)
    if mode in ("unet", "transformer"):  # the denoiser and what takes its doubled batch (ControlNets), as optimum does
        return tuple(name for name in names if (role := find_role(name)) is not None and role.with_unet)
    return ()


class CpuArtifactLoader:
    """TorchScript on the CPU (exports built with --backend cpu)."""

    backend = "cpu"

    def load(self, name: str, path: Path, config: dict[str, Any]) -> tuple[Any, bool]:
        import torch

        from neuron_export.runtime import nxd

        return nxd.initialize(torch.jit.load(str(path), map_location="cpu"), path).eval(), False


class NeuronArtifactLoader:
    """Neuron TorchScript on an inf2/trn1 host, placed as optimum-neuron places it.

    Data-parallel components are wrapped in `torch_neuronx.DataParallel(module, [0, 1])` (dynamic batching on,
    so a batch of any size is spread over both cores); the rest run on the first core, with non-inlined
    weights moved there explicitly.
    """

    backend = "neuron"

    def __init__(
        self, torch_neuronx: Any, mode: str, names: Sequence[str], device_ids: Sequence[int] = NEURON_DEVICE_IDS
    ) -> None:
        self.torch_neuronx = torch_neuronx
        self.device_ids = list(device_ids)
        self.parallel = set(data_parallel_components(mode, names))

    def load(self, name: str, path: Path, config: dict[str, Any]) -> tuple[Any, bool]:
        import torch

        from neuron_export.runtime import nxd

        module = nxd.initialize(torch.jit.load(str(path)), path)  # a sharded role's weights: its shards, per rank
        if name in self.parallel:
            return self.torch_neuronx.DataParallel(module, self.device_ids, set_dynamic_batching=True), True
        experimental = getattr(self.torch_neuronx, "experimental", None)
        if experimental is not None and hasattr(experimental, "set_neuron_cores"):
            experimental.set_neuron_cores(module, start_nc=self.device_ids[0], nc_count=1)
        if not (config.get("neuron") or {}).get("inline_weights_to_neff", True):
            self.torch_neuronx.move_trace_to_device(module, self.device_ids[0])
        return module, False


def import_torch_neuronx(export_dir: Path) -> Any:
    try:
        import torch_neuronx
    except Exception:  # the PyPI placeholder raises ImportError("WRONG PACKAGE ..."); others may fail differently
        raise ExportError(
            f"EXPORT_DIR {export_dir} was compiled for Neuron (backend neuron) and runs only on an inf2/trn1 "
            "host with torch-neuronx installed; run it there, or re-export with --backend cpu to try it "
            "on this machine."
        ) from None
    return torch_neuronx


def optimum_pipeline_class(manifest: Manifest) -> Any:
    """optimum-neuron's pipeline class for this export, or None when it does not import or cannot run it."""
    if manifest.pipeline.architecture == "sdxl-refiner":
        return None  # optimum-neuron 0.4.5 cannot load a pipeline without text_encoder (KeyError)
    try:
        import optimum.neuron as optimum_neuron

        cls = getattr(optimum_neuron, manifest.pipeline.optimum_pipeline)
    except Exception:
        return None
    try:
        import diffusers

        if not issubclass(cls, getattr(diffusers, manifest.pipeline.diffusers_pipeline)):
            return None  # e.g. no LCM image-to-image pipeline there: ours runs it
    except Exception:
        return None
    return cls


def _lcm_scheduler(scheduler: Any) -> Any:
    from diffusers import LCMScheduler

    return scheduler if isinstance(scheduler, LCMScheduler) else LCMScheduler.from_config(scheduler.config)


def load_pipeline(
    export_dir: Path,
    manifest: Manifest | None = None,
    *,
    use_optimum: bool = True,
    device_ids: Sequence[int] = NEURON_DEVICE_IDS,
) -> Any:
    """The export as a ready diffusers pipeline: CPU TorchScript, optimum-neuron's runtime, or ours on Neuron."""
    export_dir = Path(export_dir)
    manifest = manifest or read_export(export_dir)
    check_export_complete(export_dir, manifest)
    backend = export_backend(export_dir, manifest)
    if backend == "neuron":
        cls = optimum_pipeline_class(manifest) if use_optimum else None
        if cls is not None:
            pipe = order_controlnets(
                cls.from_pretrained(str(export_dir), data_parallel_mode=manifest.pipeline.data_parallel_mode)
            )
            if manifest.pipeline.is_lcm:
                pipe.scheduler = _lcm_scheduler(pipe.scheduler)
            return pipe
        torch_neuronx = import_torch_neuronx(export_dir)
        loader: Any = NeuronArtifactLoader(
            torch_neuronx, manifest.pipeline.data_parallel_mode, list(manifest.components), device_ids
        )
    elif backend == "cpu":
        loader = CpuArtifactLoader()
    else:
        raise ExportError(
            f"EXPORT_DIR {export_dir} was built by backend {backend!r}, which `generate` cannot run; re-export with --backend cpu or neuron."
        )
    return assemble_pipeline(export_dir, manifest, loader)


def _runner(export_dir: Path, manifest: Manifest, name: str, loader: Any) -> tuple[StaticRunner, dict[str, Any]]:
    record = manifest.components[name]
    config = _read_json(export_dir / name / COMPONENT_CONFIG)
    module, data_parallel = loader.load(name, export_dir / name / ARTIFACT_NAME, config)
    from neuron_export.runtime.adapters import StaticRunner  # imports torch: only when loading

    runner = StaticRunner(
        name,
        module,
        [spec.name for spec in record.inputs],
        [spec.shape for spec in record.inputs],
        data_parallel=data_parallel,
        unbatched=UNBATCHED_INPUTS,
    )
    return runner, config


def _processor(export_dir: Path, index: dict[str, Any], name: str) -> Any:
    """tokenizer / tokenizer_2 / feature_extractor from the export's folder, by the class model_index names."""
    entry = index.get(name)
    folder = export_dir / name
    if not entry or entry[0] is None or not folder.is_dir():
        return None
    import transformers

    library, class_name = entry
    cls = getattr(transformers, class_name, None)
    if cls is None:
        cls = transformers.AutoTokenizer if name.startswith("tokenizer") else transformers.AutoImageProcessor
    return cls.from_pretrained(folder)


def load_components(export_dir: Path, manifest: Manifest, loader: Any) -> dict[str, Any]:
    """Pipeline argument -> its stand-in: each role's adapter around the artifacts of the slot it fills."""
    from neuron_export.runtime.adapters import LoadedPart  # imports torch: only when loading

    slots: dict[str, tuple[Any, list[LoadedPart]]] = {}
    for role in roles_for(manifest.pipeline.architecture or None):
        for name in sorted((n for n in manifest.components if role.matches(n)), key=role.index):
            parts = slots.setdefault(role.slot, (role.make_adapter(), []))[1]
            parts.append(
                LoadedPart(name, *_runner(export_dir, manifest, name, loader), manifest.components[name].outputs)
            )
    return {slot: adapter(parts) for slot, (adapter, parts) in slots.items()}


def assemble_pipeline(export_dir: Path, manifest: Manifest, loader: Any) -> Any:
    """Adapters around each artifact + the export's processors -> manifest.pipeline.diffusers_pipeline."""
    import diffusers

    index = _read_json(export_dir / "model_index.json")
    components = load_components(export_dir, manifest, loader)
    scheduler_entry = index.get("scheduler") or ["diffusers", "EulerDiscreteScheduler"]
    scheduler_cls = getattr(diffusers, scheduler_entry[1])
    scheduler = scheduler_cls.from_config(_read_json(export_dir / "scheduler" / "scheduler_config.json"))
    if manifest.pipeline.is_lcm:
        scheduler = _lcm_scheduler(scheduler)
    components["scheduler"] = scheduler
    for name in ("tokenizer", "tokenizer_2", "feature_extractor"):
        components[name] = _processor(export_dir, index, name)

    pipeline_cls = getattr(diffusers, manifest.pipeline.diffusers_pipeline)
    kwargs: dict[str, Any] = {}
    for parameter in list(inspect.signature(pipeline_cls.__init__).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        name = parameter.name
        if name in components:
            kwargs[name] = components[name]
        elif name in ("safety_checker", "image_encoder", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            kwargs[name] = None  # not part of the export (the refiner has no text_encoder)
        elif name in index and not isinstance(index[name], list):
            kwargs[name] = index[name]  # force_zeros_for_empty_prompt, requires_aesthetics_score, ...
        elif name == "requires_safety_checker":
            kwargs[name] = False
    if manifest.pipeline.architecture.startswith("pixart"):  # no resolution binning, which picks another size
        pipeline_cls = _static_text_pipeline(pipeline_cls, manifest, {"use_resolution_binning": False})
    elif manifest.pipeline.architecture.startswith("flux"):  # FluxPipeline would default to 1024 px
        size = {"height": manifest.pipeline.height, "width": manifest.pipeline.width}
        pipeline_cls = _static_text_pipeline(pipeline_cls, manifest, size)
    pipe = pipeline_cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _static_text_pipeline(pipeline_cls: Any, manifest: Manifest, defaults: dict[str, Any]) -> Any:
    """A diffusion-transformer pipeline whose call takes the export's sequence length (the text tokens its
    transformer was compiled for, as optimum-neuron's PixArt runtime forces it) and `defaults` (its compiled size);
    a caller's own values still win."""
    import functools

    transformer = manifest.components.get("transformer")
    lengths = [t.shape[1] for t in (transformer.inputs if transformer else []) if t.name == "encoder_hidden_states"]
    length = int(lengths[0]) if lengths else None

    @functools.wraps(pipeline_cls.__call__)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if length is not None:
            kwargs.setdefault("max_sequence_length", length)
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        return pipeline_cls.__call__(self, *args, **kwargs)

    return type(pipeline_cls.__name__, (pipeline_cls,), {"__call__": call, "__module__": pipeline_cls.__module__})
