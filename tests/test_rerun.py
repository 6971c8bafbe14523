"""A rerun of an unchanged export answers from the plan and the manifest: the build machinery and the libraries
only a build needs stay unimported, so the answer is quick (scripts/bench_rerun.py times it; tests assert no time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# What a rerun must not import: the models' libraries, the build's processes, its caches' transfer, YAML, rich.
NOT_NEEDED = (
    "torch",
    "diffusers",
    "transformers",
    "huggingface_hub",
    "safetensors",
    "ray",
    "rich",
    "yaml",
    "psutil",
    "multiprocessing",
    "neuron_export.build.parent",
    "neuron_export.build.worker",
    "neuron_export.store.supply",
    "neuron_export.store.remote",
)


def rerun_in_a_fresh_process(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`neuron-export ARGS` in a new interpreter, and which of NOT_NEEDED it imported; listing every installed
    distribution (pydantic's plugin search reads each one's entry points) counts as the module "all distributions"."""
    code = (
        "import importlib.metadata, json, sys\nlisted = []\nevery = importlib.metadata.distributions\n"
        "importlib.metadata.distributions = lambda **kw: listed.append(kw) or every(**kw)\n"
        "from neuron_export.cli.main import main\n"
        f"try:\n    main({list(args)!r})\nexcept SystemExit as exc:\n    print('EXIT', exc.code)\n"
        f"print('IMPORTED', json.dumps([m for m in {NOT_NEEDED!r} if m in sys.modules]"
        " + ['all distributions'] * bool(listed)), file=sys.stderr)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}  # the CLI's own choice
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    imported = [line for line in result.stderr.splitlines() if line.startswith("IMPORTED ")]
    assert len(imported) == 1, result
    return result, json.loads(imported[0].removeprefix("IMPORTED "))


def test_a_rerun_imports_nothing_only_a_build_needs(cli, tiny_model, tmp_path):
    args = ["sd", "-m", str(tiny_model("sd")), "--backend", "cpu", "-o", str(tmp_path / "out")]
    assert cli(*args).exit_code == 0
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "out").rglob("*")}

    result, imported = rerun_in_a_fresh_process(*args)
    assert "is up to date" in result.stdout and "EXIT" not in result.stdout, result
    assert imported == []
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "out").rglob("*")} == before

    result, imported = rerun_in_a_fresh_process(*args, "--json")
    answer = json.loads(result.stdout)
    assert answer["up_to_date"] is True and {c["origin"] for c in answer["components"].values()} == {"cached"}, answer
    assert imported == []
