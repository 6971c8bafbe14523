"""Outgrowing one machine, measured in one run on tiny random-weight pipelines (cpu backend), plus one projection.

1. A second machine: a cold export (fresh local cache, empty file:// remote cache) against the same export on
   a "second machine" (another fresh local cache, the now warm remote): builds on each, wall-time ratio.
2. Three concurrent exports of one model on one host, one shared local cache: total builds against the
   component count (build once per host), and their wall time against one export's.
3. A 2x2 shape matrix (SD, four exports) on a two-node Ray cluster on 127.0.0.1 against local serial, each from
   fresh caches: wall ratio and builds (against the unique cache keys `plan --json` lists). Both nodes share
   this host's cores, so this measures the overhead of fanning out, not the speed-up of real hosts.
4. Projected, not measured (no Neuron SDK here): an SDXL base 1024x1024 export's five components compiled on
   five hosts at once against one after another, from the Neuron backend's time factors (planning/estimate.py)
   and SDXL base's published parameter counts.

    python scripts/bench_fleet.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from neuron_export.planning.estimate import WeightStats, estimate_seconds  # noqa: E402
from neuron_export.testing.examples import build_example  # noqa: E402

# SDXL base 1.0 parameter counts (safetensors headers of stabilityai/stable-diffusion-xl-base-1.0).
SDXL_PARAMETERS = {
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "unet": 2_567_463_684,
    "vae_encoder": 34_163_592,
    "vae_decoder": 49_490_179,
}


def run(args: list[str], env: dict[str, str]) -> tuple[float, dict]:
    """One `neuron-export ... --json` in its own process: wall seconds and the JSON result."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "neuron_export", *args, "--json"], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(
            f"failed ({done.returncode}): neuron-export {' '.join(args)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return seconds, json.loads(done.stdout)


def origins(result: dict) -> list[str]:
    exports = result.get("exports", [result])
    return [c["origin"] for export in exports for c in export["components"].values()]


def environment(cache: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "NEURON_EXPORT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **extra}


def signing_key(work: Path) -> Path:
    """The fleet's key pair (cache keygen): builders sign with the private key, readers trust FILE.pub."""
    key = work / "cache-key"
    if not key.exists():
        subprocess.run(
            [sys.executable, "-m", "neuron_export", "cache", "keygen", str(key)],
            check=True,
            env=environment(work / "keygen-cache"),
            capture_output=True,
        )
    return key


def second_machine(work: Path, model: Path) -> None:
    remote, key = f"file://{work / 'remote-1'}", signing_key(work)
    base = ["sd-xl", "-m", str(model), "--backend", "cpu", "--remote-cache", remote]
    cold, first = run(
        [*base, "--remote-cache-signing-key", str(key), "-o", str(work / "first")], environment(work / "machine-a")
    )
    warm, second = run(
        [*base, "--remote-cache-trusted-key", f"{key}.pub", "-o", str(work / "second")], environment(work / "machine-b")
    )
    print("1. second machine (fresh local cache, warm remote) vs cold export, tiny SDXL (5 components):")
    print(
        f"   cold: {cold:.1f} s, builds {origins(first).count('built')}; second machine: {warm:.1f} s, builds "
        f"{origins(second).count('built')}, downloaded {origins(second).count('downloaded')}; "
        f"time ratio {warm / cold:.2f}"
    )


def concurrent(work: Path, model: Path) -> None:
    env = environment(work / "shared-cache")
    single, _ = run(
        ["sd-xl", "-m", str(model), "--backend", "cpu", "-o", str(work / "alone")], environment(work / "alone-cache")
    )
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "neuron_export",
                "sd-xl",
                "-m",
                str(model),
                "--backend",
                "cpu",
                "-o",
                str(work / f"concurrent-{n}"),
                "--json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    results = []
    for process in processes:
        out, err = process.communicate()
        if process.returncode != 0:
            sys.exit(f"a concurrent export failed: {err[-2000:]}")
        results.append(json.loads(out))
    together = time.perf_counter() - started
    built = sum(origins(result).count("built") for result in results)
    print("2. three concurrent exports of one model on one host (one cache):")
    print(
        f"   total builds {built} for {len(results[0]['components'])} components; wall {together:.1f} s "
        f"against {single:.1f} s for one export alone (ratio {together / single:.2f})"
    )


def ray_matrix(work: Path, model: Path) -> None:
    from ray_cluster import LOCAL_ONLY, two_node_cluster

    matrix = ["sd", "-m", str(model), "--backend", "cpu", "--height", "64,128", "--width", "64,128"]
    keys = {b["cache_key"] for b in run(["plan", *matrix], environment(work / "plan-cache"))[1]["builds"]}
    serial, local = run([*matrix, "-o", str(work / "serial")], environment(work / "serial-cache"))
    started = time.perf_counter()
    with two_node_cluster(work / "node-caches") as cluster:
        up = time.perf_counter() - started
        ray_options = [
            "--executor",
            "ray",
            "--ray-address",
            cluster.address,
            "--remote-cache",
            f"file://{work / 'remote-3'}",
            "--remote-cache-signing-key",
            str(signing_key(work)),
        ]
        fanned, _ = run(
            [*matrix, *ray_options, "-o", str(work / "on-ray")], environment(work / "driver-cache", **LOCAL_ONLY)
        )
        on_nodes = [p for cache in cluster.caches.values() for p in cache.glob("components/*/*/record.json")]
    print("3. 2x2 shape matrix (tiny SD, 4 exports) on a two-node Ray cluster on 127.0.0.1 vs local serial:")
    print(
        f"   unique keys {len(keys)}; local serial: {serial:.1f} s, builds {origins(local).count('built')}; "
        f"Ray: {fanned:.1f} s (cluster start {up:.1f} s not included), builds on the nodes {len(on_nodes)}; "
        f"wall ratio Ray/serial {fanned / serial:.2f} (both nodes share this host's {os.cpu_count()} cores)"
    )


def projection() -> None:
    side = 1024
    seconds = {
        name: estimate_seconds("neuron", name, WeightStats(count, 2 * count), 1, side, side)
        for name, count in SDXL_PARAMETERS.items()
    }
    serial, fanned = sum(seconds.values()), max(seconds.values())
    longest = max(seconds, key=seconds.get)
    print("4. projected (Neuron time factors of planning/estimate.py, not measured): SDXL base 1024x1024, 5 components")
    print("   " + ", ".join(f"{name} {value / 60:.1f} min" for name, value in seconds.items()))
    print(
        f"   serial {serial / 60:.1f} min; five hosts {fanned / 60:.1f} min (the {longest}); ratio {serial / fanned:.2f}x "
        "(artifact transfer through the remote cache not included)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        sdxl = build_example("sdxl", work / "tiny-sdxl")
        sd = build_example("sd", work / "tiny-sd")
        second_machine(work, sdxl)
        concurrent(work, sdxl)
        ray_matrix(work, sd)
        projection()
    finally:
        if options.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
