"""Peak host memory and build time of a component, estimated before anything is loaded.

Parameter counts and weight bytes come from the safetensors headers (exact, no weights read, no torch
import). The factors (below, and per role in roles/registry.py) are backend-specific and were measured on a 2-core / 24 GiB host (cpu backend,
full-size SD 1.5 at 512x512; `scripts/bench_cache_and_workers.py` prints estimate vs measured) or taken
from public reports of neuronx-cc compiles (neuron backend; not measurable here, so deliberately generous).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import NamedTuple

from neuron_export.roles.registry import role_of

GIB = 2**30
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# bytes = BASE + weight_factor * weight bytes + pixel_bytes * batch * height * width (each role's BuildCost)
BASE_BYTES = {"cpu": int(0.45 * GIB), "neuron": int(1.5 * GIB)}
# neuronx-cc holds several copies of the graph and weights while compiling (public reports: ~35 GB for an
# SD 1.5 CPU-only compile, 60-90 GB for SDXL), hence the neuron rows' large weight factors (in roles/registry.py).
# seconds = BASE_SECONDS + SECONDS_PER_PARAM * parameters + seconds_per_pixel * batch * height * width
BASE_SECONDS = {"cpu": 2.0, "neuron": 20.0}
SECONDS_PER_PARAM = {"cpu": 7.5e-8, "neuron": 4.0e-7}  # neuron: SDXL UNet ~1026 s for 2.57B params (inf2.8xlarge)

# CPUs a build keeps busy, what a Ray task requests. torch's CPU trace runs one component's graph on one
# worker; neuronx-cc runs its passes in parallel processes (a guess, not measurable without the SDK).
BUILD_CPUS = {"cpu": 1, "neuron": 4}


class WeightStats(NamedTuple):
    parameters: int
    bytes: int


def weight_stats(files: tuple[Path, ...], component: str, architecture: str | None = None) -> WeightStats:
    """Parameter count and bytes of the tensors a component uses, from the safetensors headers."""
    prefixes = role_of(component, architecture).tensor_prefixes
    parameters = size = 0
    for file in files:
        if file.suffix != ".safetensors":  # a pickle has no header to read: assume fp32, the whole file
            size += file.stat().st_size
            parameters += file.stat().st_size // 4
            continue
        with file.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        for name, tensor in header.items():
            if name == "__metadata__" or (prefixes and not name.startswith(prefixes)):
                continue
            count = 1
            for dim in tensor["shape"]:
                count *= dim
            parameters += count
            size += count * DTYPE_BYTES.get(tensor["dtype"], 4)
    return WeightStats(parameters, size)


def estimate_peak_bytes(
    backend: str,
    component: str,
    weights: WeightStats,
    batch: int,
    height: int,
    width: int,
    architecture: str | None = None,
) -> int:
    cost = role_of(component, architecture).costs[backend]
    return int(BASE_BYTES[backend] + cost.weight_factor * weights.bytes + cost.pixel_bytes * batch * height * width)


def estimate_seconds(
    backend: str,
    component: str,
    weights: WeightStats,
    batch: int,
    height: int,
    width: int,
    architecture: str | None = None,
) -> float:
    cost = role_of(component, architecture).costs[backend]
    pixels = batch * height * width
    return BASE_SECONDS[backend] + SECONDS_PER_PARAM[backend] * weights.parameters + cost.seconds_per_pixel * pixels


def estimate_cpus(backend: str, component: str) -> int:
    return BUILD_CPUS[backend]


def schedule_seconds(jobs: list[tuple[float, int]], workers: int, budget: int) -> float:
    """Wall time of running (seconds, peak bytes) jobs in order, at most `workers` at once within `budget`."""
    clock = 0.0
    running: list[tuple[float, int]] = []  # (finish time, bytes)
    for seconds, peak in jobs:
        while running and (len(running) >= workers or sum(b for _, b in running) + peak > budget):
            running.sort()
            clock, _ = running.pop(0)
        running.append((clock + seconds, peak))
    return max([finish for finish, _ in running], default=clock)


def available_memory_bytes() -> int:
    """What the host can give right now (MemAvailable on Linux), the default --max-memory."""
    try:  # the line psutil reads on Linux, without importing psutil (a rerun needs nothing else of it)
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import psutil

    return int(psutil.virtual_memory().available)
