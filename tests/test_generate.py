"""`neuron-export generate` and `neuron_export.runtime`: exports run through diffusers' own pipelines.

Every kind of tiny CPU export must give the same images as diffusers' eager pipeline loaded from the
original folder (same class, scheduler, steps and seed); requests that do not fit the compiled shapes are
refused before any artifact loads; the Neuron loading decisions are checked with a recording stand-in for
the `torch_neuronx` module (the real SDK cannot run here).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from neuron_export.errors import ExportError
from neuron_export.manifest import read_manifest

PROMPT = "a photo of the dog"
STEPS = 3
ATOL = 1e-4  # measured: a few 1e-6 (the UNet runs per compiled chunk instead of one doubled batch)


def init_image(seed: int = 0):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def mask_image():
    from PIL import Image

    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 24:56] = 255
    return Image.fromarray(mask)


# --- the exports under test ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One export and how to build the eager reference for it."""

    name: str
    command: str  # sd | sd-xl | lcm
    model: str  # tiny example kind
    pipeline: str  # diffusers class, for export and eager reference
    task: str = "text-to-image"
    unet: str | None = None  # tiny example kind of a replacement UNet (LCM-SDXL)
    flags: tuple[str, ...] = ()
    call: dict[str, Any] = field(default_factory=dict)  # extra generate arguments
    prompts: tuple[str, ...] = (PROMPT,)
    images_per_prompt: int = 1
    lcm_scheduler: bool = False


CASES = {
    case.name: case
    for case in (
        Case("sd", "sd", "sd", "StableDiffusionPipeline"),
        Case("sd-img2img", "sd", "sd", "StableDiffusionImg2ImgPipeline", "image-to-image", call={"strength": 0.7}),
        Case("sd-inpaint", "sd", "sd-inpaint", "StableDiffusionInpaintPipeline", "inpainting", call={"strength": 0.9}),
        Case("sdxl", "sd-xl", "sdxl", "StableDiffusionXLPipeline"),
        Case("sdxl-inpaint", "sd-xl", "sdxl", "StableDiffusionXLInpaintPipeline", "inpainting", call={"strength": 0.9}),
        Case(
            "sdxl-refiner",
            "sd-xl",
            "sdxl-refiner",
            "StableDiffusionXLImg2ImgPipeline",
            "image-to-image",
            call={"strength": 0.7},
        ),
        Case("lcm", "lcm", "lcm", "LatentConsistencyModelPipeline"),
        Case(
            "lcm-img2img",
            "lcm",
            "lcm",
            "LatentConsistencyModelImg2ImgPipeline",
            "image-to-image",
            call={"strength": 0.8},
        ),
        # guidance given: the SDXL class's default (5.0) is not what generate uses for an LCM UNet (LCM's 8.5;
        # tests/test_generate_lcm_sdxl.py checks that default)
        Case(
            "lcm-sdxl",
            "sd-xl",
            "sdxl",
            "StableDiffusionXLPipeline",
            unet="lcm-sdxl-unet",
            lcm_scheduler=True,
            call={"guidance_scale": 8.5},
        ),
        # 2 prompts x 2 images: the UNet is compiled at 4 and guidance hands it 8 (two chunks); the VAE
        # encoder is compiled at 4 and gets the one init image (padded, then the padding dropped).
        Case(
            "sd-img2img-b2n2",
            "sd",
            "sd",
            "StableDiffusionImg2ImgPipeline",
            "image-to-image",
            flags=("--batch-size", "2", "--num-images-per-prompt", "2"),
            call={"strength": 0.7},
            prompts=(PROMPT, "the cat"),
            images_per_prompt=2,
        ),
    )
}


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory, cli):
    """Factory: ``export("sd")`` -> the CPU export of that case, built once per module through the CLI."""
    built: dict[str, pathlib.Path] = {}
    root = tmp_path_factory.mktemp("exports")

    def get(name: str) -> pathlib.Path:
        if name not in built:
            case = CASES[name]
            out = root / name
            args = [
                case.command,
                "-m",
                tiny_model(case.model),
                "--task",
                case.task,
                "--backend",
                "cpu",
                "--disable-validation",
                "-o",
                out,
                *case.flags,
            ]
            if case.unet:
                args += ["--unet", tiny_model(case.unet)]
            done = cli(*args)
            assert done.exit_code == 0, done
            built[name] = out
        return built[name]

    return get


