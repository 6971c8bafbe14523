"""Build once per host: exports started together on one cache build each component once; the others say they
wait, then reuse it. A lock holder that dies (even by SIGKILL) never blocks the others. Real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

NAMES = ["text_encoder", "unet", "vae_encoder", "vae_decoder"]


def start(*args: object, cache: Path) -> subprocess.Popen:
    """`neuron-export ARGS` in its own session (so everything it starts can be killed with it)."""
    command = [sys.executable, "-m", "neuron_export", *map(str, args), "--cache-dir", str(cache)]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


def read_until(process: subprocess.Popen, text: str, seen: list[str]) -> None:
    """Read the process's output lines into `seen` until one contains `text` (fails if it ends first)."""
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"{text!r} never appeared: {''.join(seen)} {process.stderr.read()}")


def finish(process: subprocess.Popen, seen: list[str]) -> str:
    try:
        out, err = process.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err
    return "".join(seen) + out


def test_three_concurrent_exports_build_each_component_once(tiny_model, tmp_path):
    model, cache = tiny_model("sd"), tmp_path / "shared-cache"
    first = start("sd", "-m", model, "--backend", "cpu", "-o", tmp_path / "a", cache=cache)
    first_lines: list[str] = []
    try:
        read_until(first, ": loading", first_lines)  # building now, holding its locks
        second = start("sd", "-m", model, "--backend", "cpu", "-o", tmp_path / "b", "--json", cache=cache)
        third = start("sd", "-m", model, "--backend", "cpu", "-o", tmp_path / "c", cache=cache)
        outputs = [finish(first, first_lines), finish(second, []), finish(third, [])]
    finally:
        for process in (first, locals().get("second"), locals().get("third")):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    first_text, second_json, third_text = outputs
    second_origins = [c["origin"] for c in json.loads(second_json)["components"].values()]
    builds = first_text.count(": done in") + second_origins.count("built") + third_text.count(": done in")
    assert builds == len(NAMES)  # one build per component on this host, not one per export
    assert second_origins == ["cached"] * len(NAMES)  # it waited, then reused
    assert "waiting: another export on this host is building it" in third_text
    assert third_text.count(": cached (") == len(NAMES)
    assert sorted(p.name for p in (cache / "components").glob("*/*")) == sorted(
        json.loads((tmp_path / name / "manifest.json").read_text())["components"][c]["cache_key"]
        for name in ("a",)
        for c in NAMES
    )


def test_a_killed_lock_holder_does_not_block_the_others(tiny_model, tmp_path, cli):
    model, cache = tiny_model("sd"), tmp_path / "cache"
    plan = json.loads(
        cli(
            "plan",
            "sd",
            "-m",
            model,
            "--backend",
            "cpu",
            "--components",
            "vae_decoder",
            "-o",
            tmp_path / "out",
            "--cache-dir",
            cache,
            "--json",
        ).stdout
    )
    key = plan["components"][0]["cache_key"]
    # A process holding the key's lock as an exporter does, until it is killed.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import time
        from pathlib import Path
        from neuron_export.store.cache import ComponentCache
        from neuron_export.store.supply import key_lock
        lock = key_lock(ComponentCache(Path({str(cache)!r})), {key!r})
        lock.acquire()
        print("holding", flush=True)
        time.sleep(3600)
    """),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    waiter = None
    try:
        assert holder.stdout.readline().strip() == "holding"
        waiter = start(
            "sd", "-m", model, "--backend", "cpu", "--components", "vae_decoder", "-o", tmp_path / "out", cache=cache
        )
        seen: list[str] = []
        read_until(waiter, "waiting", seen)
        time.sleep(1)
        assert waiter.poll() is None and not (tmp_path / "out").exists()  # still waiting while the holder lives
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        text = finish(waiter, seen)
    finally:
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert "vae_decoder: done in" in text  # the waiter built it itself once the holder was gone
    assert (tmp_path / "out" / "vae_decoder" / "model.neuron").is_file()
