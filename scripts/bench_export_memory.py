"""Peak host memory of a full-size SD 1.5 export (random weights, built locally), cpu backend.

Prints the peak memory of the whole export overall (sampled from outside: the proportional set size summed
over the exporter, its worker fork server and its workers, so shared pages count once) and per component
(each worker's high-water RSS), each against the largest component's weight bytes.
Target: the overall peak is at most 1.5x the largest component's weights. Exits 1 when it is not.

    python scripts/bench_export_memory.py [--model-dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TARGET_RATIO = 1.5


def pss_bytes(pid: int) -> int:
    """Proportional set size: a page shared by n processes counts 1/n in each."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """The process and all its descendants (the worker fork server and its workers included)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def tree_memory_bytes(root: int) -> int:
    return sum(pss_bytes(pid) for pid in descendants(root))


def run_sampled(command: list[str]) -> tuple[subprocess.CompletedProcess, int]:
    """Run a command, polling its process tree's memory every 20 ms; returns the result and the highest seen."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_memory_bytes(process.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak


def gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="an existing sd15-full example (built when absent)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary model and export")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    model = args.model_dir or work / "sd15-full"
    if not (model / "model_index.json").exists():
        print(f"building full-size SD 1.5 (random weights) in {model} ...", flush=True)
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("sd15_full.py")), str(model)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    output = work / "export"
    started = time.perf_counter()
    result, sampled_peak = run_sampled(
        [
            sys.executable,
            "-m",
            "neuron_export",
            "sd",
            "-m",
            str(model),
            "--backend",
            "cpu",
            "-o",
            str(output),
            "--json",
            "--cache-dir",
            str(work / "cache"),
        ]
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        print(result.stdout, result.stderr, sep="\n")
        return 2
    manifest = json.loads((output / "manifest.json").read_text())

    weights = {name: sum(f["size"] for f in record["source_files"]) for name, record in manifest["components"].items()}
    largest_name = max(weights, key=weights.get)
    largest = weights[largest_name]
    print(f"\nfull-size SD 1.5, 512x512, cpu backend, exported in {seconds:.0f} s")
    print(f"largest component: {largest_name}, {gib(largest)} of weights\n")
    print(f"{'component':<14}{'weights':>12}{'peak RSS':>12}{'x largest':>11}{'x own':>8}")
    for name, record in manifest["components"].items():
        peak = record["peak_rss_bytes"]
        print(f"{name:<14}{gib(weights[name]):>12}{gib(peak):>12}{peak / largest:>11.2f}{peak / weights[name]:>8.2f}")
    component_peak = max(r["peak_rss_bytes"] for r in manifest["components"].values())
    overall = max(sampled_peak, component_peak)
    ratio = overall / largest
    print(
        f"\noverall peak: {gib(overall)} (whole process tree sampled: {gib(sampled_peak)}; "
        f"largest worker high-water RSS: {gib(component_peak)})"
    )
    print(
        f"overall peak / largest component's weights: {ratio:.2f}x (target <= {TARGET_RATIO}x): "
        f"{'PASS' if ratio <= TARGET_RATIO else 'FAIL'}"
    )
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if ratio <= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
