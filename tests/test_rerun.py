"""A rerun of an unchanged export answers from the plan and the manifest: the build machinery and the libraries
only a build needs stay unimported, so the answer is quick (scripts/bench_rerun.py times it; tests assert no time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import hub_repository

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


def run_as_the_command(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], str]:
    """`neuron-export ARGS` as its own process (the console script's `main()`), and how it answered: "quick"
    (from the rerun record: typer and pydantic never imported) or "full"."""
    code = (
        "import sys\nfrom neuron_export.cli.main import main\ntry:\n    main()\nfinally:\n    "
        "print('ANSWERED', 'full' if 'typer' in sys.modules or 'pydantic' in sys.modules else 'quick', file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env or dict(os.environ)
    )
    answered = [line for line in result.stderr.splitlines() if line.startswith("ANSWERED ")]
    assert len(answered) == 1, result
    result.stderr = result.stderr.replace(answered[0] + "\n", "")
    return result, answered[0].removeprefix("ANSWERED ")


@pytest.mark.slow  # several processes, one a build
def test_a_rerun_answers_as_the_full_command_does_without_typer_or_pydantic(cli, tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model("sd"), model)
    args = ["sd", "-m", str(model), "--backend", "cpu", "-o", str(tmp_path / "out")]
    built, how = run_as_the_command(*args)  # the build keeps the answer a rerun would give
    assert built.returncode == 0 and "Exported 4 component(s)" in built.stdout and how == "full", built
    for extra in ([], ["--json"]):
        full = cli(*args, *extra)  # in-process: never answered from a record
        quick, how = run_as_the_command(*args, *extra)
        assert how == ("quick" if not extra else "full"), quick  # --json is other arguments: its first rerun is full
        assert (quick.returncode, quick.stdout, quick.stderr) == (0, full.stdout, full.stderr)
        quick, how = run_as_the_command(*args, *extra)
        assert how == "quick" and (quick.returncode, quick.stdout, quick.stderr) == (0, full.stdout, full.stderr)
        assert "is up to date" in (quick.stderr if extra else quick.stdout)


@pytest.mark.slow  # several processes, one a build
def test_a_changed_source_output_environment_or_install_runs_the_whole_command(cli, tiny_model, tmp_path):
    model, site = tmp_path / "model", tmp_path / "site"
    shutil.copytree(tiny_model("sd"), model)
    site.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    args = ["sd", "-m", str(model), "--backend", "cpu", "-o", str(tmp_path / "out")]
    assert cli(*args).exit_code == 0
    assert run_as_the_command(*args, env=env)[1] == "full"  # keeps the answer
    assert run_as_the_command(*args, env=env)[1] == "quick"

    # the UNet's config changes: the whole command runs and sees the output no longer matches
    unet_config = model / "unet" / "config.json"
    text = unet_config.read_text()
    unet_config.write_text(json.dumps({**json.loads(text), "norm_eps": 1e-6}))
    result, how = run_as_the_command(*args, env=env)
    assert how == "full" and result.returncode == 2 and "pass --force to replace it" in result.stderr, result
    unet_config.write_text(text)  # the same bytes again: up to date, answered in full once, then quickly
    assert run_as_the_command(*args, env=env)[1] == "full"
    assert run_as_the_command(*args, env=env)[1] == "quick"

    # another value of any environment variable is another command
    assert run_as_the_command(*args, env={**env, "NEURON_EXPORT_ANY": "1"})[1] == "full"

    # a package installed beside the others (a new entry on sys.path's folders)
    (site / "newly_installed.py").write_text("")
    assert run_as_the_command(*args, env=env)[1] == "full"
    assert run_as_the_command(*args, env=env)[1] == "quick"

    # the output's manifest rewritten, with its old size and times put back: its inode and ctime still differ
    manifest = tmp_path / "out" / "manifest.json"
    stat, text = manifest.stat(), manifest.read_text()
    manifest.unlink()
    manifest.write_text(text)
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert run_as_the_command(*args, env=env)[1] == "full"

    # a component removed from the output: the whole command runs and says so
    shutil.rmtree(tmp_path / "out" / "vae_decoder")
    result, how = run_as_the_command(*args, env=env)
    assert how == "full" and result.returncode == 2 and "vae_decoder/model.neuron missing" in result.stderr, result


@pytest.mark.slow  # several processes
def test_a_rerun_from_the_hub_is_always_answered_in_full(cli, tiny_model, tmp_path, isolated_cache):
    hub = tmp_path / "hub"
    hub_repository(hub, "tiny/sd", tiny_model("sd"), "0123456789abcdef0123456789abcdef01234567")
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    args = ["sd", "-m", "tiny/sd", "--backend", "cpu", "-o", str(tmp_path / "out")]
    built, how = run_as_the_command(*args, env=env)
    assert built.returncode == 0 and how == "full", built
    for _ in range(2):  # whether the Hub has a newer revision is the Hub's to say: no record is kept
        result, how = run_as_the_command(*args, env=env)
        assert how == "full" and result.returncode == 0 and "is up to date" in result.stdout, result
    assert not (isolated_cache / "reruns").exists()


def test_only_the_most_recent_records_are_kept(monkeypatch, isolated_cache):
    from neuron_export.cli import rerun

    monkeypatch.setattr(rerun, "RECORD_LIMIT", 2)
    for index in range(4):
        rerun.Recording.kept = {"version": rerun.RECORD_VERSION, "answer": [["out", f"{index}\n"]], "watched": {}}
        rerun.save(["sd", "-o", f"out-{index}"], {})
    kept = [json.loads(path.read_text())["answer"] for path in (isolated_cache / "reruns").glob("*.json")]
    assert sorted(kept) == [[["out", "2\n"]], [["out", "3\n"]]]