def call_arguments(case: Case) -> dict[str, Any]:
    arguments = dict(case.call)
    if case.task != "text-to-image":
        arguments["image"] = init_image()
    if case.task == "inpainting":
        arguments["mask"] = mask_image()
    return arguments


def eager_pipeline(case: Case, tiny_model) -> Any:
    """diffusers' own pipeline from the ORIGINAL tiny folder, with the scheduler the export runs."""
    import diffusers

    extra: dict[str, Any] = {}
    if case.unet:
        extra["unet"] = diffusers.UNet2DConditionModel.from_pretrained(tiny_model(case.unet))
    pipe = getattr(diffusers, case.pipeline).from_pretrained(tiny_model(case.model), **extra)
    if case.lcm_scheduler:
        pipe.scheduler = diffusers.LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def eager_images(case: Case, tiny_model) -> np.ndarray:
    """The eager pipeline at the same steps and seed; guidance and strength left to its defaults, as ours are."""
    import torch

    pipe = eager_pipeline(case, tiny_model)
    arguments = call_arguments(case)
    if "mask" in arguments:
        arguments["mask_image"] = arguments.pop("mask")
    if case.task == "text-to-image" or case.task == "inpainting":
        arguments.update(height=64, width=64)
    return pipe(
        list(case.prompts),
        num_inference_steps=STEPS,
        num_images_per_prompt=case.images_per_prompt,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        **arguments,
    ).images


def assert_only_compiled_shapes(pipe: Any, export_dir: pathlib.Path) -> None:
    """Every artifact call the adapters made used exactly the shapes the manifest records."""
    manifest = read_manifest(export_dir)
    runners = {"unet": pipe.unet.runner, "vae_decoder": pipe.vae.decoder_runner}
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            runners[name] = getattr(pipe, name).runner
    if manifest.pipeline.task != "text-to-image":  # text-to-image exports carry an encoder they never call
        runners["vae_encoder"] = pipe.vae.encoder_runner
    for name, runner in runners.items():
        compiled = tuple(tuple(spec.shape) for spec in manifest.components[name].inputs)
        assert runner.calls, f"{name} was never called"
        assert set(runner.calls) == {compiled}, name


# --- equality with diffusers' eager pipelines ------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_export_matches_the_eager_pipeline(export, tiny_model, name):
    import diffusers

    from neuron_export.runtime.generation import generate_images
    from neuron_export.runtime.loading import load_pipeline

    case = CASES[name]
    export_dir = export(name)
    pipe = load_pipeline(export_dir)
    assert type(pipe) is getattr(diffusers, case.pipeline)
    if case.lcm_scheduler or case.command == "lcm":
        assert isinstance(pipe.scheduler, diffusers.LCMScheduler)
    steps_seen: list[tuple[int, int]] = []
    ours = generate_images(
        export_dir,
        list(case.prompts),
        steps=STEPS,
        seed=0,
        output_type="np",
        pipeline=pipe,
        on_step=lambda step, total: steps_seen.append((step, total)),
        **call_arguments(case),
    )
    reference = eager_images(case, tiny_model)

    assert ours.shape == reference.shape == (len(case.prompts) * case.images_per_prompt, 64, 64, 3)
    difference = float(np.abs(ours - reference).max())
    print(f"{name}: max abs diff vs eager {difference:.3g}")
    assert difference < ATOL
    assert steps_seen and steps_seen[-1][0] == steps_seen[-1][1] == len(steps_seen)
    assert_only_compiled_shapes(pipe, export_dir)


def test_the_refiner_pipeline_has_no_text_encoder(export):
    from neuron_export.runtime.loading import load_pipeline

    pipe = load_pipeline(export("sdxl-refiner"))
    assert pipe.text_encoder is None and pipe.tokenizer is None
    assert pipe.text_encoder_2 is not None and pipe.config.requires_aesthetics_score is True


