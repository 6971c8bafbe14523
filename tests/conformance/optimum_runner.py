"""Runs optimum-neuron 0.4.5's OWN code (export, load + generate, config reads) as the judge of our exports.

Executed inside the conformance virtualenv, never imported by our test process:

    PYTHONPATH=tests/doubles USE_TORCH_XLA=0 .venv-conformance/bin/python tests/conformance/optimum_runner.py \
        SUBCOMMAND REQUEST [--output RESULT.json]

REQUEST is a JSON file path, "-" for stdin, or inline JSON; it is one case (an object) or many (a list):
one process handles many cases, since importing optimum + diffusers costs seconds. The result is JSON, written
to --output or printed on stdout (everything else the libraries print goes to stderr). One failing case never
stops the others: each result carries "ok", and on failure "error" {stage, type, message, traceback}.
tests/conformance/venv.py builds the command line and environment and parses the result.

Subcommands (keys of a case; * = required):
  export    optimum's exporter in-process (optimum.exporters.neuron.__main__.main() with sys.argv as
            `optimum-cli export neuron` takes it), the torch_neuronx test double recording every call.
            *model, *output, task (text-to-image), batch_size (1), height, width, num_images_per_prompt,
            auto_cast (matmul), auto_cast_type (bf16), instance_type (inf2), inline_weights_neff (true),
            dynamic_batch_size (false), disable_neuron_cache (true), disable_validation (true), optlevel
            ("1"|"2"|"3"), unet (replacement UNet dir), output_hidden_states, compiler_workdir, torch_dtype,
            extra_args [..], argv [..] (replaces everything but the program name), record (JSONL path; default
            OUTPUT.parent/OUTPUT.name + ".torch_neuronx.jsonl"), allow_random_weights (false: a source whose
            weights transformers reports as not loaded / newly initialised fails the case, stage
            "source_weights").
            -> {ok, output, argv, record, seconds, components (folders with model.neuron, in trace order),
                calls [one per trace call: component, compiler_args/flags/options, kwargs, shapes, dtypes,
                environment, after_trace [...]], orphan_after_trace, files}
  generate  load an export with optimum's pipeline class and generate; run the source diffusers pipeline with
            the same scheduler (class and config as optimum's pipeline ended up with), seed and arguments.
            *export_dir, *pipeline (e.g. NeuronStableDiffusionPipeline), source_dir (none: optimum only),
            diffusers_class (default: the pipeline name without "Neuron"), source_unet (replacement UNet dir
            for the reference, e.g. LCM-SDXL), kwargs {prompt, num_inference_steps, guidance_scale, strength,
            num_images_per_prompt, height, width, image / mask_image / control_image as PNG paths, ...},
            seed (0), from_pretrained_kwargs {}, name, allow_random_weights (false, for the reference),
            loras [{path, weight_name, adapter_name, scale}] (fused into the reference as diffusers does),
            compiled_inputs {component: [input shapes]} and dynamic_batch: every call of that component
            is checked against them (as a NEFF would) and mismatches reported in shape_errors.
            -> {ok, name, data_parallel_mode, is_lcm, num_images_per_prompt, scheduler, placement {component:
                {data_parallel, device_ids, set_dynamic_batching, core_calls}}, load_events, optimum_shape,
                reference_shape, max_abs_diff, mean_abs_diff, shape_errors, seconds {load, optimum, reference}}
  config    what optimum's loader and pipeline read from each component's config.json, recorded while it
            loads the export (and, unless "call" is false, generates once).
            *export_dir, pipeline (default from model_index.json), call (kwargs; default a 2-step prompt),
            seed.
            -> {ok, components {name: {top_level {key: {present, where, stages}}, neuron {key: {...}},
                neuron_iterated [where]}}, static_reads (LOADER_READS below), static_shape_keys}

Written by us for neuron-export's conformance tests; it calls optimum-neuron, it copies none of it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("USE_TORCH_XLA", "0")  # the torch_xla placeholder is not an XLA device
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "transformer", "vae_encoder", "vae_decoder", "image_encoder")
IMAGE_KEYS_GRAYSCALE = {"mask_image"}

# What optimum-neuron 0.4.5's diffusion loader reads from each component's config.json, read from its source
# (release tag v0.4.5). "block": "top" = a top-level key of config.json, "neuron" = a key of its "neuron"
# object. "required": a missing key fails the load or the call (otherwise a default is used). The `config`
# subcommand records the reads as they happen (see ReadRecorder), which checks and extends this list.
LOADER_READS: list[dict[str, Any]] = [
    {
        "block": "top",
        "key": "neuron",
        "required": True,
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init (hasattr(config, 'neuron'))",
    },
    {
        "block": "neuron",
        "key": "compiler_type",
        "required": False,
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init (neuron.get)",
    },
    {
        "block": "neuron",
        "key": "compiler_version",
        "required": False,
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init (neuron.get); "
        "the diffusion loader does not compare it (only NeuronTracedModel._from_pretrained calls "
        "check_compiler_compatibility)",
    },
    {
        "block": "neuron",
        "key": "tensor_parallel_size",
        "required": False,
        "default": 1,
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init; used by "
        "optimum/neuron/modeling_diffusion.py NeuronDiffusionPipelineBase.set_parallel_mode",
    },
    {
        "block": "neuron",
        "key": "static_*",
        "required": True,
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init: every key starting "
        "with 'static_' (config.to_diff_dict()['neuron']) becomes an InputShapesArguments field "
        "(optimum/neuron/utils/argument_utils.py): an unknown one is a TypeError",
    },
    {
        "block": "neuron",
        "key": "task",
        "required": False,
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init (falls back to "
        "TasksManager.infer_task_from_model(DiffusionPipeline), which fails for a component)",
    },
    {
        "block": "neuron",
        "key": "model_type",
        "required": False,
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init (falls back to the "
        "top-level model_type); picks the NeuronConfig class (optimum/exporters/neuron/model_configs.py)",
    },
    {
        "block": "neuron",
        "key": "dynamic_batch_size",
        "required": True,
        "components": "all",
        "where": "optimum/neuron/modeling_diffusion.py NeuronDiffusionPipelineBase.__init__ "
        "(neuron['dynamic_batch_size'], no default); text_encoder's also by _from_pretrained "
        "(DataParallel set_dynamic_batching)",
    },
    {
        "block": "neuron",
        "key": "output_hidden_states",
        "required": False,
        "default": False,
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init; "
        "optimum/neuron/modeling_diffusion.py NeuronModelTextEncoder.forward (assert)",
    },
    {
        "block": "neuron",
        "key": "int_dtype",
        "required": False,
        "default": "int64",
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init",
    },
    {
        "block": "neuron",
        "key": "float_dtype",
        "required": False,
        "default": "fp32",
        "components": "all",
        "where": "optimum/neuron/modeling_traced.py NeuronTracedModel._neuron_config_init; inputs cast to it in "
        "optimum/neuron/modeling_diffusion.py NeuronModelVaeEncoder/VaeDecoder.forward",
    },
    {
        "block": "neuron",
        "key": "inline_weights_to_neff",
        "required": False,
        "default": True,
        "components": "all",
        "where": "optimum/neuron/modeling_diffusion.py NeuronDiffusionPipelineBase._from_pretrained "
        "(any false -> to_neuron: move_trace_to_device)",
    },
    {
        "block": "neuron",
        "key": "static_height",
        "required": True,
        "components": ["unet", "transformer"],
        "where": "optimum/neuron/modeling_diffusion.py NeuronDiffusionPipelineBase.__call__ (image height = "
        "static_height * vae_scale_factor)",
    },
    {
        "block": "neuron",
        "key": "static_width",
        "required": True,
        "components": ["unet", "transformer"],
        "where": "optimum/neuron/modeling_diffusion.py NeuronDiffusionPipelineBase.__call__",
    },
    {
        "block": "neuron",
        "key": "static_batch_size",
        "required": True,
        "components": "all",
        "where": "optimum/neuron/modeling_diffusion.py NeuronDiffusionPipelineBase.__init__ "
        "(num_images_per_prompt = unet batch // text_encoder batch)",
    },
    {
        "block": "top",
        "key": "_name_or_path",
        "required": False,
        "components": ["unet"],
        "where": "optimum/neuron/modeling_diffusion.py NeuronDiffusionPipelineBase.is_lcm ('lcm' or "
        "'latent-consistency' in it -> LCMScheduler and data_parallel_mode 'all')",
    },
    {
        "block": "top",
        "key": "output_hidden_states",
        "required": False,
        "components": ["text_encoder", "text_encoder_2"],
        "where": "optimum/exporters/neuron/model_configs.py CLIPTextNeuronConfig/"
        "CLIPTextWithProjectionNeuronConfig.outputs (names the traced outputs; SDXL needs true); "
        "optimum/neuron/modeling_diffusion.py NeuronModelTextEncoder.forward",
    },
    {
        "block": "top",
        "key": "model_type",
        "required": False,
        "components": ["text_encoder", "text_encoder_2"],
        "where": "optimum/neuron/modeling_diffusion.py NeuronModelTextEncoder.forward (t5 check)",
    },
    {
        "block": "top",
        "key": "time_cond_proj_dim",
        "required": False,
        "components": ["unet"],
        "where": "optimum/neuron/modeling_diffusion.py NeuronDiffusionPipelineBase.do_classifier_free_guidance; "
        "optimum/exporters/neuron/model_configs.py UNetNeuronConfig.inputs",
    },
    {
        "block": "top",
        "key": "block_out_channels",
        "required": False,
        "components": ["vae_decoder"],
        "where": "optimum/neuron/modeling_diffusion.py NeuronDiffusionPipelineBase.__init__ (vae_scale_factor "
        "= 2 ** (len - 1), else 8)",
    },
    # Read by diffusers' own pipeline code, which optimum's pipeline classes inherit and run over these configs
    # (diffusers 0.35; found by the `config` subcommand's recording, not by reading optimum):
    {
        "block": "top",
        "key": "sample_size",
        "required": False,
        "components": ["unet"],
        "where": "diffusers StableDiffusion*Pipeline.__init__ / StableDiffusionXL*Pipeline.__init__ (default size)",
    },
    {
        "block": "top",
        "key": "in_channels",
        "required": True,
        "components": ["unet"],
        "where": "diffusers pipelines' __call__ (num_channels_latents; inpaint checks 9)",
    },
    {
        "block": "top",
        "key": "scaling_factor",
        "required": True,
        "components": ["vae_decoder"],
        "where": "diffusers pipelines' __call__ (latents / scaling_factor before decoding); the VAE's config is the "
        "decoder's (optimum/neuron/modeling_diffusion.py NeuronModelVae.config)",
    },
    {
        "block": "top",
        "key": "latents_mean / latents_std",
        "required": False,
        "components": ["vae_decoder"],
        "where": "diffusers StableDiffusionXL*Pipeline.__call__ (hasattr checks)",
    },
    {
        "block": "top",
        "key": "force_upcast",
        "required": False,
        "components": ["vae_decoder"],
        "where": "diffusers StableDiffusionXL*Pipeline (upcast check)",
    },
    {
        "block": "top",
        "key": "projection_dim",
        "required": True,
        "components": ["text_encoder_2"],
        "where": "diffusers StableDiffusionXL*Pipeline.__call__ (text_encoder_projection_dim for add_time_ids)",
    },
    {
        "block": "top",
        "key": "use_attention_mask",
        "required": False,
        "components": ["text_encoder"],
        "where": "diffusers StableDiffusionPipeline.encode_prompt (hasattr)",
    },
]


# ------------------------------------------------------------------------------------------------ utilities


def _error(stage: str, exc: BaseException) -> dict[str, Any]:
    lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"stage": stage, "type": type(exc).__name__, "message": str(exc)[:2000], "traceback": "".join(lines)[-4000:]}


@contextlib.contextmanager
def _environment_restored() -> Iterator[None]:
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class WeightWarnings:
    """Captures transformers' warnings that a checkpoint's weights were not used / were initialised at random
    while a block runs: a source pipeline this stack cannot read correctly (e.g. a CLIPTextModel saved by
    transformers 5 without the "text_model." prefix, loaded by 4.57) makes every comparison meaningless."""

    MARKERS = ("newly initialized", "were not used when initializing")

    def __init__(self) -> None:
        import logging

        outer = self
        self.messages: list[str] = []

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                message = record.getMessage()
                if any(marker in message for marker in outer.MARKERS):
                    outer.messages.append(message[:400])

        self.handler = Handler(level=logging.WARNING)

    def __enter__(self) -> WeightWarnings:
        import logging

        logging.getLogger("transformers").addHandler(self.handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        import logging

        logging.getLogger("transformers").removeHandler(self.handler)

    def check(self, what: str, allow: bool) -> None:
        if self.messages and not allow:
            raise RuntimeError(
                f"{what}: weights not loaded from the checkpoint (random init): "
                + " | ".join(m.split(":")[0] for m in self.messages)
            )


def _double() -> Any:
    import torch_neuronx

    if not hasattr(torch_neuronx, "record_context"):
        raise RuntimeError(
            f"torch_neuronx at {torch_neuronx.__file__} is not neuron-export's test double: "
            "put tests/doubles first on PYTHONPATH"
        )
    return torch_neuronx


# --------------------------------------------------------------------------------------------------- export


def export_argv(case: dict[str, Any]) -> list[str]:
    """The `optimum-cli export neuron` arguments for a case (without the program name)."""
    if case.get("argv") is not None:
        return [str(arg) for arg in case["argv"]]
    # Extra arguments go first: a list option (nargs="*", e.g. --lora_scales) would swallow the output path.
    argv = [str(arg) for arg in case.get("extra_args", [])]
    argv += ["--model", str(case["model"]), "--task", case.get("task", "text-to-image")]
    defaults = {"batch_size": 1, "auto_cast": "matmul", "auto_cast_type": "bf16", "instance_type": "inf2"}
    for key in (
        "batch_size",
        "height",
        "width",
        "num_images_per_prompt",
        "sequence_length",
        "auto_cast",
        "auto_cast_type",
        "instance_type",
        "unet",
        "compiler_workdir",
        "torch_dtype",
        "atol",
    ):
        value = case.get(key, defaults.get(key))
        if value is not None:
            argv += [f"--{key}", str(value)]
    switches = {
        "inline_weights_neff": ("--inline-weights-neff", True),
        "dynamic_batch_size": ("--dynamic-batch-size", False),
        "disable_neuron_cache": ("--disable_neuron_cache", True),
        "disable_validation": ("--disable-validation", True),
        "output_hidden_states": ("--output_hidden_states", False),
    }
    for key, (flag, default) in switches.items():
        if case.get(key, default):
            argv.append(flag)
    if case.get("optlevel") is not None:
        argv.append(f"-O{case['optlevel']}")
    argv.append(str(case["output"]))
    return argv


@contextlib.contextmanager
def _component_names(torch_neuronx: Any) -> Iterator[None]:
    """Tells the double which component each trace call compiles: optimum's export_models calls
    convert.export(output=<dir>/<component>/model.neuron) once per component (convert.py, 0.4.5). What that returns
    (the traced input and output names) is recorded as a "component_io" event."""
    from optimum.exporters.neuron import convert

    original = convert.export

    def export(*args: Any, **kwargs: Any) -> Any:
        output = kwargs.get("output")
        component = Path(output).parent.name if output is not None else None
        with torch_neuronx.record_context(component=component):
            inputs, outputs = original(*args, **kwargs)
        # The names optimum gives the traced inputs and outputs (its NeuronConfig's), beside the calls.
        torch_neuronx._emit(
            {"event": "component_io", "component": component, "inputs": list(inputs), "outputs": list(outputs)},
            torch_neuronx._record_path(None),
        )
        return inputs, outputs

    convert.export = export
    try:
        yield
    finally:
        convert.export = original


def run_export(case: dict[str, Any], torch_neuronx: Any, calls_module: Any) -> dict[str, Any]:
    from optimum.exporters.neuron.__main__ import main as optimum_export_main

    output = Path(case["output"])
    record = Path(case.get("record") or output.parent / f"{output.name}.torch_neuronx.jsonl")
    if record.exists():
        record.unlink()
    argv = export_argv(case)
    result: dict[str, Any] = {"ok": False, "output": str(output), "argv": argv, "record": str(record)}
    started = time.perf_counter()
    try:
        with _environment_restored(), _component_names(torch_neuronx), WeightWarnings() as warned:
            os.environ["TORCH_NEURONX_RECORD"] = str(record)
            saved_argv = sys.argv
            sys.argv = ["optimum-cli", *argv]
            try:
                optimum_export_main()
            except SystemExit as exc:  # argparse errors
                if exc.code not in (0, None):
                    raise RuntimeError(f"optimum's argument parser exited with {exc.code}") from exc
            finally:
                sys.argv = saved_argv
        result["weight_warnings"] = warned.messages
        warned.check("optimum's exporter loading the source", bool(case.get("allow_random_weights")))
        result["ok"] = True
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        result["error"] = _error("source_weights" if "random init" in str(exc) else "export", exc)
    result["seconds"] = round(time.perf_counter() - started, 3)
    events = calls_module.read_events(record)
    result["calls"] = calls_module.merge_trace_calls(events)
    result["orphan_after_trace"] = calls_module.orphan_after_trace_calls(events)
    result["components"] = [call.get("component") for call in result["calls"]]
    if output.is_dir():
        result["files"] = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file())
    return result


# ------------------------------------------------------------------------------------------------- generate


def _load_images(kwargs: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    loaded = dict(kwargs)
    for key, value in kwargs.items():
        if key.endswith("image") and isinstance(value, str):
            with Image.open(value) as image:
                loaded[key] = image.convert("L" if key in IMAGE_KEYS_GRAYSCALE else "RGB")
        elif key.endswith("image") and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            images = []
            for path in value:
                with Image.open(path) as image:
                    images.append(image.convert("L" if key in IMAGE_KEYS_GRAYSCALE else "RGB"))
            loaded[key] = images
    return loaded


def _parts(pipe: Any) -> dict[str, Any]:
    """Each loaded part by export folder name; ControlNets as controlnet_<N> (a multi-ControlNet's nets in the
    order the pipeline holds them, named from the folders they were loaded from)."""
    parts = {name: getattr(pipe, name, None) for name in COMPONENTS if getattr(pipe, name, None) is not None}
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is not None:
        folders = [Path(path).parent.name for path in pipe.model_and_config_save_paths["controlnet"][0]]
        nets = getattr(controlnet, "nets", None)
        if nets is None:
            parts[folders[0]] = controlnet
        else:
            parts.update({folder: _Net(nets, index) for index, folder in enumerate(folders)})
    return parts


class _Net:
    """One net of a multi-ControlNet, with the `.model` attribute the other parts have (reads and writes the list)."""

    def __init__(self, nets: list[Any], index: int) -> None:
        self.nets, self.index = nets, index

    @property
    def model(self) -> Any:
        return self.nets[self.index]

    @model.setter
    def model(self, value: Any) -> None:
        self.nets[self.index] = value


def _placement(pipe: Any, torch_neuronx: Any) -> dict[str, Any]:
    placement = {}
    for name, part in _parts(pipe).items():
        model = getattr(part, "model", None)
        if isinstance(model, torch_neuronx.DataParallel):
            shapes: dict[str, int] = {}
            for core, input_shapes in model.core_calls:
                key = json.dumps([core, input_shapes])
                shapes[key] = shapes.get(key, 0) + 1
            placement[name] = {
                "data_parallel": True,
                "device_ids": model.device_ids,
                "set_dynamic_batching": model.dynamic_batching_enabled,
                "core_calls": [
                    {"core": json.loads(k)[0], "input_shapes": json.loads(k)[1], "count": n} for k, n in shapes.items()
                ],
            }
        else:
            placement[name] = {"data_parallel": False}
    return placement


def _load_events(pipe: Any, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The double's load-time events (DataParallel, set_neuron_cores, move_trace_to_device), named."""
    ids = {}
    for name, part in _parts(pipe).items():
        model = getattr(part, "model", None)
        ids[id(model)] = name
        ids[id(getattr(model, "module", None))] = name
    named = []
    for event in events:
        if event.get("event") in ("DataParallel", "set_neuron_cores", "move_trace_to_device"):
            entry = {k: v for k, v in event.items() if k not in ("pid", "seq", "module_id")}
            entry["component"] = ids.get(event.get("module_id"))
            named.append(entry)
    return named


