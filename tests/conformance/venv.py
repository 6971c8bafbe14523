"""Runs tests/conformance/optimum_runner.py in the conformance virtualenv and returns its parsed JSON.

Importable from our main pytest process: standard library only (no torch, no optimum). The virtualenv
(.venv-conformance, created by tests/conformance/setup_env.sh, which `make install` runs) holds optimum-neuron
0.4.5 on torch 2.13.0; the runner executes there with PYTHONPATH=tests/doubles (our Neuron SDK test doubles)
and USE_TORCH_XLA=0.

    from tests.conformance import venv            # or: sys.path.insert(0, "tests/conformance"); import venv
    if not venv.available(): pytest.skip(venv.unavailable_reason())
    out = venv.export({"model": tiny_sd, "output": tmp / "opt-sd", "height": 64, "width": 64})
    out["results"][0]["calls"]        # one dict per torch_neuronx.trace call, after_trace merged in
    out = venv.generate([{"export_dir": ours, "pipeline": "NeuronStableDiffusionPipeline",
                          "source_dir": tiny_sd, "kwargs": {"prompt": "a cat", "num_inference_steps": 2}}])
    out["results"][0]["max_abs_diff"]
    venv.config({"export_dir": ours})["results"][0]["components"]["unet"]["neuron"]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DOUBLES = REPO / "tests" / "doubles"
RUNNER = HERE / "optimum_runner.py"
SETUP_SCRIPT = HERE / "setup_env.sh"
DEFAULT_VENV = REPO / ".venv-conformance"
STAMP_NAME = ".conformance-stamp"
DEFAULT_TIMEOUT = 900.0


class RunnerError(RuntimeError):
    """The runner process itself failed (not a case: failed cases come back with ok: false)."""


def venv_dir() -> Path:
    return Path(os.environ.get("CONFORMANCE_VENV", DEFAULT_VENV))


def python() -> Path:
    return venv_dir() / "bin" / "python"


def unavailable_reason() -> str | None:
    """None when the virtualenv is complete; otherwise why not and how to make it."""
    if not python().exists():
        return f"{venv_dir()} does not exist: run `bash {SETUP_SCRIPT.relative_to(REPO)}` (or `make install`)"
    if not (venv_dir() / STAMP_NAME).exists():
        return f"{venv_dir()} is incomplete: rerun `bash {SETUP_SCRIPT.relative_to(REPO)}`"
    return None


def available() -> bool:
    return unavailable_reason() is None


def environment(record: str | Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The runner's environment: ours minus anything that would leak our own stack into the venv."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in (
            "PYTHONPATH",
            "PYTHONHOME",
            "VIRTUAL_ENV",
            "TORCH_NEURONX_RECORD",
            "TORCH_NEURONX_FAIL_ON",
            "NEURON_FUSE_SOFTMAX",
            "NEURON_CUSTOM_SILU",
            "TORCHDYNAMO_DISABLE",
        )
    }
    env.update(
        {
            "PYTHONPATH": str(DOUBLES),
            "USE_TORCH_XLA": "0",
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONNOUSERSITE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    if record is not None:
        env["TORCH_NEURONX_RECORD"] = str(record)
    env.update(extra or {})
    return env


def command(subcommand: str, request_path: str | Path, output_path: str | Path) -> list[str]:
    """The runner's command line."""
    return [str(python()), str(RUNNER), subcommand, str(request_path), "--output", str(output_path)]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value


def run(
    subcommand: str,
    cases: dict[str, Any] | Iterable[dict[str, Any]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Runs one subcommand ("export", "generate", "config") on one case or a list of cases in ONE process.

    Returns the runner's JSON: {"command", "results": [one per case, in order, each with "ok"],
    "import_seconds", "total_seconds", "versions"}, plus "stderr" (its last 20,000 characters).
    Raises RunnerError if the process fails or writes no result (a failing case does not)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RunnerError(reason)
    request = _jsonable(cases if isinstance(cases, dict) else list(cases))
    with tempfile.TemporaryDirectory(prefix="conformance-") as tmp:
        request_path, output_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request_path.write_text(json.dumps(request))
        try:
            process = subprocess.run(
                command(subcommand, request_path, output_path),
                env=environment(extra=extra_env),
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RunnerError(f"optimum_runner {subcommand} timed out after {timeout} s") from exc
        if process.returncode != 0 or not output_path.exists():
            raise RunnerError(
                f"optimum_runner {subcommand} exited with {process.returncode}:\n{process.stderr[-6000:]}"
            )
        result = json.loads(output_path.read_text())
    result["stderr"] = process.stderr[-20000:]
    return result


def export(cases: dict[str, Any] | Iterable[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """optimum-neuron's exporter on each case (see optimum_runner.py for the keys)."""
    return run("export", cases, **kwargs)


def generate(cases: dict[str, Any] | Iterable[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """optimum-neuron's pipelines on exports, each compared with diffusers on its source."""
    return run("generate", cases, **kwargs)


def config(cases: dict[str, Any] | Iterable[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """What optimum-neuron's loader reads from each component's config.json."""
    return run("config", cases, **kwargs)


def write_test_image(path: str | Path, height: int, width: int, seed: int = 0, mask: bool = False) -> Path:
    """A PNG whose pixels span [0, 255] exactly (optimum's img2img/inpaint normalises the init image once more
    than diffusers; with a pixel at 0 the second normalisation is skipped, so both see the same image).
    mask=True: a grayscale mask, white (repaint) on the right half."""
    import numpy as np  # in our main environment; no torch
    from PIL import Image

    path = Path(path)
    if mask:
        array = np.zeros((height, width), dtype=np.uint8)
        array[:, width // 2 :] = 255
        Image.fromarray(array, mode="L").save(path)
        return path
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    array[0, 0] = 0
    array[-1, -1] = 255
    Image.fromarray(array, mode="RGB").save(path)
    return path


def portable_pipeline(source: str | Path, target: str | Path) -> Path:
    """A copy of a local diffusers pipeline (files hard-linked where unchanged) that both transformers lines
    load: transformers 5 saves CLIPTextModel weights without the "text_model." prefix that transformers 4.57
    expects, and 4.57 then silently initialises the text encoder at random ("newly initialized" warning).
    Keys get the prefix back; transformers 5 loads the prefixed layout too (hub checkpoints use it).
    Idempotent; other folders and files are linked as they are. Needs safetensors + numpy, not torch."""
    from safetensors.numpy import load_file, save_file

    source, target = Path(source), Path(target)
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        config = path.parent / "config.json"
        architectures = json.loads(config.read_text()).get("architectures") or [] if config.exists() else []
        if path.suffix == ".safetensors" and "CLIPTextModel" in architectures:
            tensors = load_file(str(path))
            renamed = {
                key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in tensors.items()
            }
            save_file(renamed, str(destination), metadata={"format": "pt"})
        elif not destination.exists():
            try:
                os.link(path, destination)
            except OSError:
                destination.write_bytes(path.read_bytes())
    return target


if __name__ == "__main__":  # python3 tests/conformance/venv.py SUBCOMMAND REQUEST.json
    print(json.dumps(run(sys.argv[1], json.loads(Path(sys.argv[2]).read_text())), indent=1))
