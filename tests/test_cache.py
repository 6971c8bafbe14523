"""Never compile twice: the component cache, reruns, resume after a kill, plans, shape matrices."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def file_hashes(directory: Path) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def origins(result) -> dict[str, str]:
    """component -> where a --json export took it from: built, cached (or downloaded)."""
    assert result.exit_code == 0, result
    return {name: component["origin"] for name, component in json.loads(result.stdout)["components"].items()}


def live_processes_in_session(session: int) -> dict[int, int]:
    """pid -> parent pid of every process of a session that is still running (zombies are dead)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == session and fields[0] != "Z":
            found[int(entry.name)] = int(fields[1])
    return found


def cache_entries(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(cache.glob("components/*/*/record.json"))]


def test_unchanged_rerun_rebuilds_nothing_and_leaves_the_output_alone(cli, tiny_model, tmp_path, isolated_cache):
    output = tmp_path / "out"
    first = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--json")
    assert first.exit_code == 0, first
    assert json.loads(first.stdout)["up_to_date"] is False
    before = file_hashes(output)
    inodes = {p: p.stat().st_ino for p in output.rglob("*")}
    rerun = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output)
    assert rerun.exit_code == 0, rerun
    assert "up to date" in rerun.stdout and "loading" not in rerun.stdout
    as_json = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--json")
    assert json.loads(as_json.stdout)["up_to_date"] is True
    assert file_hashes(output) == before
    assert {p: p.stat().st_ino for p in output.rglob("*")} == inodes  # not even rewritten


def test_a_deleted_output_is_reassembled_byte_identical_from_the_cache(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    names = ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"]
    first = cli("sd-xl", "-m", tiny_model("sdxl"), "--backend", "cpu", "-o", output, "--json")
    assert origins(first) == dict.fromkeys(names, "built")
    before = file_hashes(output)
    first_manifest = json.loads((output / "manifest.json").read_text())
    shutil.rmtree(output)
    again = cli("sd-xl", "-m", tiny_model("sdxl"), "--backend", "cpu", "-o", output, "--json")
    assert origins(again) == dict.fromkeys(names, "cached")
    assert {k: v for k, v in file_hashes(output).items() if k != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }
    # The manifest differs only in saying that each validation was measured by the earlier export.
    manifest = json.loads((output / "manifest.json").read_text())
    for record in first_manifest["components"].values():
        assert record["validation"]["reused"] is False
        record["validation"]["reused"] = True
    assert manifest == first_manifest


def test_a_new_height_rebuilds_unet_and_vaes_but_not_the_text_encoders(cli, tiny_model, tmp_path):
    model = tiny_model("sdxl")
    assert cli("sd-xl", "-m", model, "--backend", "cpu", "-o", tmp_path / "a").exit_code == 0
    result = cli("sd-xl", "-m", model, "--backend", "cpu", "-o", tmp_path / "b", "--height", "128", "--json")
    assert origins(result) == {
        "text_encoder": "cached",
        "text_encoder_2": "cached",
        "unet": "built",
        "vae_encoder": "built",
        "vae_decoder": "built",
    }
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text())["components"] for d in ("a", "b"))
    assert a["text_encoder"]["cache_key"] == b["text_encoder"]["cache_key"]
    assert a["unet"]["cache_key"] != b["unet"]["cache_key"]


def test_flags_that_change_the_artifact_change_the_key(cli, tiny_model, tmp_path):
    model = tiny_model("sd")
    assert cli("sd", "-m", model, "--backend", "cpu", "-o", tmp_path / "a", "--components", "unet").exit_code == 0
    result = cli(
        "sd",
        "-m",
        model,
        "--backend",
        "cpu",
        "-o",
        tmp_path / "b",
        "--components",
        "unet",
        "--batch-size",
        "2",
        "--json",
    )
    assert origins(result) == {"unet": "built"}
    # auto-cast does not change a CPU trace, so it must not force a rebuild there
    result = cli(
        "sd",
        "-m",
        model,
        "--backend",
        "cpu",
        "-o",
        tmp_path / "c",
        "--components",
        "unet",
        "--auto-cast",
        "all",
        "--json",
    )
    assert origins(result) == {"unet": "cached"}
    assert json.loads((tmp_path / "c" / "unet" / "config.json").read_text())["neuron"]["auto_cast"] == "all"


