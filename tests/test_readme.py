"""Every ```bash and ```python block of README.md runs, in order, as a user would run it, so an example that stops
working fails the suite.

How the README's world is stood in for (nothing in the README's text is rewritten except as listed here):
- Hub ids resolve from a local Hugging Face cache (HF_HUB_CACHE, offline) whose snapshots are the tiny random-weight
  pipelines and adapters of neuron_export.testing.examples / example_lora / example_adapters: HUB_STAND_INS below. To stand
  in for a new hub id, add a line there.
- Export, plan and build commands get `--backend cpu` (this host has no Neuron SDK): BACKEND_COMMANDS.
- Sizes shrink with the models: a height or width of 256 pixels or more, on the command line or in a config, is
  divided by SHRINK (1024 -> 128), as the tiny pipelines' native 64 stands for the real ones' 512.
- The user's own files the README names (images, YAML configs, ./my-style-lora) are made first: LOCAL_FILES.
- S3 is moto's S3 server on 127.0.0.1 (its buckets made first); a shared directory or another host is a scratch
  folder: URL_STAND_INS.
- A line ending in `# (not run in tests: REASON)`, or a block whose first line says it, is skipped; README.md's
  "Development" section documents this, and the list is kept short.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = re.compile(r"#\s*\(not run in tests: [^)]+\)\s*$")
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"

# hub id -> (what stands in for it, how to make it into a directory): an example pipeline or add-on, or a LoRA.
HUB_STAND_INS: dict[str, tuple[str, dict]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd", {}),
    "stabilityai/stable-diffusion-2-1-base": ("sd", {}),
    "nitrosocke/Ghibli-Diffusion": ("sd", {}),
    "Lykon/dreamshaper-7": ("sd", {}),
    "stabilityai/sd-vae-ft-mse": ("sd", {}),
    "stable-diffusion-v1-5/stable-diffusion-inpainting": ("sd-inpaint", {}),
    "timbrooks/instruct-pix2pix": ("sd-pix2pix", {}),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", {}),
    "stabilityai/sdxl-turbo": ("sdxl", {}),
    "stabilityai/stable-diffusion-xl-refiner-1.0": ("sdxl-refiner", {}),
    "SimianLuo/LCM_Dreamshaper_v7": ("lcm", {}),
    "PixArt-alpha/PixArt-Sigma-XL-2-512-MS": ("pixart-sigma", {}),
    "PixArt-alpha/PixArt-XL-2-512x512": ("pixart-alpha", {}),
    # the tiny Flux has 2 attention heads (its T5 4): the README's --tensor-parallel-size 2 divides them
    "black-forest-labs/FLUX.1-dev": ("flux", {}),
    "latent-consistency/lcm-sdxl": ("lcm-sdxl-unet", {}),
    "lllyasviel/sd-controlnet-canny": ("sd-controlnet", {}),
    "lllyasviel/sd-controlnet-depth": ("sd-controlnet", {"seed": 1}),
    "diffusers/controlnet-canny-sdxl-1.0": ("sdxl-controlnet", {}),
    "h94/IP-Adapter": (
        "sd-ip-adapter",
        {
            "seed": 0,
            "file_names": {
                "models/ip-adapter-full-face_tiny.safetensors": "models/ip-adapter-full-face_sd15.safetensors"
            },
        },
    ),
    "latent-consistency/lcm-lora-sdv1-5": ("lora", {"base": "sd"}),
    "ostris/super-cereal-sdxl-lora": (
        "lora",
        {"base": "sdxl", "weight_names": ["cereal_box_sdxl_v1.safetensors", "cereal_box_sdxl_v1_alt.safetensors"]},
    ),
}
BACKEND_COMMANDS = re.compile(r"\bneuron-export (plan )?(sd-xl|sd|lcm|pixart|flux|build)\b")
URL_STAND_INS: dict[str, Callable[[Path, str], str]] = {
    "http://minio.internal:9000": lambda scratch, s3: s3,
    "file:///mnt/shared/neuron-export": lambda scratch, s3: f"file://{scratch}/shared",
}
S3_BUCKETS = ("my-bucket", "cache", "bucket")
SHRINK = 8
SIZES = re.compile(r"(--height |--width |height=|width=|height: |width: )([0-9][0-9,]*)")


def shrink(text: str) -> str:
    def smaller(match: re.Match) -> str:
        values = [int(v) // SHRINK if int(v) >= 256 else int(v) for v in match.group(2).split(",") if v]
        return match.group(1) + ",".join(map(str, values))

    return SIZES.sub(smaller, text)


def blocks() -> Iterator[tuple[int, str, str]]:
    """(line number, language, text) of each bash and python block."""
    lines = README.read_text().splitlines()
    index = 0
    while index < len(lines):
        match = re.fullmatch(r"```(bash|python)\s*", lines[index])
        index += 1
        if not match:
            continue
        start, body = index, []
        while not lines[index].startswith("```"):
            body.append(lines[index])
            index += 1
        yield start, match.group(1), "\n".join(body)


def commands(text: str) -> list[str]:
    """A bash block's commands: continuation lines joined; comment lines and marked lines left out."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#") and not NOT_RUN.search(command):
            result.append(command)
    return result


