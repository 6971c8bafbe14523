"""Runs a Plan: one component at a time is loaded, traced, saved, freed, then reloaded and checked.

Memory stays near one component's weights: the eager model's reference outputs on fresh inputs are
computed before tracing, the model is freed after saving, and only then is the artifact loaded back.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from neuron_export import __version__
from neuron_export.backends import get_backend
from neuron_export.backends.neuron import device_present
from neuron_export.backends.request import CompileRequest
from neuron_export.components import family_module, flatten, make_inputs
from neuron_export.cache import CacheEntry, ComponentCache, link_or_copy
from neuron_export.errors import BuildError, StorageError, UserError
from neuron_export.layout import ARTIFACT_NAME, check_writable, publish, staging_directory, write_layout
from neuron_export.manifest import (
    ComponentRecord, FileRecord, Manifest, PipelineRecord, SourceRecord, TensorRecord, ValidationRecord,
    environment, file_record, normalized_config,
)
from neuron_export.plan import Job, Plan
from neuron_export.source import PROCESSOR_FOLDERS
from neuron_export.storage import check_room, writing

TRACE_SEED, VALIDATION_SEED = 0, 1
# Where each component of an export came from in this run (the `origin` --json reports per component).
BUILT, CACHED, DOWNLOADED = "built", "cached", "downloaded"  # downloaded: from a remote cache (not implemented yet)
ORIGINS = (BUILT, CACHED, DOWNLOADED)


@dataclass(frozen=True)
class BuildEvent:
    """Progress for the renderer: a component starts a stage, or finishes with its record."""

    component: str
    index: int
    total: int
    stage: str  # "cached", "loading", "tracing", "validating", "done"
    record: ComponentRecord | None = None


EventHandler = Callable[[BuildEvent], None]


def limit_fragmentation() -> None:
    """Return freed tensor memory to the OS promptly (glibc keeps large freed arenas otherwise)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 131072)  # M_MMAP_THRESHOLD: big allocations get their own mapping
        libc.mallopt(-1, 131072)  # M_TRIM_THRESHOLD: trim the heap top eagerly
    except OSError:
        pass