def test_adapters_expose_what_the_pipelines_read(export):
    import torch

    from neuron_export.runtime.loading import load_pipeline

    pipe = load_pipeline(export("sdxl"))
    assert pipe.unet.add_embedding.linear_1.in_features == 80
    assert pipe.unet.config.addition_time_embed_dim == 8
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder_2.dtype == torch.float32
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert pipe.text_encoder_2.config.projection_dim == 32
    assert pipe.device == torch.device("cpu")
    ids = torch.zeros(1, 77, dtype=torch.long)
    out = pipe.text_encoder_2(ids, output_hidden_states=True)
    assert out[0].shape == out.text_embeds.shape == (1, 32)
    assert out.hidden_states[-2].shape == (1, 77, 32)
    latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode()
    assert pipe.vae.decode(latents).sample.shape == (1, 3, 64, 64)


# --- defaults: `generate` with no flags is diffusers' default call --------------------------------------------


def written_pixels(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as written:
        return np.asarray(written.convert("RGB")).astype(np.int16)


def spy_on_defaults(pipe: Any) -> dict[str, Any]:
    """Records the steps (and strength) diffusers actually uses when the caller passes none."""
    used: dict[str, Any] = {}
    set_timesteps = pipe.scheduler.set_timesteps

    def record_steps(num_inference_steps: Any = None, *args: Any, **kwargs: Any) -> Any:
        used.setdefault("steps", num_inference_steps)
        return set_timesteps(num_inference_steps, *args, **kwargs)

    pipe.scheduler.set_timesteps = record_steps
    if hasattr(pipe, "get_timesteps"):
        get_timesteps = pipe.get_timesteps

        def record_strength(num_inference_steps: Any, strength: Any, *args: Any, **kwargs: Any) -> Any:
            used.setdefault("strength", strength)
            return get_timesteps(num_inference_steps, strength, *args, **kwargs)

        pipe.get_timesteps = record_strength
    return used


@pytest.mark.parametrize("name", ["sd", "sdxl", "lcm", "sd-img2img"])
def test_generate_without_flags_is_the_diffusers_default_call(export, tiny_model, tmp_path, cli, name):
    import torch

    case = CASES[name]
    out = tmp_path / "out.png"
    args = ["generate", export(name), "--prompt", PROMPT, "-o", out]
    extra: dict[str, Any] = {}
    if case.task == "image-to-image":
        init_image().save(tmp_path / "init.png")
        args += ["--image", tmp_path / "init.png"]
        extra["image"] = init_image()
    done = cli(*args)
    assert done.exit_code == 0, done
    first_line = done.stdout.splitlines()[0]

    pipe = eager_pipeline(case, tiny_model)
    used = spy_on_defaults(pipe)
    reference = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(0), **extra).images[0]
    strength = f" strength={used['strength']}" if "strength" in used else ""
    assert first_line == (
        f"generate: steps={used['steps']} guidance={float(pipe.guidance_scale)}{strength} seed=0 "
        f"size=64x64 (height x width) images=1 (defaults: {case.pipeline}.__call__)"
    )
    ours, theirs = written_pixels(out), np.asarray(reference.convert("RGB")).astype(np.int16)
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1  # float outputs agree to ~1e-6; 8-bit rounding can differ by one


def test_a_turbo_export_defaults_to_its_model_card(export, tiny_model, tmp_path, cli):
    import torch

    turbo = tmp_path / "turbo"
    shutil.copytree(export("sdxl"), turbo)
    manifest = json.loads((turbo / "manifest.json").read_text())
    manifest["source"]["model_id"] = "stabilityai/sdxl-turbo"  # what an export of the hub checkpoint records
    (turbo / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out.png"
    done = cli("generate", turbo, "--prompt", PROMPT, "-o", out)
    assert done.exit_code == 0, done
    first_line = done.stdout.splitlines()[0]
    assert first_line == (
        "generate: steps=1 guidance=0.0 seed=0 size=64x64 (height x width) images=1 "
        "(defaults: the stabilityai/sdxl-turbo model card)"
    )
    pipe = eager_pipeline(CASES["sdxl"], tiny_model)
    card_call = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(0))
    assert np.abs(written_pixels(out) - np.asarray(card_call.images[0]).astype(np.int16)).max() <= 1


# --- the command ------------------------------------------------------------------------------------------


