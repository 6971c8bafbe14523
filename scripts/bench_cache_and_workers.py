"""Component cache, worker processes and estimates, measured on a tiny SD pipeline and full-size SD 1.5 (cpu backend).

Every figure printed is measured in this one run (timings are compared as ratios within it):

1. cold export vs rerun of the same export (same output: must say "up to date") vs reassembly from the
   cache (output deleted, rerun): wall seconds and ratios; whether the rerun left every output file
   byte-identical (sha256 of every file before and after); whether the rerun opened any weight file
   (strace -f of a second rerun; a Python audit hook names the code that opened it).
2. --jobs 1 vs --jobs 2, each on a fresh cache: wall seconds and the speed-up.
3. full-size SD 1.5: estimated vs measured peak RSS per component (manifest's estimated_peak_bytes and
   peak_rss_bytes), within 30%?; estimated vs measured build seconds (informational).

Targets (exit 1 when one is missed): rerun < 2 s on both sizes, no weight file opened by the rerun,
rerun output byte-identical, |estimated/measured peak - 1| <= 0.30 per full-size component.
Exit 2 when an export command itself fails.

    python scripts/bench_cache_and_workers.py [--model-dir DIR] [--skip-full] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_export_memory import descendants, pss_bytes  # the same process-tree sampling

RERUN_TARGET_SECONDS = 2.0
ESTIMATE_TOLERANCE = 0.30
MAX_MEMORY = "20GiB"
BUSY_CORES = 0.3  # other processes' average load above which a timing is flagged BUSY
GIB = 2**30

# Run inside the rerun's interpreter: name the project code that opens a weight file (stack of the open).
AUDIT_RUNNER = r"""
import sys, traceback
def hook(event, args):
    if event == "open" and args and str(args[0]).endswith(".safetensors"):
        frames = [f for f in traceback.extract_stack()[:-1] if "neuron_export" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-3:]))
        sys.stderr.write(f"AUDIT-OPEN {args[0]} | {where}\n")
