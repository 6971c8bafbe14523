"""Each component builds in a worker process of its own, so its memory returns to the OS when it ends.

Workers are forked from a fork server that has torch and diffusers imported (a spawn per component would
re-import them each time), inherit malloc settings that limit fragmentation, die with their parent, and
report stages, the finished ComponentRecord, or the error (with its traceback) back over a pipe of their own.

Memory stays near one component's weights: the eager model's reference outputs on fresh inputs are
computed before tracing, the model is freed after saving, and only then is the artifact loaded back.
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import multiprocessing
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuron_export.build.backends import archive
from neuron_export.build.backends.neuron import device_present
from neuron_export.build.backends.request import CompileRequest
from neuron_export.build.backends.select import get_backend
from neuron_export.build.lifetime import die_with_parent
from neuron_export.build.validation import DISABLED, verdict
from neuron_export.errors import BuildError, ExportError
from neuron_export.events import Stage
from neuron_export.files import ARTIFACT_NAME
from neuron_export.manifest import ComponentRecord, FileRecord, TensorRecord, ValidationRecord, file_record
from neuron_export.planning.jobs import Job
from neuron_export.roles import lora
from neuron_export.roles.spec import flatten, make_inputs
from neuron_export.store.storage import check_room, writing

# glibc reads these when a process starts: big tensors get their own mappings and the heap is trimmed.
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
_context: Any = None


PRELOAD = "neuron_export.build._preload"


class WorkerProcess(multiprocessing.context.ForkServerProcess):
    """A fork-server process that does not run the exporter's __main__ again: multiprocessing would re-run the
    script (a heredoc's '<stdin>' cannot be; a script without a __main__ guard would export again, inside the
    worker), and workers need nothing from it: their target and arguments are neuron_export's own."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        from multiprocessing import popen_forkserver, spawn

        gather = spawn.get_preparation_data

        def without_main(name: str) -> dict[str, Any]:
            data = gather(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        spawn.get_preparation_data = without_main  # only while this process is launched (it reads it once)
        try:
            return popen_forkserver.Popen(process_obj)
        finally:
            spawn.get_preparation_data = gather


class WorkerContext(multiprocessing.context.ForkServerContext):
    Process = WorkerProcess


def context() -> Any:
    global _context
    if _context is None:
        os.environ.update({k: v for k, v in MALLOC_ENVIRONMENT.items() if k not in os.environ})
        _context = WorkerContext()
        _context.set_forkserver_preload([PRELOAD])
    return _context


def preload_failure(component: str) -> tuple[BuildError, str] | None:
    """What the fork server failed to import, as the error a worker reports (None when it imported everything).
    Read from the loaded module: importing _preload from here would be an import cycle."""
    failure = getattr(sys.modules.get(PRELOAD), "failure", None)
    if failure is None:
        return None
    library, problem, worker_traceback = failure
    return BuildError(
        f"The worker building {component} could not start: importing {library} failed ({problem}); "
        "fix that installation (NEURON_EXPORT_DEBUG=1 shows the traceback); nothing was written."
    ), worker_traceback


TRACE_SEED, VALIDATION_SEED = 0, 1


@dataclass(frozen=True)
class WorkOrder:
    """What a worker needs to build one component, and nothing more (no config, no Hub token)."""

    job: Job
    backend: str  # "neuron" or "cpu", already resolved
    inline_weights: bool
    disable_validation: bool
    source_root: Path  # the folder the job's weight files are named relative to in the manifest
    artifact: Path | None = None  # set: compare this cached artifact with the eager model instead of building


def worker_main(order: WorkOrder, build_dir: Path, workdir: Path, pipe: Any) -> None:
    """Build one component into `build_dir`; send stages, then exactly one 'done' or 'error' message."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt means
    name = order.job.component

    def send(message: tuple) -> None:
        try:
            pipe.send(message)
        except OSError:  # the exporter is gone (interrupted or killed): nobody is left to build for
            os._exit(1)

    try:
        failure = preload_failure(name)
        if failure is not None:
            send(("error", failure))
            return
        if order.artifact is not None:
            send(("done", check_artifact(order, lambda stage: send(("stage", stage))).model_dump_json()))
            return
        record = build_component(order, build_dir, workdir, lambda stage: send(("stage", stage)))
        send(("done", record.model_dump_json()))
    except ExportError as exc:  # sent whole (it pickles): the parent raises the same class, so the same exit code
        send(("error", (exc, traceback.format_exc())))
    except BaseException as exc:  # a crash inside torch or the compiler: report it, the parent fails cleanly
        # the rest is in the traceback NEURON_EXPORT_DEBUG=1 shows
        first_line = (str(exc).splitlines() or [""])[0][:300]
        crash = BuildError(
            f"Building {name} crashed: {type(exc).__name__}: {first_line}".strip() + "; nothing was written."
        )
        send(("error", (crash, traceback.format_exc())))
    finally:
        pipe.close()


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
    # /proc by hand: psutil reports current RSS, not VmHWM, the peak that clear_refs resets.
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
            raise BuildError(
                f"the artifact returned shape {tuple(got.shape)} where the eager model returns {tuple(want.shape)}"
            )
        worst = max(worst, float((want.float() - got.float()).abs().max()))
    return worst


def children_peak_rss_bytes() -> int:
    """The largest finished child process (neuronx-cc runs as one) of this worker."""
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def build_component(
    order: WorkOrder, directory: Path, workdir: Path, on_stage: Callable[[Stage], None]
) -> ComponentRecord:
    """Load, trace, save (as directory/model.neuron) and check one component. Runs in a worker process."""
    import torch

    limit_fragmentation()
    quiet_libraries()
    job = order.job
    spec = job.spec
    module = importlib.import_module(job.module_path)
    backend = get_backend(order.backend)
    skip_reason = DISABLED if order.disable_validation else backend.validation_skip_reason()
    started = time.perf_counter()
    reset_peak_rss()

    on_stage(Stage.LOADING)
    with torch.no_grad():
        model = module.load(job.source_folder, spec)
        if job.loras:
            on_stage(Stage.FUSING_LORA)
            lora.fuse(model, spec.name, job.loras)
            release_memory()
        cast_to_traced_dtype(model, spec)
        parameter_count = sum(p.numel() for p in model.parameters())
        trace_inputs = make_inputs(spec.inputs, TRACE_SEED)
        validation_inputs = make_inputs(spec.inputs, VALIDATION_SEED) if skip_reason is None else None
        expected = [t.clone() for t in module.reference(model, spec, validation_inputs)] if validation_inputs else None

        on_stage(Stage.TRACING)
        wrapper = module.wrap(model, spec)
        compiler_args = list(job.compiler_args) if order.backend == "neuron" else []
        request = CompileRequest(
            component=spec.name,
            compiler_args=tuple(compiler_args),
            inline_weights=order.inline_weights,
            cpu_backend=order.backend == "neuron" and not device_present(),
            after_trace=job.after_trace,
            workdir=workdir / spec.name,
            tensor_parallel_size=int(spec.traced.get("tensor_parallel_size", 1)),
            local_world_size=spec.traced.get("local_world_size"),
        )
        # ModelBuilder roles (weights beside the module): traced and sharded by neuronx-distributed on the Neuron
        # backend, by its CPU stand-in (runtime/nxd.py) on the CPU backend
        builder = None
        sharded = job.sharded
        try:
            if sharded:
                traced, builder = backend.compile_sharded(wrapper, trace_inputs, request)
            else:
                traced = backend.compile(wrapper, trace_inputs, request)
        except BuildError:
            raise  # already one sentence (neuronx-distributed missing)
        except Exception as exc:
            kept = f"; compiler work dir and log kept in {workdir / spec.name}" if order.backend == "neuron" else ""
            reason = str(exc).splitlines()[0][:300] if str(exc) else ""
            raise BuildError(f"Compiling {spec.name} failed: {type(exc).__name__}: {reason}{kept}.") from exc
        artifact = directory / ARTIFACT_NAME
        # torch aborts the whole process when the disk fills mid-save, so make sure the artifact fits first
        # (twice: torch's archive, then its host-independent rewrite, see build/backends/archive.py).
        needed = 2 * artifact_bytes_estimate(traced, job)
        check_room(f"{spec.name}'s artifact", directory, needed, "--cache-dir")
        with writing(f"{spec.name}'s artifact", directory, needed, "--cache-dir"):
            archive.save(traced, artifact)
            # ModelBuilder roles keep their weights beside the module (written from the model as traced, LoRA fused)
            weight_files = backend.write_shards(builder, request, directory) if sharded else []
        del traced, wrapper, model, trace_inputs, builder
        release_memory()

        if skip_reason is None:
            assert validation_inputs is not None and expected is not None  # made above when validating
            on_stage(Stage.VALIDATING)
            loaded = backend.load(artifact)
            actual = flatten(loaded(*validation_inputs))
            del loaded
            validation = verdict(max_abs_diff(expected, actual), job.atol)
        else:
            validation = ValidationRecord(status="skipped", reason=skip_reason, atol=job.atol)
    release_memory()
    if order.backend == "neuron":
        shutil.rmtree(workdir / spec.name, ignore_errors=True)

    artifact_record = file_record(artifact, directory)
    return ComponentRecord(
        name=spec.name,
        model_type=spec.model_type,
        backend=order.backend,
        compiler_type=backend.COMPILER_TYPE,
        compiler_version=backend.compiler_version(),
        compiler_args=compiler_args,
        neuron_compiler_args=list(job.compiler_args),
        inline_weights=order.inline_weights,
        cpu_backend=request.cpu_backend if order.backend == "neuron" else None,
        after_trace=list(job.after_trace),
        inputs=[TensorRecord(name=t.name, shape=list(t.shape), dtype=t.dtype) for t in spec.inputs],
        outputs=list(spec.outputs),
        files=[
            FileRecord(path=f"{spec.name}/{ARTIFACT_NAME}", sha256=artifact_record.sha256, size=artifact_record.size),
            *(_flat_record(directory, spec.name, relative) for relative in weight_files),
        ],
        source_files=source_file_records(order),
        parameter_count=parameter_count,
        cache_key=job.cache_key,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(time.perf_counter() - started, 3),
        peak_rss_bytes=max(peak_rss_bytes(), children_peak_rss_bytes()),
        estimated_peak_bytes=job.estimated_peak_bytes,
        validation=validation,
        origin="built",
        model=job.model or None,
    )


def cast_to_traced_dtype(model: Any, spec: Any) -> None:
    """A --torch-dtype export's model in that dtype (after any LoRA is fused in float32)."""
    import torch

    dtype = spec.traced.get("torch_dtype")
    if dtype:
        model.to(getattr(torch, dtype))


def _flat_record(directory: Path, component: str, relative: str) -> FileRecord:
    """A file the build wrote flat into `directory` (as cache entries keep them), recorded at its place in the
    component folder (`text_encoder/weights/tp0_sharded_checkpoint.safetensors`)."""
    record = file_record(directory / Path(relative).name, directory)
    return FileRecord(path=f"{component}/{relative}", sha256=record.sha256, size=record.size)


def check_artifact(order: WorkOrder, on_stage: Callable[[Stage], None]) -> ValidationRecord:
    """Compare a cached artifact with the eager model on the build's fresh inputs: the eager outputs first,
    the model freed, then the artifact loaded (memory stays near one copy of the component)."""
    import torch

    limit_fragmentation()
    quiet_libraries()
    job, spec = order.job, order.job.spec
    module = importlib.import_module(job.module_path)
    on_stage(Stage.LOADING)
    with torch.no_grad():
        model = module.load(job.source_folder, spec)
        if job.loras:
            lora.fuse(model, spec.name, job.loras)
        cast_to_traced_dtype(model, spec)
        inputs = make_inputs(spec.inputs, VALIDATION_SEED)
        expected = [t.clone() for t in module.reference(model, spec, inputs)]
        del model
        release_memory()
        on_stage(Stage.VALIDATING)
        loaded = get_backend(order.backend).load(order.artifact)
        actual = flatten(loaded(*inputs))
        del loaded
    return verdict(max_abs_diff(expected, actual), job.atol)


def artifact_bytes_estimate(traced: Any, job: Job) -> int:
    """The saved module's size: its tensors (each storage once), or the weight files' size when the weights
    are inside a compiled graph, plus room for the archive's code and headers."""
    storages = {}
    for tensor in traced.state_dict().values():
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return (sum(storages.values()) or job.weights.bytes) + 2**20


def source_file_records(order: WorkOrder) -> list[FileRecord]:
    """The weight files a component was built from, with the hashes the plan already knows."""
    records = []
    for path, digest in zip(order.job.weight_files, order.job.weight_hashes):
        try:
            relative = path.relative_to(order.source_root).as_posix()
        except ValueError:
            relative = path.name
        records.append(FileRecord(path=relative, sha256=digest, size=path.stat().st_size))
    return records