def quiet_libraries() -> None:
    """Our progress lines are the output; library chatter (accelerate hints, tracer warnings) is not."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Tt]racer.*")
    warnings.filterwarnings("ignore", module=r"torch\.jit.*")
    warnings.filterwarnings("ignore", module=r"(diffusers|transformers)\..*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()


def release_memory() -> None:
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the kernel's peak-RSS counter
    except OSError:
        pass


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_abs_diff(expected: list[Any], actual: list[Any]) -> float:
    if len(expected) != len(actual):
        raise BuildError(f"the artifact returned {len(actual)} tensors where the eager model returns {len(expected)}")
    worst = 0.0
    for want, got in zip(expected, actual):
        if tuple(want.shape) != tuple(got.shape):
            raise BuildError(f"the artifact returned shape {tuple(got.shape)} where the eager model returns {tuple(want.shape)}")
        worst = max(worst, float((want.float() - got.float()).abs().max()))
    return worst


def children_peak_rss_bytes() -> int:
    """The largest finished child process (neuronx-cc runs as one) of this worker."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def build_component(job: Job, plan: Plan, directory: Path, workdir: Path, on_stage: Callable[[str], None]) -> ComponentRecord:
    """Load, trace, save (as directory/model.neuron) and check one component. Runs in a worker process."""
    import torch

    limit_fragmentation()
    quiet_libraries()
    spec = job.spec
    family = family_module(spec.name)
    backend = get_backend(plan.backend)
    skip_reason = "skipped: disabled by --disable-validation" if plan.config.disable_validation else backend.validation_skip_reason()
    started = time.perf_counter()
    reset_peak_rss()

    on_stage("loading")
    with torch.no_grad():
        model = family.load(job.source_folder, spec)
        parameter_count = sum(p.numel() for p in model.parameters())
        trace_inputs = make_inputs(spec.inputs, TRACE_SEED)
        validation_inputs = make_inputs(spec.inputs, VALIDATION_SEED) if skip_reason is None else None
        expected = [t.clone() for t in family.reference(model, spec, validation_inputs)] if validation_inputs else None

        on_stage("tracing")
        wrapper = family.wrap(model, spec)
        compiler_args = list(job.compiler_args) if plan.backend == "neuron" else []
        request = CompileRequest(
            component=spec.name, compiler_args=tuple(compiler_args), inline_weights=plan.config.inline_weights,
            cpu_backend=plan.backend == "neuron" and not device_present(), after_trace=job.after_trace,
            workdir=workdir / spec.name,
        )
        try:
            traced = backend.compile(wrapper, trace_inputs, request)
        except Exception as exc:
            kept = f"; compiler work dir and log kept in {workdir / spec.name}" if plan.backend == "neuron" else ""
            reason = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise BuildError(f"Compiling {spec.name} failed: {type(exc).__name__}: {reason}{kept}.") from exc
        artifact = directory / ARTIFACT_NAME
        # torch aborts the whole process when the disk fills mid-save, so make sure the artifact fits first.
        needed = artifact_bytes_estimate(traced, job)
        check_room(f"{spec.name}'s artifact", directory, needed, "--cache-dir")
        with writing(f"{spec.name}'s artifact", directory, needed, "--cache-dir"):
            torch.jit.save(traced, str(artifact))
        del traced, wrapper, model, trace_inputs
        release_memory()

        if skip_reason is None:
            on_stage("validating")
            loaded = backend.load(artifact)
            actual = flatten(loaded(*validation_inputs))
            del loaded
            diff = max_abs_diff(expected, actual)
            status = "passed" if diff <= job.atol else "failed"
            validation = ValidationRecord(status=status, max_abs_diff=diff, atol=job.atol,
                                          reason=None if status == "passed" else f"max abs diff {diff:.3g} > atol {job.atol:g}")
        else:
            validation = ValidationRecord(status="skipped", reason=skip_reason, atol=job.atol)
    release_memory()
    if plan.backend == "neuron":
        shutil.rmtree(workdir / spec.name, ignore_errors=True)

    artifact_record = file_record(artifact, directory)
    return ComponentRecord(
        name=spec.name,
        model_type=spec.model_type,
        backend=plan.backend,
        compiler_type=backend.COMPILER_TYPE,
        compiler_version=backend.compiler_version(),
        compiler_args=compiler_args,
        neuron_compiler_args=list(job.compiler_args),
        inline_weights=plan.config.inline_weights,
        cpu_backend=request.cpu_backend if plan.backend == "neuron" else None,
        after_trace=list(job.after_trace),
        inputs=[TensorRecord(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in spec.inputs],
        outputs=list(spec.outputs),
        files=[FileRecord(path=f"{spec.name}/{ARTIFACT_NAME}", sha256=artifact_record.sha256, size=artifact_record.size)],
        source_files=source_file_records(plan, job),
        parameter_count=parameter_count,
        cache_key=job.cache_key,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(time.perf_counter() - started, 3),
        peak_rss_bytes=max(peak_rss_bytes(), children_peak_rss_bytes()),
        estimated_peak_bytes=job.estimated_peak_bytes,
        validation=validation,
    )


def artifact_bytes_estimate(traced: Any, job: Job) -> int:
    """The saved module's size: its tensors (each storage once), or the weight files' size when the weights
    are inside a compiled graph, plus room for the archive's code and headers."""
    storages = {}
    for tensor in traced.state_dict().values():
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return (sum(storages.values()) or job.weights.bytes) + 2**20


def source_file_records(plan: Plan, job: Job) -> list[FileRecord]:
    """The weight files a component was built from, with the hashes the plan already knows."""
    root = plan.source.unet_path if job.component == "unet" and plan.source.unet_path else plan.source.path
    records = []
    for path, digest in zip(job.weight_files, job.weight_hashes):
        try:
            relative = path.relative_to(root).as_posix()
        except ValueError:
            relative = path.name
        records.append(FileRecord(path=relative, sha256=digest, size=path.stat().st_size))
    return records


def make_manifest(plan: Plan, directory: Path, records: dict[str, ComponentRecord], component_files: set[str]) -> Manifest:
    config = plan.config
    other_files = sorted(p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() not in component_files)
    return Manifest(
        tool_version=__version__,
        created_at=max((record.built_at for record in records.values()), default=""),
        config=normalized_config(config),
        pipeline=PipelineRecord(
            family=config.family, task=config.task, kind=plan.facts.kind, is_lcm=plan.facts.is_lcm,
            diffusers_pipeline=plan.diffusers_pipeline, optimum_pipeline=plan.optimum_pipeline,
            data_parallel_mode=plan.data_parallel_mode, height=plan.height, width=plan.width,
            batch_size=config.batch_size, num_images_per_prompt=config.num_images_per_prompt,
        ),
        source=SourceRecord(model_id=plan.source.model_id, revision=plan.source.revision, commit=plan.source.commit,
                            unet_id=plan.source.unet_id, unet_commit=plan.source.unet_commit),
        environment=environment(plan.backend),
        components=records,
        files=[file_record(p, directory) for p in other_files],
    )


class _Worker:
    """A running component build and the read end of its pipe (EOF there means the process is gone)."""

    def __init__(self, process: Any, job: Job, build_dir: Path, reader: Any) -> None:
        self.process, self.job, self.build_dir, self.reader = process, job, build_dir, reader


def _start(job: Job, plan: Plan, cache: ComponentCache, workdir: Path) -> _Worker:
    from neuron_export.worker import context, worker_main

    with writing("the component cache", cache.root, job.weights.bytes, "--cache-dir"):
        build_dir = cache.new_build_dir(job.cache_key)
    # One pipe per worker, not a shared queue: no named semaphores to outlive an interrupted parent.
    reader, writer = context().Pipe(duplex=False)
    process = context().Process(target=worker_main, args=(plan, job, build_dir, workdir, writer), daemon=True,
                                name=f"neuron-export-{job.component}")
    try:
        process.start()
    except BaseException:  # interrupted while starting: leave nothing behind
        if process.pid is not None:
            process.kill()
            process.join()
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    finally:
        writer.close()  # the worker holds the only write end now, so its exit shows as EOF here
    return _Worker(process, job, build_dir, reader)


def _worker_error(name: str, payload: tuple) -> Exception:
    kind, message = payload[0], payload[1]
    if kind == "UserError":
        return UserError(message)
    if kind == "StorageError":
        return StorageError(message)
    if kind == "crash":
        return BuildError(f"{message[0].upper()}{message[1:]}; nothing was written.")
    return BuildError(message)


def _died(worker: _Worker) -> BuildError:
    """A worker that closed its pipe without a result was killed (most often by the kernel, out of memory)."""
    worker.process.join()
    code = worker.process.exitcode or 0
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    hint = " (SIGKILL: most likely out of memory; lower --jobs or --max-memory)" if code == -9 else ""
    return BuildError(f"The worker building {worker.job.component} died with {how}{hint}; nothing was written.")


def build_missing(plan: Plan, jobs: list[Job], cache: ComponentCache, workdir: Path,
                  on_event: EventHandler) -> dict[str, CacheEntry]:
    """Build jobs in worker processes, at most --jobs at once and only while their estimated peaks fit
    the memory budget together; each finished component is stored in the cache at once."""
    from multiprocessing.connection import wait

    pending = list(jobs)
    running: dict[str, _Worker] = {}
    built: dict[str, CacheEntry] = {}
    index = {job.component: plan.jobs.index(job) + 1 for job in jobs}
    total = len(plan.jobs)
    try:
        while pending or running:
            for job in list(pending):
                in_use = sum(w.job.estimated_peak_bytes for w in running.values())
                if len(running) >= plan.config.jobs:
                    break
                if running and in_use + job.estimated_peak_bytes > plan.memory_budget:
                    continue  # wait for memory; a smaller job later in the list may still fit
                running[job.component] = _start(job, plan, cache, workdir)
                pending.remove(job)
            for reader in wait([w.reader for w in running.values()]):
                worker = next(w for w in running.values() if w.reader is reader)
                name = worker.job.component
                try:
                    kind, payload = reader.recv()
                except EOFError:
                    raise _died(worker) from None
                if kind == "stage":
                    on_event(BuildEvent(name, index[name], total, payload))
                    continue
                worker.process.join()
                del running[name]
                if kind == "error":
                    shutil.rmtree(worker.build_dir, ignore_errors=True)
                    raise _worker_error(name, payload)
                record = ComponentRecord.model_validate_json(payload)
                if record.validation.status == "failed":
                    shutil.rmtree(worker.build_dir, ignore_errors=True)
                    on_event(BuildEvent(name, index[name], total, "done", record))
                    raise BuildError(
                        f"Validation of {name} failed: {record.validation.reason} on fresh inputs; "
                        "nothing was written (raise --atol only if this difference is acceptable)."
                    )
                with writing("the component cache", cache.root, len(payload), "--cache-dir"):  # its record.json
                    built[name] = cache.store(worker.job.cache_key, worker.build_dir, record)
                on_event(BuildEvent(name, index[name], total, "done", record))
    finally:
        for worker in running.values():
            worker.process.kill()
            worker.process.join()
            worker.reader.close()
            shutil.rmtree(worker.build_dir, ignore_errors=True)
    return built


def run_export(plan: Plan, on_event: EventHandler = lambda event: None) -> tuple[Manifest, dict[str, str]]:
    """Reuse every cached component, build the rest in workers, then assemble the export in a hidden
    sibling directory and rename it into place only when all of it succeeded. Returns the manifest and
    where each component came from (one of ORIGINS)."""
    if plan.up_to_date:
        return Manifest.read(plan.output), {job.component: CACHED for job in plan.jobs}
    check_writable(plan.output, export_bytes(plan, sum(job.weights.bytes for job in plan.jobs)), "--output")
    cache = ComponentCache(plan.cache_dir)
    cache.remove_orphans()
    total = len(plan.jobs)
    entries: dict[str, CacheEntry] = {}
    for index, job in enumerate(plan.jobs, start=1):
        entry = cache.lookup(job.cache_key)  # hash-checked; a bad entry is discarded and rebuilt
        if entry is not None:
            entries[job.component] = entry
            on_event(BuildEvent(job.component, index, total, "cached", entry.record))
    missing = [job for job in plan.jobs if job.component not in entries]
    origins = {job.component: CACHED if job.component in entries else BUILT for job in plan.jobs}
    workdir = plan.output.absolute().parent / f".{plan.output.name}.neuron-work"
    if missing:
        entries.update(build_missing(plan, missing, cache, workdir, on_event))
    shutil.rmtree(workdir, ignore_errors=True)

    needed = export_bytes(plan, sum(f.size for entry in entries.values() for f in entry.record.files))
    with writing("the export", plan.output, needed, "--output"), staging_directory(plan.output) as staging:
        records: dict[str, ComponentRecord] = {}
        for job in plan.jobs:
            entry = entries[job.component]
            link_or_copy(entry.artifact, staging / job.component / ARTIFACT_NAME)
            records[job.component] = entry.record
        write_layout(plan, staging, records)
        component_files = {f.path for record in records.values() for f in record.files}
        manifest = make_manifest(plan, staging, records, component_files)
        manifest.write(staging)
        publish(staging, plan.output, plan.config.force)
    return manifest, origins


def export_bytes(plan: Plan, artifacts: int) -> int:
    """The finished export's size when nothing can be hard-linked: artifacts, processors and configs."""
    copied = sum(p.stat().st_size for name in PROCESSOR_FOLDERS if (plan.source.path / name).is_dir()
                 for p in (plan.source.path / name).rglob("*") if p.is_file())
    return artifacts + copied + 2**20  # configs, model_index.json and the manifest