def _static_size(pipe: Any) -> tuple[int, int] | None:
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    try:
        neuron = denoiser.config.neuron
        return neuron["static_height"] * pipe.vae_scale_factor, neuron["static_width"] * pipe.vae_scale_factor
    except Exception:
        return None


def _compiled_shapes_module(
    name: str, module: Any, shapes: list[list[int]], dynamic_batch: bool, errors: list[str]
) -> Any:
    """Stands between optimum's component wrapper and the module: a NEFF runs only at the shapes it was
    compiled for (a multiple of the batch with dynamic batch), while our CPU TorchScript runs at any shape,
    so every call is checked against the shapes the export says it compiled."""
    import torch

    def fits(got: list[int] | None, want: list[int]) -> bool:
        if got is None:
            return False
        if dynamic_batch and got[1:] == want[1:] and got and want and got[0] % want[0] == 0:
            return True
        return got == want

    class CompiledShapes(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, *inputs: Any) -> Any:
            got = [list(t.shape) if hasattr(t, "shape") else None for t in inputs]
            if len(got) != len(shapes) or not all(fits(g, w) for g, w in zip(got, shapes)):
                errors.append(f"{name} called with {got}, compiled for {shapes}")
            return self.inner(*inputs)

    return CompiledShapes()


def _check_compiled_shapes(
    pipe: Any, torch_neuronx: Any, compiled: dict[str, list[list[int]]], dynamic_batch: bool
) -> list[str]:
    errors: list[str] = []
    for name, part in _parts(pipe).items():
        if name not in compiled:
            continue
        parallel = isinstance(part.model, torch_neuronx.DataParallel)
        holder, attribute = (part.model, "module") if parallel else (part, "model")
        checked = _compiled_shapes_module(name, getattr(holder, attribute), compiled[name], dynamic_batch, errors)
        setattr(holder, attribute, checked)
    return errors