def _make_stand_in(kind: str, options: dict, directory: Path, examples: Callable[[str], Path]) -> None:
    from neuron_export.testing.examples import build_example
    from neuron_export.testing.lora import build_lora

    if kind == "lora":
        for seed, name in enumerate(options.get("weight_names", ["pytorch_lora_weights.safetensors"])):
            build_lora(examples(options["base"]), directory, seed=seed, weight_name=name)
    elif "seed" in options:
        build_example(kind, directory, seed=options["seed"])
        for ours, theirs in options.get("file_names", {}).items():  # the file named as the hub repo names it
            (directory / ours).rename(directory / theirs)
    else:
        directory.symlink_to(examples(kind))


def hub_cache(root: Path, examples: Callable[[str], Path]) -> Path:
    """A Hugging Face cache holding one snapshot per hub id the README names."""
    for repo, (kind, options) in HUB_STAND_INS.items():
        folder = root / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(FAKE_COMMIT)
        (folder / "snapshots").mkdir()
        _make_stand_in(kind, options, folder / "snapshots" / FAKE_COMMIT, examples)
    return root


def local_files(scratch: Path, examples: Callable[[str], Path]) -> None:
    """The files a README user has at hand: images, their own configs, their own LoRA."""
    from PIL import Image

    from neuron_export.testing.lora import build_lora

    for name in ("edges.png", "depth.png", "face.png", "photo.png"):
        Image.new("RGB", (64, 64), (120, 60, 30)).save(scratch / name)
    (scratch / "sdxl.yaml").write_text("family: sd-xl\n")
    (scratch / "sd15.yaml").write_text("family: sd\n")
    build_lora(examples("sdxl"), scratch / "my-style-lora", seed=7)
    (scratch / "configs").mkdir()
    for config in (README.parent / "configs").glob("*.yaml"):
        (scratch / "configs" / config.name).write_text(shrink(config.read_text()))


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory, tiny_model, s3_endpoint) -> dict:
    import fsspec

    scratch = tmp_path_factory.mktemp("readme")
    hub = hub_cache(scratch / "hub", tiny_model)
    local_files(scratch, tiny_model)
    s3 = fsspec.filesystem("s3", client_kwargs={"endpoint_url": s3_endpoint})
    for bucket in S3_BUCKETS:
        s3.mkdir(bucket)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "HOME": str(scratch / "home"),
        "NEURON_EXPORT_CACHE": str(scratch / "cache"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("NEURON_EXPORT_REMOTE_CACHE", None)
    # A CI runner's secret and repository variable (the Trust section's CI block): a key pair made here.
    (scratch / "runner").mkdir()
    subprocess.run(
        [sys.executable, "-m", "neuron_export", "cache", "keygen", str(scratch / "ci-secret")],
        env=env,
        check=True,
        capture_output=True,
    )
    env.update(
        RUNNER_TEMP=str(scratch / "runner"),
        CACHE_SIGNING_KEY=(scratch / "ci-secret").read_text(),
        CACHE_PUBLIC_KEY=(scratch / "ci-secret.pub").read_text().strip(),
    )
    return {"scratch": scratch, "env": env, "s3": s3_endpoint}


def prepare(command: str, world: dict) -> tuple[str, dict]:
    """The README's command with the stand-ins of the module docstring applied."""
    command = shrink(BACKEND_COMMANDS.sub(lambda m: m.group(0) + " --backend cpu", command))
    for url, stand_in in URL_STAND_INS.items():
        command = command.replace(url, stand_in(world["scratch"], world["s3"]))
    env = dict(world["env"])
    if "$CONFIG" in command:  # a CI runner's matrix entry: the first build the plan listed
        env["CONFIG"] = json.dumps(json.loads((world["scratch"] / "builds.json").read_text())[0])
    return command, env


BLOCKS = list(blocks())


@pytest.mark.parametrize("line,language,text", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_block_runs(readme_world, line, language, text):
    scratch = readme_world["scratch"]
    first = text.splitlines()[0]
    if first.startswith("#") and NOT_RUN.search(first):  # a comment line opening the block marks all of it
        pytest.skip(first)
    if language == "python":
        script = scratch / f"readme_{line}.py"
        script.write_text(text)
        runs = [(f"python block at README.md:{line}", lambda: ([sys.executable, str(script)], readme_world["env"]))]
    else:  # each command prepared just before it runs: it may read what the one before wrote
        runs = [(command, lambda command=command: bash(*prepare(command, readme_world))) for command in commands(text)]
    for what, argv_and_env in runs:
        argv, env = argv_and_env()
        done = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{what}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def bash(command: str, env: dict) -> tuple[list[str], dict]:
    return ["bash", "-o", "pipefail", "-c", command], env


def test_the_not_run_list_is_short():
    """Lines the README test skips are marked in the README itself; a growing list is a smell, not a fix."""
    marked = [line for _, _, text in BLOCKS for line in text.splitlines() if NOT_RUN.search(line)]
    assert 0 < len(marked) <= 12, marked
