"""Runs a Plan, the parent's side: cache lookups, the missing components built in worker processes
(worker.py) within the memory budget, then the export assembled beside its output and renamed into place."""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from neuron_export.build.backends.select import get_backend
from neuron_export.build.layout import check_writable, claim_output, publish, staging_directory, write_layout
from neuron_export.build.validation import DISABLED, failure_message, remember, reuse
from neuron_export.build.worker import WorkOrder, context, source_file_records, worker_main
from neuron_export.errors import BuildError, ExportError
from neuron_export.events import BuildEvent, EventHandler, Stage
from neuron_export.files import ARTIFACT_NAME
from neuron_export.manifest import (
    AddOnRecord,
    ComponentRecord,
    LoraRecord,
    Manifest,
    PipelineRecord,
    SourceRecord,
    ValidationRecord,
    environment,
    file_record,
)
from neuron_export.planning.jobs import Job, Plan
from neuron_export.planning.source import PROCESSOR_FOLDERS
from neuron_export.store.cache import CacheEntry, ComponentCache, link_or_copy
from neuron_export.store.remote import RemoteCache
from neuron_export.store.remote_trust import trust_of
from neuron_export.store.storage import writing
from neuron_export.store.supply import BUILT, supply
from neuron_export.version import __version__


def make_manifest(
    plan: Plan, directory: Path, records: dict[str, ComponentRecord], component_files: set[str]
) -> Manifest:
    config = plan.config
    other_files = sorted(
        p for p in directory.rglob("*") if p.is_file() and p.relative_to(directory).as_posix() not in component_files
    )
    return Manifest(
        tool_version=__version__,
        created_at=max((record.built_at for record in records.values()), default=""),
        config=plan.resolved_config,
        pipeline=PipelineRecord(
            family=config.spec.family,
            task=config.spec.task,
            architecture=plan.facts.architecture,
            is_lcm=plan.facts.is_lcm,
            diffusers_pipeline=plan.diffusers_pipeline,
            optimum_pipeline=plan.optimum_pipeline,
            data_parallel_mode=plan.data_parallel_mode,
            height=plan.height,
            width=plan.width,
            batch_size=config.spec.batch_size,
            num_images_per_prompt=config.spec.num_images_per_prompt,
        ),
        source=SourceRecord(
            model_id=plan.source.model_id,
            revision=plan.source.revision,
            commit=plan.source.commit,
            unet_id=plan.source.unet_id,
            unet_commit=plan.source.unet_commit,
            vae_id=plan.source.vae_id,
            vae_commit=plan.source.vae_commit,
            loras=[
                LoraRecord(
                    source=a.source,
                    weight_name=a.weight_name,
                    adapter_name=a.adapter_name,
                    scale=a.scale,
                    sha256=a.sha256,
                    commit=a.commit,
                    components=[c for c in a.components if c in records],
                )
                for a in plan.loras
            ],
            **add_on_records(plan),
        ),
        environment=environment(plan.backend),
        components=records,
        files=[file_record(p, directory) for p in other_files],
    )


def add_on_records(plan: Plan) -> dict[str, Any]:
    """The ControlNets and IP-Adapter an export was built with, where they came from."""
    source, config = plan.source, plan.config
    adapter = None
    if source.ip_adapter is not None:
        file = "/".join(part for part in (config.spec.ip_adapter_subfolder, config.spec.ip_adapter_weight_name) if part)
        adapter = AddOnRecord(model_id=source.ip_adapter.model_id, commit=source.ip_adapter.commit, file=file)
    return {
        "controlnets": [AddOnRecord(model_id=item.model_id, commit=item.commit) for item in source.controlnets],
        "ip_adapter": adapter,
    }


class _Worker:
    """A running component build and the read end of its pipe (EOF there means the process is gone)."""

    def __init__(self, process: Any, job: Job, build_dir: Path, reader: Any) -> None:
        self.process, self.job, self.build_dir, self.reader = process, job, build_dir, reader