def _fuse_loras(pipe: Any, loras: list[dict[str, Any]]) -> None:
    """diffusers' own LoRA calls on the reference: load each adapter by name, weight them, fuse, unload."""
    if not loras:
        return
    for lora in loras:
        pipe.load_lora_weights(
            str(lora["path"]), weight_name=lora.get("weight_name"), adapter_name=lora["adapter_name"]
        )
    pipe.set_adapters([lora["adapter_name"] for lora in loras], adapter_weights=[lora["scale"] for lora in loras])
    # every component the pipeline loads LoRA into (Flux's fuse_lora() fuses only its transformer unless asked, and
    # unloading then drops the CLIP encoder's layers; SD's and SDXL's defaults are already these)
    pipe.fuse_lora(components=list(pipe._lora_loadable_modules))
    pipe.unload_lora_weights()


def run_generate(case: dict[str, Any], torch_neuronx: Any) -> dict[str, Any]:
    import diffusers
    import numpy as np
    import optimum.neuron
    import torch

    name = case.get("name") or f"{case['pipeline']}:{Path(case['export_dir']).name}"
    result: dict[str, Any] = {
        "ok": False,
        "name": name,
        "export_dir": str(case["export_dir"]),
        "pipeline": case["pipeline"],
        "seconds": {},
    }
    seed = int(case.get("seed", 0))
    kwargs = dict(case.get("kwargs") or {})
    kwargs.setdefault("output_type", "np")
    stage = "load"
    pipe = reference = None
    try:
        pipeline_cls = getattr(optimum.neuron, case["pipeline"])
        first_event = len(torch_neuronx.events)
        started = time.perf_counter()
        pipe = pipeline_cls.from_pretrained(case["export_dir"], **(case.get("from_pretrained_kwargs") or {}))
        result["seconds"]["load"] = round(time.perf_counter() - started, 3)
        result["listed_controlnet_folders"] = [
            Path(path).parent.name for path in pipe.model_and_config_save_paths.get("controlnet", ([], []))[0]
        ]
        if case.get("order_controlnets"):  # neuron-export's documented fix for the listing order
            sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
            from neuron_export.runtime.controlnets import order_controlnets

            order_controlnets(pipe)
        result["data_parallel_mode"] = pipe.data_parallel_mode
        result["is_lcm"] = bool(pipe.is_lcm)
        result["num_images_per_prompt"] = pipe.num_images_per_prompt
        result["dynamic_batch_size"] = pipe.dynamic_batch_size
        result["scheduler"] = type(pipe.scheduler).__name__
        size = _static_size(pipe)
        result["static_size"] = list(size) if size else None

        shape_errors = _check_compiled_shapes(
            pipe, torch_neuronx, case.get("compiled_inputs") or {}, bool(case.get("dynamic_batch"))
        )
        stage = "optimum_call"
        call_kwargs = _load_images(kwargs)
        started = time.perf_counter()
        ours = pipe(**call_kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images
        result["seconds"]["optimum"] = round(time.perf_counter() - started, 3)
        ours = np.asarray(ours)
        result["shape_errors"] = sorted(set(shape_errors))
        result["controlnet_folders"] = [
            Path(path).parent.name
            for path in (getattr(pipe, "model_and_config_save_paths", None) or {}).get("controlnet", ([], []))[0]
        ]
        result["optimum_shape"] = list(ours.shape)
        result["optimum_finite"] = bool(np.isfinite(ours).all())
        result["placement"] = _placement(pipe, torch_neuronx)
        result["load_events"] = _load_events(pipe, torch_neuronx.events[first_event:])
        with contextlib.suppress(Exception):
            result["do_classifier_free_guidance"] = bool(pipe.do_classifier_free_guidance)

        if case.get("source_dir"):
            stage = "reference_load"
            diffusers_name = case.get("diffusers_class") or case["pipeline"].removeprefix("Neuron")
            reference_cls = getattr(diffusers, diffusers_name)
            extra: dict[str, Any] = {"scheduler": type(pipe.scheduler).from_config(pipe.scheduler.config)}
            if case.get("source_unet"):
                extra["unet"] = diffusers.UNet2DConditionModel.from_pretrained(case["source_unet"])
            with WeightWarnings() as warned:
                if case.get("source_controlnets"):  # in the order the case's control images are given
                    nets = [diffusers.ControlNetModel.from_pretrained(path) for path in case["source_controlnets"]]
                    extra["controlnet"] = nets if len(nets) > 1 else nets[0]
                reference = reference_cls.from_pretrained(case["source_dir"], **extra)
                adapter = case.get("source_ip_adapter")
                if adapter:
                    reference.load_ip_adapter(
                        str(adapter["id"]), subfolder=adapter["subfolder"], weight_name=adapter["weight_name"]
                    )
                    reference.set_ip_adapter_scale(float(adapter["scale"]))
            result["reference_weight_warnings"] = warned.messages
            warned.check("diffusers loading the source", bool(case.get("allow_random_weights")))
            _fuse_loras(reference, case.get("loras") or [])
            reference.set_progress_bar_config(disable=True)
            stage = "reference_call"
            reference_kwargs = _load_images(kwargs)
            if size is not None:
                reference_kwargs.setdefault("height", size[0])
                reference_kwargs.setdefault("width", size[1])
            started = time.perf_counter()
            with torch.no_grad():
                theirs = reference(**reference_kwargs, generator=torch.Generator("cpu").manual_seed(seed)).images
            result["seconds"]["reference"] = round(time.perf_counter() - started, 3)
            theirs = np.asarray(theirs)
            result["reference_shape"] = list(theirs.shape)
            stage = "compare"
            if theirs.shape != ours.shape:
                raise ValueError(f"optimum produced {list(ours.shape)}, diffusers {list(theirs.shape)}")
            diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
            result["max_abs_diff"] = float(diff.max())
            result["mean_abs_diff"] = float(diff.mean())
        result["ok"] = True
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        result["error"] = _error(stage, exc)
    finally:
        del pipe, reference
        gc.collect()
    return result


# --------------------------------------------------------------------------------------------------- config


class ReadRecorder:
    """Records which config.json keys optimum's loader and pipeline read, and from where.

    DiffusersPretrainedConfig.from_json_file (what NeuronDiffusionPipelineBase._from_pretrained loads every
    component config with) is wrapped so that each config it returns records attribute reads of its keys
    (top level: the keys set at load, from the file or PretrainedConfig's defaults, plus reads of absent
    keys) and item reads of its "neuron" dict, each attributed to the code that made it (reads made by the
    config classes' own machinery, e.g. to_diff_dict or deepcopy, are not counted; reads through optimum's
    NormalizedConfig are attributed to its caller)."""

    INTERNAL_FILES = ("transformers/configuration_utils.py", "diffusers/configuration_utils.py", "/copy.py")
    PASS_THROUGH_FILES = ("optimum/utils/normalized_config.py",)

    def __init__(self) -> None:
        self.reads: list[dict[str, Any]] = []
        self.stage = "load"
        self._registry: dict[int, tuple[str, set[str], set[str]]] = {}

    def where(self) -> tuple[str | None, bool]:
        """(file:function:line of the code that read, read through NormalizedConfig); None for reads made
        by the config machinery itself (to_dict, to_diff_dict, deepcopy, ...), which are not counted."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        via_normalized = False
        while frame is not None and frame.f_code.co_filename.endswith(self.PASS_THROUGH_FILES):
            via_normalized = True
            frame = frame.f_back
        if frame is None:
            return "?", via_normalized
        filename = frame.f_code.co_filename
        if filename.endswith(self.INTERNAL_FILES):
            return None, False
        short = filename.split("site-packages/")[-1]
        return f"{short}:{frame.f_code.co_qualname}:{frame.f_lineno}", via_normalized

    def log(self, component: str, block: str, key: str, op: str, present: bool) -> None:
        where, via = self.where()
        if where is None:
            return
        self.reads.append(
            {
                "component": component,
                "block": block,
                "key": key,
                "op": op,
                "present": present,
                "where": where,
                "via_normalized_config": via,
                "stage": self.stage,
            }
        )

    def wrap(self, config: Any, path: Path) -> Any:
        recorder = self
        component = path.parent.name
        file_keys = set(json.loads(path.read_text()))
        init_keys = set(vars(config))

        class RecordingNeuronDict(dict):
            def _log(self, key: str, op: str) -> None:
                recorder.log(component, "neuron", key, op, key == "*" or dict.__contains__(self, key))

            def __getitem__(self, key: str) -> Any:
                self._log(key, "[]")
                return dict.__getitem__(self, key)

            def get(self, key: str, default: Any = None) -> Any:
                self._log(key, "get")
                return dict.get(self, key, default)

            def __contains__(self, key: object) -> bool:
                self._log(str(key), "in")
                return dict.__contains__(self, key)

            def items(self) -> Any:
                self._log("*", "items")
                return dict.items(self)

            def keys(self) -> Any:
                self._log("*", "keys")
                return dict.keys(self)

            def values(self) -> Any:
                self._log("*", "values")
                return dict.values(self)

            def __iter__(self) -> Any:
                self._log("*", "iter")
                return dict.__iter__(self)

        base = type(config)
        registry = self._registry

        def __getattribute__(self: Any, name: str) -> Any:
            entry = registry.get(id(self))
            if entry is None or name.startswith("__"):
                return base.__getattribute__(self, name)
            try:
                value = base.__getattribute__(self, name)
            except AttributeError:
                recorder.log(entry[0], "top", name, "getattr", False)
                raise
            if name in entry[1] or name in entry[2]:
                recorder.log(entry[0], "top", name, "getattr", name in entry[1])
            return value

        config.__class__ = type(f"Recording{base.__name__}", (base,), {"__getattribute__": __getattribute__})
        if isinstance(vars(config).get("neuron"), dict):
            vars(config)["neuron"] = RecordingNeuronDict(vars(config)["neuron"])
        registry[id(config)] = (component, file_keys, init_keys)
        config._recorder_keepalive = True
        return config

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        from optimum.neuron.utils import DiffusersPretrainedConfig

        original = DiffusersPretrainedConfig.__dict__.get("from_json_file")
        inherited = DiffusersPretrainedConfig.from_json_file.__func__
        recorder = self

        def from_json_file(cls: Any, json_file: Any) -> Any:
            return recorder.wrap(inherited(cls, json_file), Path(json_file))

        DiffusersPretrainedConfig.from_json_file = classmethod(from_json_file)
        try:
            yield
        finally:
            if original is None:
                del DiffusersPretrainedConfig.from_json_file
            else:
                DiffusersPretrainedConfig.from_json_file = original

    def summary(self) -> dict[str, Any]:
        components: dict[str, Any] = {}
        for read in self.reads:
            entry = components.setdefault(read["component"], {"top_level": {}, "neuron": {}, "neuron_iterated": []})
            if read["block"] == "neuron" and read["key"] == "*":
                if read["where"] not in entry["neuron_iterated"]:
                    entry["neuron_iterated"].append(read["where"])
                continue
            block = entry["top_level" if read["block"] == "top" else "neuron"]
            key = block.setdefault(read["key"], {"present": read["present"], "where": [], "stages": []})
            if read["where"] not in key["where"]:
                key["where"].append(read["where"])
            if read["stage"] not in key["stages"]:
                key["stages"].append(read["stage"])
        return components


def _pipeline_name(export_dir: Path) -> str:
    class_name = json.loads((export_dir / "model_index.json").read_text())["_class_name"]
    return f"Neuron{class_name}"


def run_config(case: dict[str, Any], torch_neuronx: Any) -> dict[str, Any]:
    import dataclasses

    import optimum.neuron
    import torch
    from optimum.neuron.utils.argument_utils import InputShapesArguments

    export_dir = Path(case["export_dir"])
    result: dict[str, Any] = {
        "ok": False,
        "export_dir": str(export_dir),
        "static_reads": LOADER_READS,
        "static_shape_keys": sorted(f"static_{f.name}" for f in dataclasses.fields(InputShapesArguments)),
    }
    recorder = ReadRecorder()
    stage = "load"
    pipe = None
    try:
        name = case.get("pipeline") or _pipeline_name(export_dir)
        result["pipeline"] = name
        with recorder.installed():
            pipe = getattr(optimum.neuron, name).from_pretrained(export_dir)
        call = case.get("call", {"prompt": "a photo of a cat", "num_inference_steps": 2})
        if call is not False:
            stage = recorder.stage = "call"
            call = _load_images({"output_type": "np", **call})
            pipe(**call, generator=torch.Generator("cpu").manual_seed(int(case.get("seed", 0))))
        result["ok"] = True
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        result["error"] = _error(stage, exc)
    finally:
        del pipe
        gc.collect()
    result["components"] = recorder.summary()
    result["files"] = {
        p.parent.name: sorted(json.loads(p.read_text())) for p in sorted(export_dir.glob("*/config.json"))
    }
    return result


# ----------------------------------------------------------------------------------------------------- main


def _read_request(text: str) -> Any:
    if text == "-":
        return json.load(sys.stdin)
    if text.lstrip().startswith(("{", "[")):
        return json.loads(text)
    return json.loads(Path(text).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("export", "generate", "config"))
    parser.add_argument("request", help="JSON file, '-' for stdin, or inline JSON: one case or a list")
    parser.add_argument("--output", help="write the JSON result here (default: stdout)")
    args = parser.parse_args(argv)
    request = _read_request(args.request)
    single = isinstance(request, dict)
    cases = [request] if single else list(request)

    real_stdout = sys.stdout
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # libraries print; our stdout carries the result only
        torch_neuronx = _double()
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import calls as calls_module  # tests/conformance/calls.py (stdlib only)

        import_started = time.perf_counter()
        if args.command == "export":
            import optimum.exporters.neuron.__main__
        else:
            import optimum.neuron  # noqa: F401
        import_seconds = time.perf_counter() - import_started
        handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "export": lambda case: run_export(case, torch_neuronx, calls_module),
            "generate": lambda case: run_generate(case, torch_neuronx),
            "config": lambda case: run_config(case, torch_neuronx),
        }
        results = []
        for case in cases:
            case_started = time.perf_counter()
            outcome = handlers[args.command](case)
            outcome["case_seconds"] = round(time.perf_counter() - case_started, 3)
            results.append(outcome)
    payload = {
        "command": args.command,
        "results": results,
        "import_seconds": round(import_seconds, 3),
        "total_seconds": round(time.perf_counter() - started, 3),
        "versions": _versions(),
    }
    text = json.dumps(payload, indent=1)
    if args.output:
        Path(args.output).write_text(text)
    else:
        real_stdout.write(text + "\n")
    return 0


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for name in ("optimum-neuron", "optimum", "diffusers", "transformers", "torch", "huggingface_hub", "torch_neuronx"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


if __name__ == "__main__":
    sys.exit(main())