def test_generate_writes_a_png_of_the_compiled_size(export, tmp_path, cli):
    from PIL import Image

    out = tmp_path / "out.png"
    done = cli("generate", export("sd"), "--prompt", PROMPT, "--steps", "2", "-o", out)
    assert done.exit_code == 0, done
    with Image.open(out) as written:
        assert written.format == "PNG" and written.size == (64, 64)
    stdout = done.stdout
    assert "step 2/2" in stdout  # plain progress lines when not on a terminal
    assert f"to {out}" in stdout


def test_several_images_become_one_grid(export, tmp_path, cli):
    from PIL import Image

    init = tmp_path / "init.png"
    init_image().resize((96, 80)).save(init)
    out = tmp_path / "grid.png"
    args = [
        "generate",
        export("sd-img2img-b2n2"),
        "-p",
        PROMPT,
        "-p",
        "the cat",
        "--image",
        init,
        "--strength",
        "0.7",
        "--steps",
        "2",
        "-o",
        out,
    ]
    done = cli(*args)
    assert done.exit_code == 0, done
    with Image.open(out) as written:
        assert written.size == (128, 128)  # 2 prompts (rows) x 2 images per prompt (columns)
    stdout = done.stdout
    assert "resized to the compiled 64x64" in stdout
    assert "2x2 grid" in stdout


def test_one_prompt_with_batch_size_fills_the_compiled_batch(export, tmp_path, cli, no_artifact_loads):
    out = tmp_path / "grid.png"
    args = [
        "generate",
        export("sd-img2img-b2n2"),
        "-p",
        PROMPT,
        "--batch-size",
        "2",
        "--image",
        tmp_path / "missing.png",
        "-o",
        out,
    ]
    done = cli(*args)
    assert done.exit_code == 2
    assert "--image" in done.stderr  # the batch fits; the missing image is what is refused
    assert not out.exists()


@pytest.fixture
def no_artifact_loads(monkeypatch):
    """Fails the test if anything loads a TorchScript artifact."""
    import torch

    loaded: list[str] = []

    def refuse(path, *args, **kwargs):
        loaded.append(str(path))
        raise AssertionError(f"artifact loaded: {path}")

    monkeypatch.setattr(torch.jit, "load", refuse)
    return loaded


def test_a_shape_mismatch_fails_before_loading_and_writes_nothing(export, tmp_path, cli, no_artifact_loads):
    out = tmp_path / "out.png"
    code, _, err = cli("generate", export("sd"), "--prompt", PROMPT, "--height", "128", "-o", out)
    assert code == 2
    assert "--height 128 does not fit this export, compiled for height 64" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert no_artifact_loads == []


REFUSALS = [
    # (case, arguments, words the sentence must contain)
    ("sd", {"width": 96}, ["--width 96", "width 64"]),
    ("sd", {"num_images_per_prompt": 2}, ["--num-images-per-prompt 2", "num-images-per-prompt 1"]),
    ("sd", {"prompt": [PROMPT, "the cat"]}, ["batch 2", "batch 1"]),
    ("sd", {"batch_size": 3}, ["batch 3", "batch 1"]),
    ("sd-img2img-b2n2", {"prompt": [PROMPT], "image": "init"}, ["batch 1", "batch 2"]),
    (
        "sd-img2img-b2n2",
        {"prompt": [PROMPT, "the cat"], "image": "init", "num_images_per_prompt": 1},
        ["--num-images-per-prompt 1", "num-images-per-prompt 2"],
    ),
    ("sd-inpaint", {"image": "init"}, ["--mask", "inpainting"]),
    ("sd-inpaint", {"mask": "mask"}, ["--image", "inpainting"]),
    ("sd-img2img", {}, ["--image", "image-to-image"]),
    ("sd-img2img", {"image": "init", "mask": "mask"}, ["--mask", "inpainting"]),
    ("sd", {"mask": "mask"}, ["--mask", "text-to-image"]),
    ("sd", {"image": "init"}, ["--image", "text-to-image"]),
    ("sd", {"strength": 0.5}, ["--strength", "text-to-image"]),
    ("sd-img2img", {"image": "init", "steps": 2, "strength": 0.3}, ["--steps 2", "--strength 0.3", "--steps 4"]),
    ("sd-img2img", {"image": "init", "strength": 1.5}, ["--strength 1.5"]),
    ("lcm", {"negative_prompt": "blurry"}, ["--negative-prompt"]),
    ("lcm", {"steps": 60}, ["--steps 60", "50"]),
    ("lcm-img2img", {"image": "init", "strength": 0.1, "steps": 6}, ["--steps 6", "(5)"]),
    ("sd", {"steps": 0}, ["--steps 0"]),
]


