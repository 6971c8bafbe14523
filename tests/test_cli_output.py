"""What the command line prints and how it ends: progress beside --json, the export summary, one size order,
short verify, inspect in words, --version, SIGTERM and Ctrl-C, and InstructPix2Pix's dynamic batch."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli


@pytest.fixture(scope="module")
def tall(tiny_model, tmp_path_factory) -> tuple[Path, object]:
    """A non-square export: 128 high, 64 wide; and what exporting it printed."""
    out = tmp_path_factory.mktemp("tall") / "export"
    result = run_cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "--height", 128, "--width", 64, "-o", out)
    assert result.exit_code == 0, result
    return out, result


def test_json_keeps_progress_on_stderr(tiny_model, tmp_path):
    out = tmp_path / "export"
    result = run_cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "--disable-validation", "-o", out, "--json")
    assert result.exit_code == 0, result
    assert json.loads(result.stdout)["ok"] is True  # stdout: the one object, nothing else
    assert "[1/4] text_encoder:" in result.stderr and "[4/4]" in result.stderr
    assert f"to {out.resolve()}" in result.stderr


def test_the_summary_has_origins_total_time_absolute_path_and_a_next_step_that_runs(tall, tiny_model, tmp_path):
    out, result = tall
    absolute = out.resolve()
    assert f"Exported to {absolute}" in result.stdout  # the table's title
    summary = [line for line in result.stdout.splitlines() if line.startswith("Exported 4 component(s)")]
    assert len(summary) == 1 and summary[0].endswith(f"(4 built, 0 cached, 0 downloaded) to {absolute}"), result.stdout
    assert " in " in summary[0]
    next_line = [line for line in result.stdout.splitlines() if line.startswith("Next: ")][0]
    command, _, alternative = next_line[len("Next: ") :].partition("  (or: ")
    assert alternative == f"neuron-export verify {absolute})"
    # the suggested command works as printed (written somewhere harmless)
    args = shlex.split(command)
    assert args[:2] == ["neuron-export", "generate"] and args[-2:] == ["-o", "sample.png"]
    ran = run_cli(*args[1:-1], tmp_path / "sample.png", "--steps", 1)
    assert ran.exit_code == 0, ran
    # the same export twice more with this test's own cache: built, then everything from the cache
    flags = ("sd", "-m", tiny_model("sd"), "--backend", "cpu", "--height", 128, "--width", 64, "-o")
    assert "(4 built, 0 cached, 0 downloaded)" in run_cli(*flags, tmp_path / "first").stdout
    again = run_cli(*flags, tmp_path / "again")
    assert "(0 built, 4 cached, 0 downloaded)" in again.stdout, again
    assert any(line.startswith("│ unet") and "cached" in line for line in again.stdout.splitlines())


def test_height_comes_before_width_everywhere(tall, tmp_path):
    from PIL import Image

    out, result = tall
    assert "at 128x64 (height x width)" in result.stdout
    image = tmp_path / "tall.png"
    ran = run_cli("generate", out, "-p", "a", "--steps", 1, "-o", image)
    assert ran.exit_code == 0, ran
    assert "size=128x64 (height x width)" in ran.stdout.splitlines()[0]
    assert "(128x64, height x width)" in ran.stdout
    with Image.open(image) as written:
        assert written.size == (64, 128)  # PIL says (width, height)
    inspected = run_cli("inspect", out)
    assert "128x64 pixels (height x width)" in inspected.stdout, inspected


def test_verify_prints_a_short_pass_and_details_with_verbose(tall):
    out, _ = tall
    short = run_cli("verify", out)
    assert short.exit_code == 0, short
    lines = [line for line in short.stdout.splitlines() if line.strip()]
    assert len(lines) <= 6, short.stdout
    assert "Memory estimate" not in short.stdout and "assumptions:" not in short.stdout
    verbose = run_cli("verify", out, "--verbose")
    assert verbose.exit_code == 0 and "Memory estimate" in verbose.stdout and "estimate assumptions" in verbose.stdout


def test_inspect_prints_words_not_python_reprs(tiny_model, tmp_path):
    out = tmp_path / "export"
    result = run_cli(
        "sd",
        "-m",
        tiny_model("sd"),
        "--controlnet",
        tiny_model("sd-controlnet"),
        "--backend",
        "cpu",
        "--disable-validation",
        "-o",
        out,
    )
    assert result.exit_code == 0, result
    inspected = run_cli("inspect", out)
    assert inspected.exit_code == 0, inspected
    facts = inspected.stdout.split("Components")[0]
    assert f"controlnet {tiny_model('sd-controlnet')}" in " ".join(facts.split())
    for repr_mark in ("{'", "[{", "None", "True", "False"):
        assert repr_mark not in facts, (repr_mark, facts)
    assert "dynamic batch no" in facts


def test_version():
    from neuron_export.version import __version__

    result = run_cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"neuron-export {__version__}", result


def test_sigterm_exits_143_and_cleans_up(tiny_model, tmp_path):
    output = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "neuron_export",
            "sd-xl",
            "-m",
            str(tiny_model("sdxl")),
            "--backend",
            "cpu",
            "-o",
            str(output),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in process.stdout:  # the first component has started: the build is under way
        if line.startswith("[1/"):
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_the_fork_server_imports_prints_no_traceback():
    """The fork server imports torch and diffusers for seconds; Ctrl-C reaches it too (same process group)."""
    code = """