def work_order(job: Job, plan: Plan, artifact: Path | None = None) -> WorkOrder:
    """What the worker building `job` (or checking its cached `artifact`) receives: the job and a few settings,
    not the plan (whose config holds the token)."""
    root = plan.source.origin(job.component).root
    return WorkOrder(
        job=job,
        backend=plan.backend,
        inline_weights=plan.config.spec.inline_weights,
        disable_validation=plan.config.spec.disable_validation,
        source_root=root,
        artifact=artifact,
    )


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM waits until the fork server has a worker's whole request (cut short, the fork server
    dies printing a traceback); the KeyboardInterrupt is raised as soon as the request is sent."""
    from multiprocessing import forkserver

    forkserver.ensure_running()  # started before blocking: the fork server and its workers must not inherit the mask
    deferred = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, deferred)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, deferred)


def _start(order: WorkOrder, cache: ComponentCache, workdir: Path) -> _Worker:
    job = order.job
    with writing("the component cache", cache.root, job.weights.bytes, "--cache-dir"):
        build_dir = cache.new_build_dir(job.cache_key)
    # One pipe per worker, not a shared queue: no named semaphores to outlive an interrupted parent.
    reader, writer = context().Pipe(duplex=False)
    process = context().Process(
        target=worker_main, args=(order, build_dir, workdir, writer), daemon=True, name=f"neuron-export-{job.component}"
    )
    try:
        with _interrupts_deferred():
            process.start()
    except BaseException as exc:  # interrupted while starting: leave nothing behind
        if process.pid is not None:
            process.kill()
            process.join()
        shutil.rmtree(build_dir, ignore_errors=True)
        if isinstance(exc, (EOFError, ConnectionError)):  # not an interrupt (click would call an EOFError one)
            raise BuildError(
                f"The worker building {job.component} could not start: the fork server that starts "
                f"workers is gone ({type(exc).__name__}: {exc}); nothing was written."
            ) from exc
        raise
    finally:
        writer.close()  # the worker holds the only write end now, so its exit shows as EOF here
    return _Worker(process, job, build_dir, reader)


def _worker_error(payload: tuple) -> ExportError:
    """The worker's exception, carrying the worker's traceback for NEURON_EXPORT_DEBUG=1."""
    error, worker_traceback = payload
    error.worker_traceback = worker_traceback
    return error


def _died(worker: _Worker) -> BuildError:
    """A worker that closed its pipe without a result was killed (most often by the kernel, out of memory)."""
    worker.process.join()
    code = worker.process.exitcode or 0
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    hint = " (SIGKILL: most likely out of memory; lower --jobs or --max-memory)" if code == -9 else ""
    return BuildError(f"The worker building {worker.job.component} died with {how}{hint}; nothing was written.")


def build_missing(
    plan: Plan, jobs: list[Job], cache: ComponentCache, workdir: Path, on_event: EventHandler
) -> dict[str, CacheEntry]:
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
                if len(running) >= plan.config.options.jobs:
                    break
                if running and in_use + job.estimated_peak_bytes > plan.memory_budget:
                    continue  # wait for memory; a smaller job later in the list may still fit
                running[job.component] = _start(work_order(job, plan), cache, workdir)
                pending.remove(job)
            for reader in wait([w.reader for w in running.values()]):
                worker = next(w for w in running.values() if w.reader is reader)
                name = worker.job.component
                try:
                    tag, payload = worker.reader.recv()
                except EOFError:
                    raise _died(worker) from None
                if tag == "stage":
                    on_event(BuildEvent(name, index[name], total, Stage(payload)))
                    continue
                worker.process.join()
                del running[name]
                built[name] = _finish(
                    worker,
                    tag,
                    payload,
                    cache,
                    lambda record: on_event(BuildEvent(name, index[name], total, Stage.DONE, record)),  # noqa: B023 (called now)
                )
    finally:
        for worker in running.values():
            _stop(worker)
    return built


def _finish(
    worker: _Worker, tag: str, payload: Any, cache: ComponentCache, done: Callable[[ComponentRecord], None]
) -> CacheEntry:
    """A worker's final message: its build stored in the cache, or its error raised (nothing kept)."""
    if tag == "error":
        shutil.rmtree(worker.build_dir, ignore_errors=True)
        raise _worker_error(payload)
    record = ComponentRecord.model_validate_json(payload)
    # Kept even when its check failed: the bytes do not depend on the tolerance, so a larger --atol reuses them.
    with writing("the component cache", cache.root, len(payload), "--cache-dir"):  # its record.json
        entry = cache.store(worker.job.cache_key, worker.build_dir, record)
    done(record)
    if record.validation.status == "failed":
        raise BuildError(failure_message(record.name, record.validation))
    return entry


