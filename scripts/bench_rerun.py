"""How long a rerun of an unchanged export takes: the whole `neuron-export` process, start to exit.

Builds the bundled tiny SD pipeline and exports it once (cpu backend, a scratch cache), then runs the same
command N more times; each must answer "up to date" (from the rerun record the export kept: cli/rerun.py).
Prints the median and fastest wall clock and CPU time (user + sys, less disturbed by other load), the median
against the 0.3 s target, the same rerun answered in full (its record removed first), the interpreter's own start
(`python -c pass`) and its start with typer and pydantic imported (what any rerun pays first) for scale, the
load average, and the imports that cost most in one rerun (-X importtime).

The reruns use cached bytecode, as an installed package does: PYTHONDONTWRITEBYTECODE is dropped and the .pyc
files go to a scratch PYTHONPYCACHEPREFIX (one untimed rerun writes them); --no-bytecode-cache keeps the
environment as it is (then every run compiles the package's modules again).

Exit 1 when the median misses the target, 2 when an export fails.

    python scripts/bench_rerun.py [--runs 15] [--no-bytecode-cache] [--keep]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS = 0.3
SHOWN_IMPORTS = 12


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall seconds, CPU seconds (user + sys of the process and its children) and the result of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), result


def costliest_imports(command: list[str], env: dict[str, str]) -> list[tuple[float, str]]:
    """(cumulative ms, module) of the top-level imports of one run, costliest first."""
    result = subprocess.run([command[0], "-X", "importtime", *command[1:]], env=env, capture_output=True, text=True)
    found = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        if not name.startswith("  "):  # one space after the bar: imported by the run itself, not by a module
            found.append((int(cumulative) / 1000, name.strip()))
    return sorted(found, reverse=True)[:SHOWN_IMPORTS]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed reruns (default 15)")
    parser.add_argument("--no-bytecode-cache", action="store_true", help="keep the environment's bytecode setting")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="neuron-export-bench-rerun-"))
    env = {**os.environ, "NEURON_EXPORT_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    if not args.no_bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    try:
        model, output = work / "tiny-sd", work / "out"
        subprocess.run(
            [sys.executable, "-m", "neuron_export.testing.examples", "sd", str(model)],
            env=env,
            check=True,
            capture_output=True,
        )  # library warnings are not this benchmark's output
        command = [
            sys.executable,
            "-m",
            "neuron_export",
            "sd",
            "--model",
            str(model),
            "--backend",
            "cpu",
            "--output",
            str(output),
        ]
        first = subprocess.run(command, env=env, capture_output=True, text=True)
        if first.returncode != 0:
            print(f"the first export failed (exit {first.returncode}):\n{first.stderr[-2000:]}", file=sys.stderr)
            return 2
        timed(command, env)  # untimed: writes the bytecode of what a rerun imports
        start = [timed([sys.executable, "-c", "pass"], env)[0] for _ in range(5)]
        # what every rerun pays before our code runs: typer parses each option through a pydantic TypeAdapter
        floor = [
            timed([sys.executable, "-c", "import typer; from pydantic import BaseModel, TypeAdapter"], env)[0]
            for _ in range(5)
        ]
        load_before = os.getloadavg()
        walls, cpus = [], []
        for _ in range(args.runs):
            wall, cpu, result = timed(command, env)
            if result.returncode != 0 or "is up to date" not in result.stdout:
                print(
                    f"a rerun did not answer up to date (exit {result.returncode}):\n{result.stdout[-1000:]}"
                    f"{result.stderr[-1000:]}",
                    file=sys.stderr,
                )
                return 2
            walls.append(wall)
            cpus.append(cpu)
        # the same rerun answered in full (its record removed first): after any change of file, flag or environment
        full_walls = []
        for _ in range(max(3, args.runs // 3)):
            shutil.rmtree(work / "cache" / "reruns", ignore_errors=True)
            full_walls.append(timed(command, env)[0])
        load_after = os.getloadavg()
        median = statistics.median(walls)
        print(
            f"{args.runs} reruns of `neuron-export sd` on the tiny SD pipeline "
            f"({'cached bytecode' if not args.no_bytecode_cache else 'bytecode as the environment has it'}; "
            f"{os.cpu_count()} cores, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after)"
        )
        print(f"  wall  median {median:.3f} s, fastest {min(walls):.3f} s")
        print(f"  cpu   median {statistics.median(cpus):.3f} s, least {min(cpus):.3f} s")
        print(
            f"  answered in full (no rerun record, {len(full_walls)} runs): median {statistics.median(full_walls):.3f} s "
            f"(the quick answer takes {median / statistics.median(full_walls):.2f} of it)"
        )
        print(f"  interpreter start (python -c pass): median {statistics.median(start):.3f} s")
        print(f"  interpreter, typer and pydantic imported: median {statistics.median(floor):.3f} s")
        print(
            f"  target {TARGET_SECONDS} s: median / target = {median / TARGET_SECONDS:.2f} "
            f"({'met' if median <= TARGET_SECONDS else 'missed'})"
        )
        print("  costliest imports of one rerun (cumulative ms):")
        for milliseconds, name in costliest_imports(command, env):
            print(f"    {milliseconds:7.1f}  {name}")
        return 0 if median <= TARGET_SECONDS else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