import os, signal, sys
class InterruptOnTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the preload's imports
        return None
sys.meta_path.insert(0, InterruptOnTorch())
import neuron_export.build._preload
print("preloaded")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "preloaded", done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr


def test_instruct_pix2pix_turns_on_dynamic_batch_and_says_so(tiny_model, tmp_path):
    out = tmp_path / "pix2pix"
    result = run_cli(
        "sd",
        "-m",
        tiny_model("sd-pix2pix"),
        "--task",
        "instruct-pix2pix",
        "--backend",
        "cpu",
        "--disable-validation",
        "-o",
        out,
    )
    assert result.exit_code == 0, result
    said = [line for line in result.stdout.splitlines() if "--dynamic-batch-size is on" in line]
    assert len(said) == 1 and said[0].startswith("--task instruct-pix2pix"), result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["dynamic_batch_size"] is True


def _help(*command: str) -> str:
    result = run_cli(*command, "--help")
    assert result.exit_code == 0, result
    return result.stdout


def test_help_is_per_family_and_grouped(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich help: wide enough that no value is cut
    lcm, sdxl, sd = _help("lcm"), _help("sd-xl"), _help("plan", "sd")
    for panel in ("Model", "Shapes", "Compiler", "Add-ons", "Cache", "Output"):
        assert f"─ {panel} ─" in sd, panel
    assert "--ip-adapter" in sd and "instruct-pix2pix" in sd and "--controlnet" in sd
    assert "--ip-adapter" not in lcm and "--controlnet" not in lcm and "inpainting" not in lcm
    assert "--ip-adapter" not in sdxl and "instruct-pix2pix" not in sdxl and "--controlnet" in sdxl
    assert "<str>" not in lcm.split("--backend")[1].splitlines()[0]  # a choice shows its values


def test_a_flag_of_another_family_says_which_family_takes_it(tmp_path):
    result = run_cli("sd-xl", "--ip-adapter", "h94/IP-Adapter", "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "neuron-export: error: --ip-adapter is not available for `neuron-export sd-xl`; "
        "only `neuron-export sd` takes it."
    )


@pytest.mark.parametrize(
    "words, offered",
    [
        ("sd --backend ", ["auto", "neuron", "cpu"]),
        ("lcm --task ", ["text-to-image", "image-to-image"]),
        ("sd-xl --auto-cast ", ["none", "matmul", "all"]),
    ],
)
def test_completion_offers_the_values_of_a_choice(words, offered):
    env = {
        **os.environ,
        "_NEURON_EXPORT_COMPLETE": "complete_bash",
        "COMP_WORDS": f"neuron-export {words}",
        "COMP_CWORD": str(len(words.split()) + 1),
    }
    done = subprocess.run([sys.executable, "-m", "neuron_export"], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == offered, done