@pytest.mark.parametrize(("name", "arguments", "words"), REFUSALS)
def test_requests_that_do_not_fit_are_refused_before_loading(
    export, tmp_path, no_artifact_loads, name, arguments, words
):
    from neuron_export.runtime.generation import generate_images

    init = tmp_path / "init.png"
    init_image().save(init)
    mask = tmp_path / "mask.png"
    mask_image().save(mask)
    files = {"init": init, "mask": mask}
    arguments = {key: files.get(value, value) if isinstance(value, str) else value for key, value in arguments.items()}
    prompt = arguments.pop("prompt", PROMPT)
    with pytest.raises(ExportError) as error:
        generate_images(export(name), prompt, **arguments)
    message = str(error.value)
    for word in words:
        assert word in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence
    assert no_artifact_loads == []


def test_a_directory_without_manifest_is_refused(tmp_path):
    from neuron_export.runtime.generation import generate_images

    with pytest.raises(ExportError, match="has no manifest.json"):
        generate_images(tmp_path, PROMPT)


def test_an_unwritable_output_is_refused_before_loading(export, tmp_path, cli, no_artifact_loads):
    missing = cli("generate", export("sd"), "-p", PROMPT, "-o", tmp_path / "missing" / "out.png")
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    assert cli("generate", export("sd"), "-p", PROMPT, "-o", tmp_path / "out.unknownext").exit_code == 2


# --- the Neuron path, with a recording stand-in for torch_neuronx -------------------------------------------


class RecordingDataParallel:
    """Test double of torch_neuronx.DataParallel: splits dim 0 over the device ids like the real one and
    records the shapes each "NeuronCore" receives; runs the CPU TorchScript underneath."""

    def __init__(self, owner: RecordingTorchNeuronx, module: Any, device_ids: list[int], **kwargs: Any) -> None:
        self.module = module
        self.device_ids = list(device_ids)
        self.kwargs = kwargs
        self.core_calls: list[tuple[int, tuple[tuple[int, ...], ...]]] = []
        owner.data_parallel.append(self)

    def __call__(self, *inputs: Any) -> Any:
        import torch

        pieces = [torch.chunk(tensor, len(self.device_ids)) for tensor in inputs]
        outputs = []
        for core, chunk in zip(self.device_ids, zip(*pieces)):
            self.core_calls.append((core, tuple(tuple(t.shape) for t in chunk)))
            outputs.append(self.module(*chunk))
        return concat(outputs)


def concat(parts: list[Any]) -> Any:
    import torch

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {key: concat([part[key] for part in parts]) for key in first}
    return tuple(concat([part[index] for part in parts]) for index in range(len(first)))


class RecordingTorchNeuronx(types.ModuleType):
    """Test double of the `torch_neuronx` module (injected via sys.modules); records placement calls."""

    def __init__(self) -> None:
        super().__init__("torch_neuronx")
        self.data_parallel: list[RecordingDataParallel] = []
        self.moved: list[tuple[Any, int]] = []
        self.core_sets: list[tuple[Any, int, int]] = []
        self.experimental = types.SimpleNamespace(set_neuron_cores=self._set_neuron_cores)

    def DataParallel(self, module: Any, device_ids: list[int], **kwargs: Any) -> RecordingDataParallel:
        return RecordingDataParallel(self, module, device_ids, **kwargs)

    def move_trace_to_device(self, module: Any, device_id: int) -> None:
        self.moved.append((module, device_id))

    def _set_neuron_cores(self, module: Any, start_nc: int, nc_count: int) -> None:
        self.core_sets.append((module, start_nc, nc_count))