def test_the_same_component_in_two_models_is_built_once(cli, tiny_model, tmp_path):
    copy = tmp_path / "copy-of-sd"
    shutil.copytree(tiny_model("sd"), copy)
    assert cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "a").exit_code == 0
    result = cli("sd", "-m", copy, "--backend", "cpu", "-o", tmp_path / "b", "--json")
    assert origins(result) == dict.fromkeys(["text_encoder", "unet", "vae_encoder", "vae_decoder"], "cached")


def test_a_corrupted_cache_entry_is_discarded_and_rebuilt(cli, tiny_model, tmp_path, isolated_cache):
    model = tiny_model("sd")
    assert (
        cli("sd", "-m", model, "--backend", "cpu", "-o", tmp_path / "a", "--components", "vae_decoder").exit_code == 0
    )
    shutil.rmtree(tmp_path / "a")
    (artifact,) = isolated_cache.glob("components/*/*/model.neuron")
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    result = cli("sd", "-m", model, "--backend", "cpu", "-o", tmp_path / "b", "--components", "vae_decoder", "--json")
    assert origins(result) == {"vae_decoder": "built"}  # rebuilt, not reused
    record = json.loads((tmp_path / "b" / "manifest.json").read_text())["components"]["vae_decoder"]
    rebuilt = (tmp_path / "b" / "vae_decoder" / "model.neuron").read_bytes()
    assert hashlib.sha256(rebuilt).hexdigest() == record["files"][0]["sha256"]
    assert record["validation"]["status"] == "passed"


def test_export_killed_with_sigkill_resumes_building_only_what_is_missing(tiny_model, tmp_path):
    cache = tmp_path / "cache"
    output = tmp_path / "out"
    env = {**os.environ, "NEURON_EXPORT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    command = [
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
    ]
    # A session of its own: every process the exporter starts (fork server, workers) is findable by session id.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        deadline = time.time() + 180
        workers: list[int] = []
        while time.time() < deadline and not workers:
            time.sleep(0.02)
            if len(list(cache.glob("components/*/*/record.json"))) >= 2:  # workers are the exporter's grandchildren
                workers = [
                    pid
                    for pid, parent in live_processes_in_session(process.pid).items()
                    if parent != process.pid != pid
                ]
        assert workers, "no worker was running when the exporter was to be killed"
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)  # a stopped worker cannot exit by itself: only dying with its parent ends it
        os.kill(process.pid, signal.SIGKILL)  # the exporting process only; its workers must die with it
        process.wait(timeout=60)
        deadline = time.time() + 30
        while time.time() < deadline and live_processes_in_session(process.pid):
            time.sleep(0.05)
        survivors = live_processes_in_session(process.pid)
        assert not survivors, f"processes of the killed exporter are still running: {survivors} (workers: {workers})"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # survivors of a failed check must not outlive the test
        process.communicate(timeout=60)
    finished_before = {r["name"] for r in cache_entries(cache)}
    assert 2 <= len(finished_before) < 5, finished_before
    assert not output.exists()

    rerun = subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    seen = {name: c["origin"] for name, c in json.loads(rerun.stdout)["components"].items()}
    assert {name for name, origin in seen.items() if origin == "cached"} == finished_before
    assert {name for name, origin in seen.items() if origin == "built"} == {
        "text_encoder",
        "text_encoder_2",
        "unet",
        "vae_encoder",
        "vae_decoder",
    } - finished_before
    manifest = json.loads((output / "manifest.json").read_text())
    for record in manifest["components"].values():
        assert (
            hashlib.sha256((output / record["files"][0]["path"]).read_bytes()).hexdigest()
            == record["files"][0]["sha256"]
        )
        assert record["validation"]["status"] == "passed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out"]  # no partial directory left
    assert not list((cache / "tmp").iterdir())  # the killed run's build directories were cleaned