def _stop(worker: _Worker) -> None:
    worker.process.kill()
    worker.process.join()
    worker.reader.close()
    shutil.rmtree(worker.build_dir, ignore_errors=True)


def _outcome(worker: _Worker, on_stage: Callable[[Stage], None]) -> tuple[str, Any]:
    """A worker's stages passed on until its final message, which is returned."""
    while True:
        try:
            tag, payload = worker.reader.recv()
        except EOFError:
            raise _died(worker) from None
        if tag == "stage":
            on_stage(Stage(payload))
            continue
        worker.process.join()
        return tag, payload


def build_one(order: WorkOrder, cache: ComponentCache, workdir: Path, on_stage: Callable[[Stage], None]) -> CacheEntry:
    """One component built in a worker process, as build_missing does, and stored in `cache`: what a cluster
    node runs for a Ray task (build/ray_executor.py)."""
    worker = _start(order, cache, workdir)
    try:
        tag, payload = _outcome(worker, on_stage)
        entry = _finish(worker, tag, payload, cache, lambda record: on_stage(Stage.DONE))
        worker.reader.close()
        return entry
    except BaseException:
        _stop(worker)  # harmless when it has exited: its build dir is gone or renamed into the cache
        raise


def check_cached(
    order: WorkOrder, cache: ComponentCache, workdir: Path, on_stage: Callable[[Stage], None]
) -> ValidationRecord:
    """A cached artifact compared with the eager model in a worker process (nothing is built)."""
    worker = _start(order, cache, workdir)
    try:
        tag, payload = _outcome(worker, on_stage)
    finally:
        _stop(worker)  # it has exited; its unused build dir goes
    if tag == "error":
        raise _worker_error(payload)
    return ValidationRecord.model_validate_json(payload)


def settle_validation(
    plan: Plan,
    entries: dict[str, CacheEntry],
    origins: dict[str, str],
    cache: ComponentCache,
    workdir: Path,
    on_event: EventHandler,
) -> dict[str, ComponentRecord]:
    """Each component's record for this export: its validation at this export's tolerance (measured by the
    build, reused from a stored measurement, or checked again now), and the source files of this pipeline."""
    skip_reason = get_backend(plan.backend).validation_skip_reason()
    records = {}
    for index, job in enumerate(plan.jobs, start=1):
        entry = entries[job.component]
        if plan.config.spec.disable_validation:
            result: ValidationRecord | None = ValidationRecord(status="skipped", reason=DISABLED, atol=job.atol)
        elif origins[job.component] == BUILT:
            result = entry.record.validation
        else:
            result = reuse(entry, job.atol) or (
                ValidationRecord(status="skipped", reason=skip_reason, atol=job.atol) if skip_reason else None
            )
        if result is None:

            def stage(name: Stage, job: Job = job, index: int = index) -> None:
                on_event(BuildEvent(job.component, index, len(plan.jobs), name))

            result = check_cached(work_order(job, plan, entry.artifact), cache, workdir, stage)
            remember(entry, result)
        record = entry.record.model_copy(
            update={
                "validation": result,
                "neuron_compiler_args": list(job.compiler_args),
                "source_files": source_file_records(work_order(job, plan)),
                "model": job.model or None,
                "inline_weights": plan.config.spec.inline_weights,
            }
        )
        if result.status == "failed":
            raise BuildError(failure_message(job.component, result))
        if origins[job.component] != BUILT:  # its build's own result was not this export's
            on_event(BuildEvent(job.component, index, len(plan.jobs), Stage.VALIDATED, record))
        records[job.component] = record
    return records