def as_neuron_export(source: pathlib.Path, target: pathlib.Path, inline_weights: bool = True) -> pathlib.Path:
    """A copy of a CPU export whose manifest says backend "neuron" (its artifacts stay CPU TorchScript)."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for record in manifest["components"].values():
        record["backend"] = "neuron"
        config_path = target / record["name"] / "config.json"
        config = json.loads(config_path.read_text())
        config["neuron"]["inline_weights_to_neff"] = inline_weights
        config_path.write_text(json.dumps(config))
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture
def fake_neuron_sdk(monkeypatch):
    """torch_neuronx imports (as the recording double); optimum-neuron does not."""
    double = RecordingTorchNeuronx()
    monkeypatch.setitem(sys.modules, "torch_neuronx", double)
    monkeypatch.setitem(sys.modules, "optimum", None)
    monkeypatch.setitem(sys.modules, "optimum.neuron", None)
    return double


def test_neuron_guidance_pipeline_puts_only_the_unet_on_both_cores(export, tiny_model, tmp_path, fake_neuron_sdk):
    from neuron_export.runtime.generation import generate_images
    from neuron_export.runtime.loading import load_pipeline

    export_dir = as_neuron_export(export("sd"), tmp_path / "sd-neuron")
    pipe = load_pipeline(export_dir)

    assert len(fake_neuron_sdk.data_parallel) == 1
    unet_dp = fake_neuron_sdk.data_parallel[0]
    assert pipe.unet.runner.module is unet_dp and pipe.unet.runner.data_parallel
    assert unet_dp.device_ids == [0, 1] and unet_dp.kwargs == {"set_dynamic_batching": True}
    single = [pipe.text_encoder.runner, pipe.vae.encoder_runner, pipe.vae.decoder_runner]
    assert not any(runner.data_parallel for runner in single)
    assert sorted((start, count) for _, start, count in fake_neuron_sdk.core_sets) == [(0, 1)] * 3
    assert fake_neuron_sdk.moved == []  # weights inlined: nothing to move

    ours = generate_images(export_dir, PROMPT, steps=STEPS, output_type="np", pipeline=pipe)
    # the doubled guidance batch (2) is handed over whole and each core runs the compiled batch of 1
    assert {shapes[0] for _, shapes in unet_dp.core_calls} == {(1, 4, 8, 8)}
    assert [core for core, _ in unet_dp.core_calls[:2]] == [0, 1]
    reference = eager_images(CASES["sd"], tiny_model)
    assert float(np.abs(ours - reference).max()) < ATOL


def test_neuron_lcm_pipeline_puts_every_component_on_both_cores(export, tmp_path, fake_neuron_sdk):
    from neuron_export.runtime.loading import load_pipeline

    export_dir = as_neuron_export(export("lcm-img2img"), tmp_path / "lcm-neuron")
    assert read_manifest(export_dir).pipeline.data_parallel_mode == "all"
    pipe = load_pipeline(export_dir)
    wrapped = {id(dp.module) for dp in fake_neuron_sdk.data_parallel}
    assert len(fake_neuron_sdk.data_parallel) == 4  # text_encoder, unet, vae_encoder, vae_decoder
    assert all(dp.device_ids == [0, 1] for dp in fake_neuron_sdk.data_parallel)
    for runner in (pipe.text_encoder.runner, pipe.unet.runner, pipe.vae.encoder_runner, pipe.vae.decoder_runner):
        assert runner.data_parallel and id(runner.module.module) in wrapped
    assert fake_neuron_sdk.core_sets == [] and fake_neuron_sdk.moved == []


def test_neuron_non_inlined_weights_are_moved_to_the_first_core(export, tmp_path, fake_neuron_sdk):
    from neuron_export.runtime.loading import load_pipeline

    export_dir = as_neuron_export(export("sd"), tmp_path / "sd-separate", inline_weights=False)
    pipe = load_pipeline(export_dir, device_ids=(2, 3))
    moved = {id(module): device for module, device in fake_neuron_sdk.moved}
    assert moved == {
        id(pipe.text_encoder.runner.module): 2,
        id(pipe.vae.encoder_runner.module): 2,
        id(pipe.vae.decoder_runner.module): 2,
    }
    assert fake_neuron_sdk.data_parallel[0].device_ids == [2, 3]


def test_neuron_export_loads_through_optimum_neuron_when_it_imports(export, tmp_path, monkeypatch):
    import diffusers

    from neuron_export.runtime.loading import load_pipeline

    calls: list[tuple[tuple, dict]] = []

    class RecordingNeuronStableDiffusionPipeline(diffusers.StableDiffusionPipeline):
        """Test double of optimum-neuron's pipeline class: records from_pretrained."""

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> str:
            calls.append((args, kwargs))
            return "optimum pipeline"

    fake_optimum = types.ModuleType("optimum")
    fake_optimum_neuron = types.ModuleType("optimum.neuron")
    fake_optimum_neuron.NeuronStableDiffusionPipeline = RecordingNeuronStableDiffusionPipeline
    fake_optimum.neuron = fake_optimum_neuron
    monkeypatch.setitem(sys.modules, "optimum", fake_optimum)
    monkeypatch.setitem(sys.modules, "optimum.neuron", fake_optimum_neuron)

    export_dir = as_neuron_export(export("sd"), tmp_path / "sd-neuron")
    assert load_pipeline(export_dir) == "optimum pipeline"
    assert calls == [((str(export_dir),), {"data_parallel_mode": "unet"})]


