"""Build once per host: exports started together on one cache build each component once; the others say they
wait, then reuse it. A lock holder that dies (even by SIGKILL) never blocks the others. Real processes: the
Python API's events printed one JSON line each, and one CLI export's --json."""

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

from neuron_export.events import Stage

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


# An export through the Python API that prints each event it receives as one JSON line.
EXPORT = """
import json, sys
import neuron_export
def show(event):
    print(json.dumps({"component": event.component, "stage": event.stage}), flush=True)
model, output, cache, options = sys.argv[1:]
neuron_export.export("sd", model=model, backend="cpu", output=output, cache_dir=cache, on_event=show, **json.loads(options))
"""


def start_export(model: Path, output: Path, cache: Path, **options: object) -> subprocess.Popen:
    """neuron_export.export(...) in a process of its own session, its events on stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", EXPORT, str(model), str(output), str(cache), json.dumps(options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )


def events(text: str) -> list[tuple[str, Stage]]:
    """(component, stage) of each event line an export printed."""
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return [(e["component"], Stage(e["stage"])) for e in lines]


def read_until(process: subprocess.Popen, stage: Stage, seen: list[str]) -> None:
    """Read the process's event lines into `seen` until one is `stage` (fails if it ends first)."""
    for line in process.stdout:
        seen.append(line)
        if events(line) and events(line)[0][1] == stage:
            return
    raise AssertionError(f"{stage} never came: {''.join(seen)} {process.stderr.read()}")


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
    first = start_export(model, tmp_path / "a", cache)
    first_lines: list[str] = []
    try:
        read_until(first, Stage.LOADING, first_lines)  # building now, holding its locks
        second = start("sd", "-m", model, "--backend", "cpu", "-o", tmp_path / "b", "--json", cache=cache)
        third = start_export(model, tmp_path / "c", cache)
        outputs = [finish(first, first_lines), finish(second, []), finish(third, [])]
    finally:
        for process in (first, locals().get("second"), locals().get("third")):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    first_events, second_json, third_events = events(outputs[0]), outputs[1], events(outputs[2])
    second_origins = [c["origin"] for c in json.loads(second_json)["components"].values()]
    done = [stage for _, stage in first_events + third_events].count(Stage.DONE)
    assert done + second_origins.count("built") == len(NAMES)  # one build per component on this host, not per export
    assert second_origins == ["cached"] * len(NAMES)  # it waited, then reused
    assert Stage.WAITING in [stage for _, stage in third_events]
    assert sorted(name for name, stage in third_events if stage == Stage.CACHED) == sorted(NAMES)
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
        waiter = start_export(model, tmp_path / "out", cache, components=["vae_decoder"])
        seen: list[str] = []
        read_until(waiter, Stage.WAITING, seen)
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
    assert ("vae_decoder", Stage.DONE) in events(text)  # the waiter built it itself once the holder was gone
    assert (tmp_path / "out" / "vae_decoder" / "model.neuron").is_file()