def run_export(plan: Plan, on_event: EventHandler = lambda event: None) -> tuple[Manifest, dict[str, str]]:
    """Reuse every cached component, build the rest in workers, then assemble the export in a hidden
    sibling directory and rename it into place only when all of it succeeded. Returns the manifest and
    where each component came from (one of supply.ORIGINS). An up-to-date plan is run_plan's (read back)."""
    remote = open_remote(plan)  # first: a required remote that cannot be reached fails before anything is written
    check_writable(plan.output, export_bytes(plan, sum(job.weights.bytes for job in plan.jobs)), "--output")
    with claim_output(plan.output):  # a second export to this output is refused here, before anything is built
        return _export(plan, remote, on_event)


def _export(plan: Plan, remote: RemoteCache | None, on_event: EventHandler) -> tuple[Manifest, dict[str, str]]:
    """run_export's work, done holding the output's lock."""
    cache = ComponentCache(plan.cache_dir)
    cache.remove_orphans()
    number = {job.component: index for index, job in enumerate(plan.jobs, start=1)}
    url = remote.url if remote is not None else None

    def notify(job: Job, stage: Stage, record: ComponentRecord | None) -> None:
        on_event(BuildEvent(job.component, number[job.component], len(plan.jobs), stage, record, url))

    workdir = plan.output.absolute().parent / f".{plan.output.name}.neuron-work"  # kept when a compile fails
    entries, origins = supply(
        list(plan.jobs), cache, remote, notify, lambda jobs: build_missing(plan, jobs, cache, workdir, on_event)
    )
    checked = settle_validation(plan, entries, origins, cache, workdir, on_event)
    shutil.rmtree(workdir, ignore_errors=True)

    needed = export_bytes(plan, sum(f.size for entry in entries.values() for f in entry.record.files))
    with writing("the export", plan.output, needed, "--output"), staging_directory(plan.output) as staging:
        records: dict[str, ComponentRecord] = {}
        for job in plan.jobs:
            entry = entries[job.component]
            link_or_copy(entry.artifact, staging / job.component / ARTIFACT_NAME)
            for file in entry.record.files:  # a sharded role's weights/ files, kept flat in the cache entry
                if file.path != f"{job.component}/{ARTIFACT_NAME}":
                    (staging / file.path).parent.mkdir(parents=True, exist_ok=True)
                    link_or_copy(entry.directory / Path(file.path).name, staging / file.path)
            records[job.component] = checked[job.component]
        write_layout(plan, staging, records)
        component_files = {f.path for record in records.values() for f in record.files}
        manifest = make_manifest(plan, staging, records, component_files)
        manifest.write(staging)
        publish(staging, plan.output, plan.config.options.force)
    return manifest, origins


def open_remote(plan: Plan) -> RemoteCache | None:
    """The plan's remote cache, checked once: unreachable, it warns once and is left out (an error when required)."""
    if not plan.config.options.remote_cache:
        return None
    remote = RemoteCache(
        plan.config.options.remote_cache,
        required=plan.config.options.remote_cache_required,
        trust=trust_of(plan.config.options),
    )
    remote.check()
    return remote


def export_bytes(plan: Plan, artifacts: int) -> int:
    """The finished export's size when nothing can be hard-linked: artifacts, processors and configs."""
    copied = sum(
        p.stat().st_size
        for name in PROCESSOR_FOLDERS
        if (plan.source.path / name).is_dir()
        for p in (plan.source.path / name).rglob("*")
        if p.is_file()
    )
    return artifacts + copied + 2**20  # configs, model_index.json and the manifest