def test_neuron_refiner_skips_optimum_neuron_which_cannot_load_it(export, tmp_path, monkeypatch, fake_neuron_sdk):
    import diffusers

    from neuron_export.runtime.loading import load_pipeline

    calls: list[Any] = []

    class RecordingNeuronStableDiffusionXLImg2ImgPipeline(diffusers.StableDiffusionXLImg2ImgPipeline):
        """Test double of optimum-neuron's class; optimum-neuron 0.4.5 fails on a pipeline without text_encoder."""

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> None:
            calls.append((args, kwargs))

    fake_optimum_neuron = types.ModuleType("optimum.neuron")
    fake_optimum_neuron.NeuronStableDiffusionXLImg2ImgPipeline = RecordingNeuronStableDiffusionXLImg2ImgPipeline
    fake_optimum = types.ModuleType("optimum")
    fake_optimum.neuron = fake_optimum_neuron
    monkeypatch.setitem(sys.modules, "optimum", fake_optimum)
    monkeypatch.setitem(sys.modules, "optimum.neuron", fake_optimum_neuron)

    export_dir = as_neuron_export(export("sdxl-refiner"), tmp_path / "refiner-neuron")
    pipe = load_pipeline(export_dir)
    assert calls == []
    assert pipe.text_encoder is None
    assert [dp.module is pipe.unet.runner.module.module for dp in fake_neuron_sdk.data_parallel] == [True]


def test_neuron_export_without_the_sdk_is_refused_in_one_sentence(export, tmp_path, monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "torch_neuronx", None)
    monkeypatch.setitem(sys.modules, "optimum", None)
    monkeypatch.setitem(sys.modules, "optimum.neuron", None)
    export_dir = as_neuron_export(export("sd"), tmp_path / "sd-neuron")
    out = tmp_path / "out.png"
    code, _, err = cli("generate", export_dir, "-p", PROMPT, "-o", out)
    assert code == 2
    assert "compiled for Neuron" in err and "--backend cpu" in err and "Traceback" not in err
    assert not out.exists()


# --- pieces ---------------------------------------------------------------------------------------------


def test_static_runner_chunks_and_pads_to_the_compiled_batch():
    import torch

    from neuron_export.runtime.adapters import StaticRunner

    seen: list[tuple[int, ...]] = []

    def module(x):
        seen.append(tuple(x.shape))
        return {"out": x * 2}, (x + 1,)

    runner = StaticRunner("part", module, ["x"], [[2, 3]])
    x = torch.arange(15.0).reshape(5, 3)
    out = runner(x)
    assert seen == [(2, 3), (2, 3), (2, 3)]
    assert torch.equal(out[0]["out"], x * 2) and torch.equal(out[1][0], x + 1)
    with pytest.raises(ValueError, match="compiled for"):
        runner(torch.zeros(2, 4))


def test_data_parallel_modes():
    from neuron_export.runtime.loading import data_parallel_components

    names = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    assert data_parallel_components("unet", names) == ("unet",)
    assert data_parallel_components("all", names) == tuple(names)
    assert data_parallel_components("none", names) == ()
    pixart = ["text_encoder", "transformer", "vae_encoder", "vae_decoder"]
    assert data_parallel_components("transformer", pixart) == ("transformer",)  # a diffusion transformer's name
    with pytest.raises(ExportError):
        data_parallel_components("both", names)


def test_help_stays_light():
    import subprocess

    code = "import sys, neuron_export.cli.main; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