def test_shape_matrix_builds_the_text_encoders_once(cli, tiny_model, tmp_path, isolated_cache):
    result = cli(
        "sd-xl", "-m", tiny_model("sdxl"), "--backend", "cpu", "--height", "64,128", "-o", tmp_path / "matrix", "--json"
    )
    assert result.exit_code == 0, result
    exports = json.loads(result.stdout)["exports"]
    name = tiny_model("sdxl").name
    assert [Path(e["output"]).name for e in exports] == [
        f"{name}-sd-xl-neuron-64x64-b1",
        f"{name}-sd-xl-neuron-128x64-b1",
    ]
    names = [r["name"] for r in cache_entries(isolated_cache)]
    assert names.count("text_encoder") == 1 and names.count("text_encoder_2") == 1
    assert names.count("unet") == 2 and names.count("vae_decoder") == 2
    for export in exports:
        assert (Path(export["output"]) / "text_encoder" / "model.neuron").exists()


def test_parallel_jobs_build_the_same_export(cli, tiny_model, tmp_path):
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", "--jobs", "2", "--json")
    assert result.exit_code == 0, result
    components = json.loads(result.stdout)["components"]
    assert set(components) == {"text_encoder", "unet", "vae_encoder", "vae_decoder"}
    assert all(c["validation"]["status"] == "passed" for c in components.values())


def test_plan_shows_misses_then_hits(cli, tiny_model, tmp_path):
    args = ["-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out"]
    before = cli("plan", "sd", *args, "--json")
    assert before.exit_code == 0, before
    plan = json.loads(before.stdout)
    assert [c["cache"] for c in plan["components"]] == ["miss"] * 4
    unet = next(c for c in plan["components"] if c["component"] == "unet")
    assert unet["inputs"][0]["shape"] == [1, 4, 8, 8] and "--model-type=unet-inference" in unet["compiler_args"]
    assert unet["estimated_peak_bytes"] > 0 and plan["estimated_wall_seconds"] > 0
    assert not (tmp_path / "out").exists()  # planning builds nothing
    assert cli("sd", *args).exit_code == 0
    after = json.loads(cli("plan", "sd", *args, "--json").stdout)
    assert [c["cache"] for c in after["components"]] == ["hit"] * 4 and after["up_to_date"] is True


def test_plan_refuses_a_budget_smaller_than_the_largest_job_before_loading_anything(tiny_model, tmp_path):
    code = (
        "import sys\nfrom neuron_export.cli.main import main\n"
        f"try:\n    main(['plan', 'sd', '-m', {str(tiny_model('sd'))!r}, '--backend', 'cpu', '--max-memory', '100MiB'])\n"
        "except SystemExit as e:\n    print('EXIT', e.code)\n"
        "print('LOADED', [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "NEURON_EXPORT_CACHE": str(tmp_path)},
    )
    assert "EXIT 6" in result.stdout and "LOADED []" in result.stdout, result
    assert "--max-memory 0.1 GiB" in result.stderr and "estimated" in result.stderr and "Traceback" not in result.stderr


def test_export_refuses_the_same_budget(cli, tiny_model, tmp_path):
    result = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", "--max-memory", "0.1GiB")
    assert result.exit_code == 6 and "--max-memory" in result.stderr
    assert not (tmp_path / "out").exists()