from pathlib import Path
sys.addaudithook(hook)
from neuron_export.cli.main import main
sys.argv = ["neuron-export", *sys.argv[1:]]
main()
"""


class Failure(Exception):
    """An export command failed: nothing after it can be measured."""


# --- measuring one command --------------------------------------------------------------------------


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its own, not its children's)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    label: str
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    tree_peak_pss: int = 0
    other_cores: float = 0.0  # average cores busy with processes that are not this command's
    own_cores: float = 0.0  # average cores busy with this command's process tree

    @property
    def busy_note(self) -> str:
        return f"other load {self.other_cores:.2f} cores" + (" (BUSY)" if self.other_cores > BUSY_CORES else "")


def run(label: str, command: list[str], env: dict[str, str], sample_memory: bool = False) -> Run:
    """Wall time of a command; how many cores other processes kept busy meanwhile (machine CPU time less
    the command's process tree's, sampled every 0.1 s: the forkserver's workers are not our children);
    optionally the peak PSS of the whole process tree (workers included)."""
    busy0 = cpu_busy_seconds()
    reaped0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    self0 = resource.getrusage(resource.RUSAGE_SELF)  # this script's own sampling is not "other load"
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    cpu: dict[int, float] = {}  # pid -> its CPU seconds when last seen
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            tree = descendants(process.pid)
            for pid in tree:
                cpu[pid] = max(cpu.get(pid, 0.0), own_cpu_seconds(pid))
            if sample_memory:
                peak = max(peak, sum(pss_bytes(p) for p in tree))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # the direct child, exact once reaped
    cpu[process.pid] = max(
        cpu.get(process.pid, 0.0), reaped.ru_utime + reaped.ru_stime - reaped0.ru_utime - reaped0.ru_stime
    )
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    sampling = self1.ru_utime + self1.ru_stime - self0.ru_utime - self0.ru_stime
    others = (cpu_busy_seconds() - busy0) - sum(cpu.values()) - sampling
    result = Run(
        label,
        seconds,
        process.returncode,
        stdout,
        stderr,
        peak,
        max(0.0, others / seconds),
        sum(cpu.values()) / seconds,
    )
    if process.returncode != 0:
        print(f"\n{label} failed (exit {process.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}", flush=True)
        raise Failure(label)
    return result


def export_command(model: Path, output: Path, cache: Path, jobs: int = 1, json_mode: bool = True) -> list[str]:
    command = [
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
        "--cache-dir",
        str(cache),
        "--jobs",
        str(jobs),
        "--max-memory",
        MAX_MEMORY,
    ]
    return command + (["--json"] if json_mode else [])


def environment(cache: Path) -> dict[str, str]:
    return {**os.environ, "NEURON_EXPORT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def plan_json(model: Path, output: Path, cache: Path, jobs: int) -> dict:
    command = [
        sys.executable,
        "-m",
        "neuron_export",
        "plan",
        "sd",
        "-m",
        str(model),
        "--backend",
        "cpu",
        "-o",
        str(output),
        "--cache-dir",
        str(cache),
        "--jobs",
        str(jobs),
        "--max-memory",
        MAX_MEMORY,
        "--json",
    ]
    return json.loads(run("plan", command, environment(cache)).stdout)


# --- files --------------------------------------------------------------------------------------------


def tree_state(directory: Path) -> dict[str, tuple[str, int, int]]:
    """relative path -> (sha256, inode, mtime_ns) of every file."""
    state = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(8 * 2**20), b""):
                digest.update(chunk)
        stat = path.stat()
        state[path.relative_to(directory).as_posix()] = (digest.hexdigest(), stat.st_ino, stat.st_mtime_ns)
    return state


def weight_files(model: Path) -> list[Path]:
    return sorted(model.rglob("*.safetensors"))


@dataclass
class OpenCheck:
    method: str
    opened: dict[str, int] = field(default_factory=dict)  # weight file -> times opened
    bytes_read: dict[str, int] = field(default_factory=dict)  # weight file -> bytes read / mapped
    sizes: dict[str, int] = field(default_factory=dict)  # weight file -> its size
    callers: list[str] = field(default_factory=list)  # where (audit hook) the project opened them
    conclusive: bool = True
    files_opened: int = 0  # every file the traced rerun opened (shows the trace worked)
    processes: int = 0


OPEN_RE = re.compile(r"^(?:openat|open|openat2)\(.*\)\s+=\s+\d+<([^>]+)>")
READ_RE = re.compile(r"^(?:read|pread64|readv|preadv)\(\d+<([^>]+)>.*\)\s+=\s+(\d+)")
MMAP_RE = re.compile(r"^mmap\([^,]+, (\d+), [^,]+, [^,]+, \d+<([^>]+)>")


def strace_weight_opens(command: list[str], env: dict[str, str], work: Path, model: Path) -> OpenCheck:
    """Every openat/read/mmap of the command and all its processes, kept to the model's safetensors files."""
    trace_dir = work / "strace"
    shutil.rmtree(trace_dir, ignore_errors=True)
    trace_dir.mkdir(parents=True)
    traced = [
        "strace",
        "-f",
        "-ff",
        "-qq",
        "-y",
        "-s",
        "0",
        "-e",
        "trace=open,openat,openat2,read,pread64,readv,preadv,mmap",
        "-o",
        str(trace_dir / "t"),
        *command,
    ]
    run("strace rerun", traced, env)
    weights = {str(p.resolve()): p.stat().st_size for p in weight_files(model)}
    check = OpenCheck("strace -f of a second rerun: openat/read/mmap", sizes=weights)

    def is_weight(path: str) -> bool:
        return path in weights or path.endswith(".safetensors")

    for trace in trace_dir.iterdir():
        check.processes += 1
        for line in trace.read_text(errors="replace").splitlines():
            if match := OPEN_RE.match(line):
                check.files_opened += 1
                if is_weight(match.group(1)):
                    check.opened[match.group(1)] = check.opened.get(match.group(1), 0) + 1
            elif (match := READ_RE.match(line)) and is_weight(match.group(1)):
                check.bytes_read[match.group(1)] = check.bytes_read.get(match.group(1), 0) + int(match.group(2))
            elif (match := MMAP_RE.match(line)) and is_weight(match.group(2)):
                check.bytes_read[match.group(2)] = check.bytes_read.get(match.group(2), 0) + int(match.group(1))
    shutil.rmtree(trace_dir, ignore_errors=True)
    return check


def atime_weight_opens(command: list[str], env: dict[str, str], model: Path) -> OpenCheck:
    """Fallback without strace: a weight file whose atime moved was read (relatime may hide a read)."""
    before = {p: p.stat().st_atime_ns for p in weight_files(model)}
    run("atime rerun", command, env)
    check = OpenCheck("atime (relatime mount: a read may leave atime unchanged)")
    check.opened = {str(p): 1 for p, atime in before.items() if p.stat().st_atime_ns != atime}
    check.sizes = {str(p): p.stat().st_size for p in before}
    check.conclusive = bool(check.opened) or "strictatime" in Path("/proc/mounts").read_text()
    return check


def audit_callers(command: list[str], env: dict[str, str]) -> list[str]:
    """The project frames that opened weight files, from a Python audit hook in the rerun's interpreter."""
    index = command.index("neuron_export")
    audited = [sys.executable, "-c", AUDIT_RUNNER, *command[index + 1 :]]
    result = run("audited rerun", audited, env)
    seen: dict[str, int] = {}
    for line in result.stderr.splitlines():
        if line.startswith("AUDIT-OPEN "):
            _, _, where = line[len("AUDIT-OPEN ") :].partition(" | ")
            seen[where] = seen.get(where, 0) + 1
    return [f"{count}x {where}" for where, count in seen.items()]


# --- one pipeline size --------------------------------------------------------------------------------


@dataclass
class SizeResult:
    name: str
    cold: Run
    rerun: Run
    reassembly: Run
    up_to_date: bool
    identical: bool
    rewritten: list[str]
    differing: list[str]
    reassembled_identical: bool
    file_count: int
    opens: OpenCheck
    serial: Run
    parallel: Run
    plan1: dict
    plan2: dict
    manifest1: dict
    manifest2: dict
    missed: list[str] = field(default_factory=list)


def measure(name: str, model: Path, work: Path, use_strace: bool) -> SizeResult:
    print(f"\n=== {name}: {model} ===", flush=True)
    base = work / f"{name}-runs"  # beside the model: an output inside the source is refused
    cache_a, out_a = base / "cache-serial", base / "export-serial"
    env_a = environment(cache_a)

    plan1 = plan_json(model, out_a, cache_a, 1)
    print(f"[{name}] cold export (--jobs 1, fresh cache) ...", flush=True)
    cold = run("cold export", export_command(model, out_a, cache_a, jobs=1), env_a, sample_memory=True)
    manifest1 = json.loads((out_a / "manifest.json").read_text())
    before = tree_state(out_a)

    print(f"[{name}] rerun of the unchanged export ...", flush=True)
    rerun_command = export_command(model, out_a, cache_a, jobs=1, json_mode=False)
    rerun = run("rerun", rerun_command, env_a)
    up_to_date = "is up to date" in rerun.stdout
    after = tree_state(out_a)
    identical = {k: v[0] for k, v in before.items()} == {k: v[0] for k, v in after.items()}
    differing = sorted(set(before) ^ set(after) | {k for k in set(before) & set(after) if before[k][0] != after[k][0]})
    rewritten = sorted(k for k in set(before) & set(after) if before[k][1:] != after[k][1:])

    print(f"[{name}] checking which files the rerun opens ...", flush=True)
    if use_strace:
        opens = strace_weight_opens(rerun_command, env_a, base, model)
    else:
        opens = atime_weight_opens(rerun_command, env_a, model)
    if opens.opened:
        opens.callers = audit_callers(rerun_command, env_a)
    after_traced = tree_state(out_a)  # after the traced (and audited) reruns too
    identical = identical and {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in after_traced.items()}

    print(f"[{name}] reassembly from the cache (output deleted) ...", flush=True)
    shutil.rmtree(out_a)
    reassembly = run("reassembly", export_command(model, out_a, cache_a, jobs=1), env_a)
    reassembled = tree_state(out_a)
    reassembled_identical = {k: v[0] for k, v in reassembled.items()} == {k: v[0] for k, v in before.items()}
    manifest_reassembled = json.loads((out_a / "manifest.json").read_text())
    rebuilt = [
        c
        for c, r in manifest_reassembled["components"].items()
        if r["built_at"] != manifest1["components"][c]["built_at"]
    ]
    if rebuilt:
        print(f"[{name}] WARNING: reassembly rebuilt {', '.join(rebuilt)} instead of taking them from the cache")

    cache_b, out_b = base / "cache-jobs2", base / "export-jobs2"
    plan2 = plan_json(model, out_b, cache_b, 2)
    print(f"[{name}] --jobs 2 export (fresh cache) ...", flush=True)
    parallel = run("jobs 2", export_command(model, out_b, cache_b, jobs=2), environment(cache_b), sample_memory=True)
    manifest2 = json.loads((out_b / "manifest.json").read_text())
    shutil.rmtree(out_b, ignore_errors=True)
    shutil.rmtree(cache_b, ignore_errors=True)
    return SizeResult(
        name,
        cold,
        rerun,
        reassembly,
        up_to_date,
        identical,
        rewritten,
        differing,
        reassembled_identical,
        len(before),
        opens,
        cold,
        parallel,
        plan1,
        plan2,
        manifest1,
        manifest2,
    )


# --- printing -----------------------------------------------------------------------------------------


def gib(count: float) -> str:
    return f"{count / GIB:.2f} GiB"


def report(result: SizeResult, memory_target: bool) -> None:
    r = result
    print(f"\n--- {r.name}: 1. cold export vs rerun vs reassembly from cache ---")
    print(f"  cold export      {r.cold.seconds:8.2f} s   ({r.cold.busy_note})")
    print(
        f"  rerun            {r.rerun.seconds:8.2f} s   ({r.rerun.busy_note})  cold/rerun = {r.cold.seconds / r.rerun.seconds:.0f}x"
        f"   target < {RERUN_TARGET_SECONDS:.0f} s: {'PASS' if r.rerun.seconds < RERUN_TARGET_SECONDS else 'FAIL'}"
    )
    print(
        f"  reassembly       {r.reassembly.seconds:8.2f} s   ({r.reassembly.busy_note})  cold/reassembly = "
        f"{r.cold.seconds / r.reassembly.seconds:.1f}x, reassembly/rerun = {r.reassembly.seconds / r.rerun.seconds:.1f}x"
    )
    print(f"  rerun reported up to date: {'yes' if r.up_to_date else 'NO'}")
    print(
        f"  rerun output byte-identical (sha256 of all {r.file_count} files, before/after both reruns): "
        f"{'yes' if r.identical else 'NO: ' + ', '.join(r.differing)}; files rewritten (inode or mtime changed): "
        f"{len(r.rewritten)}{' (' + ', '.join(r.rewritten) + ')' if r.rewritten else ''}"
    )
    print(f"  reassembled output byte-identical to the cold export: {'yes' if r.reassembled_identical else 'no'}")
    o = r.opens
    if o.opened:
        print(f"  rerun opened weight files ({o.method}): YES")
        for path, count in sorted(o.opened.items()):
            read = o.bytes_read.get(path)
            how = f"{read} bytes read or mapped" if read is not None else "bytes read not traced"
            print(f"    {path}: opened {count}x, {how} (file is {o.sizes.get(path, 0)} bytes)")
        for caller in o.callers:
            print(f"    opened by: {caller}")
    else:
        note = "" if o.conclusive else " (inconclusive)"
        traced = f"; the trace saw {o.files_opened} files opened by {o.processes} process(es)" if o.processes else ""
        print(f"  rerun opened weight files ({o.method}): no{note}{traced}")

    speedup = r.serial.seconds / r.parallel.seconds
    print(f"\n--- {r.name}: 2. --jobs 1 vs --jobs 2, fresh cache each (--max-memory {MAX_MEMORY}) ---")
    print(
        f"  --jobs 1  {r.serial.seconds:8.2f} s  (the cold export above; plan estimated {r.plan1['estimated_wall_seconds']} s;"
        f" process-tree peak PSS {gib(r.serial.tree_peak_pss)}; {r.serial.busy_note})"
    )
    print(
        f"  --jobs 2  {r.parallel.seconds:8.2f} s  (plan estimated {r.plan2['estimated_wall_seconds']} s;"
        f" process-tree peak PSS {gib(r.parallel.tree_peak_pss)}; {r.parallel.busy_note})"
    )
    print(
        f"  speed-up jobs1/jobs2 = {speedup:.2f}x  ({os.cpu_count()} cores; the export's own processes kept "
        f"{r.serial.own_cores:.2f} cores busy with --jobs 1, {r.parallel.own_cores:.2f} with --jobs 2)"
    )
    if abs(r.serial.other_cores - r.parallel.other_cores) > BUSY_CORES:
        print(
            "  CAUTION: other processes loaded the machine differently during the two runs; this speed-up is not "
            "a fair comparison"
        )

    estimates = {c["component"]: c for c in r.plan1["components"]}
    print(
        f"\n--- {r.name}: 3. estimated vs measured per component (--jobs 1 run; peak RSS also from the --jobs 2 run) ---"
    )
    print(
        f"  {'component':<13}{'est. peak':>11}{'measured':>11}{'est/meas':>9}{'within 30%':>11}{'jobs2 meas':>12}"
        f"{'est. s':>8}{'meas. s':>9}{'est/meas':>9}{'jobs2 s':>9}"
    )
    for name, record in r.manifest1["components"].items():
        estimated, measured = record["estimated_peak_bytes"], record["peak_rss_bytes"]
        ratio = estimated / measured
        ok = abs(ratio - 1) <= ESTIMATE_TOLERANCE
        verdict = ("PASS" if ok else "FAIL") if memory_target else ("yes" if ok else "no") + " (info)"
        est_s, meas_s = estimates[name]["estimated_seconds"], record["build_seconds"]
        other = r.manifest2["components"][name]
        print(
            f"  {name:<13}{gib(estimated):>11}{gib(measured):>11}{ratio:>9.2f}{verdict:>11}{gib(other['peak_rss_bytes']):>12}"
            f"{est_s:>8.1f}{meas_s:>9.1f}{est_s / meas_s:>9.2f}{other['build_seconds']:>9.1f}"
        )
        if memory_target and not ok:
            r.missed.append(
                f"{r.name}: {name} peak estimate {gib(estimated)} vs measured {gib(measured)} (x{ratio:.2f})"
            )
    if r.rerun.seconds >= RERUN_TARGET_SECONDS:
        r.missed.append(f"{r.name}: rerun took {r.rerun.seconds:.2f} s (target < {RERUN_TARGET_SECONDS:.0f} s)")
    if not r.up_to_date:
        r.missed.append(f"{r.name}: the rerun did not report the export up to date")
    if not r.identical:
        r.missed.append(f"{r.name}: rerun changed output files: {', '.join(r.differing)}")
    if o.opened:
        r.missed.append(
            f"{r.name}: the rerun opened weight files ({', '.join(sorted(Path(p).parent.name + '/' + Path(p).name for p in o.opened))}; "
            f"{sum(o.opened.values())} opens)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="an existing sd15-full example (built when absent)")
    parser.add_argument("--skip-full", action="store_true", help="only the tiny SD pipeline")
    parser.add_argument("--keep", action="store_true", help="keep the temporary models, caches and exports")
    args = parser.parse_args()

    use_strace = shutil.which("strace") is not None
    if not use_strace:
        print("strace not found (apt-get install -y strace): falling back to atime, which relatime can hide")
    work = Path(tempfile.mkdtemp(prefix="bench-cache-workers-"))
    print(f"work dir {work}; {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    results: list[tuple[SizeResult, bool]] = []
    try:
        tiny = work / "tiny-sd"
        subprocess.run(
            [sys.executable, "-m", "neuron_export.testing.examples", "sd", str(tiny)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        results.append((measure("tiny-sd", tiny.resolve(), work, use_strace), False))
        report(*results[-1])
        if not args.skip_full:
            model = args.model_dir or work / "sd15-full"
            if not (model / "model_index.json").exists():
                print(f"building full-size SD 1.5 (random weights) in {model} ...", flush=True)
                subprocess.run(
                    [sys.executable, str(Path(__file__).with_name("sd15_full.py")), str(model)],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            results.append((measure("sd15-full", model.resolve(), work, use_strace), True))
            report(*results[-1])
    except Failure:
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")

    missed = [m for result, _ in results for m in result.missed]
    print("\nTARGETS: " + ("all met" if not missed else f"{len(missed)} missed"))
    for item in missed:
        print(f"  MISSED {item}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