def test_cache_commands(cli, tiny_model, tmp_path, isolated_cache):
    assert cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out").exit_code == 0
    listing = cli("cache", "ls")
    assert listing.exit_code == 0 and len(listing.stdout.strip().splitlines()) == 4 and "unet" in listing.stdout
    usage = cli("cache", "du")
    assert usage.exit_code == 0 and "total" in usage.stdout and "unet" in usage.stdout
    assert cli("cache", "verify").exit_code == 0
    (artifact,) = [
        p
        for p in isolated_cache.glob("components/*/*/model.neuron")
        if json.loads((p.parent / "record.json").read_text())["name"] == "unet"
    ]
    artifact.write_bytes(b"broken")
    bad = cli("cache", "verify")
    assert bad.exit_code == 3 and "unet" in bad.stdout and "3 of 4 entries intact" in bad.stdout
    assert cli("cache", "prune", "--older-than", "30d").stdout.startswith("removed 0 entries")
    assert cli("cache", "prune", "--older-than", "soon").exit_code == 2
    assert cli("cache", "prune", "--all").stdout.splitlines()[-1].startswith("removed 3 entries")
    assert cli("cache", "ls").stdout.strip() == ""


def test_cache_prune_needs_to_be_told_what_to_remove_and_can_list_it_first(cli, tiny_model, tmp_path, isolated_cache):
    result = cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", tmp_path / "out", "--components", "unet,vae_decoder"
    )
    assert result.exit_code == 0, result
    before = file_hashes(isolated_cache)
    for flags in ([], ["--dry-run"], ["--all", "--older-than", "30d"]):
        refused = cli("cache", "prune", *flags)
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.exit_code == 2 and len(lines) == 1 and "Traceback" not in refused.stderr, refused
        assert "--all" in lines[0] and "--older-than" in lines[0]
        assert file_hashes(isolated_cache) == before
    dry = cli("cache", "prune", "--all", "--dry-run")
    assert dry.exit_code == 0, dry
    listed = dry.stdout.splitlines()
    assert sorted(line.split()[3] for line in listed[:-1]) == ["unet", "vae_decoder"]
    assert listed[-1].startswith("would remove 2 entries") and "nothing was deleted" in listed[-1]
    assert file_hashes(isolated_cache) == before
    assert cli("cache", "prune", "--older-than", "30d", "--dry-run").stdout.startswith("would remove 0 entries")
    assert cli("cache", "prune", "--all").stdout.splitlines()[-1].startswith("removed 2 entries")
    assert not list(isolated_cache.glob("components/*/*"))


def test_weight_hashes_are_remembered_by_path_size_and_mtime(tiny_model, tmp_path):
    from neuron_export.store.cache import HashIndex

    weights = tmp_path / "w.safetensors"
    shutil.copy(next(tiny_model("sd").glob("unet/*.safetensors")), weights)
    index = HashIndex(tmp_path / "cache")
    digest = index.sha256(weights)
    index.save()
    assert digest == hashlib.sha256(weights.read_bytes()).hexdigest()
    recorded = json.loads((tmp_path / "cache" / "weight-hashes.json").read_text())
    assert recorded[str(weights.resolve())]["sha256"] == digest
    recorded[str(weights.resolve())]["sha256"] = "remembered"
    (tmp_path / "cache" / "weight-hashes.json").write_text(json.dumps(recorded))
    assert HashIndex(tmp_path / "cache").sha256(weights) == "remembered"  # not re-read
    os.utime(weights, ns=(0, 0))
    assert HashIndex(tmp_path / "cache").sha256(weights) == digest  # changed mtime: hashed again


@pytest.mark.parametrize("text,seconds", [("30d", 30 * 86400), ("12h", 43200), ("90m", 5400)])
def test_durations(text, seconds):
    from neuron_export.cli.cache import parse_duration

    assert parse_duration(text) == seconds


def test_an_output_missing_a_file_is_not_up_to_date(cli, tiny_model, tmp_path):
    output = tmp_path / "out"
    assert cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet").exit_code == 0
    (output / "unet" / "model.neuron").unlink()
    rerun = cli("sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet")
    assert rerun.exit_code == 2 and "--force" in rerun.stderr
    repaired = cli(
        "sd", "-m", tiny_model("sd"), "--backend", "cpu", "-o", output, "--components", "unet", "--force", "--json"
    )
    assert origins(repaired) == {"unet": "cached"}
    assert (output / "unet" / "model.neuron").is_file()
