"""Each component builds in a worker process of its own, so its memory returns to the OS when it ends.

Workers are forked from a fork server that has torch and diffusers imported (a spawn per component would
re-import them each time), inherit malloc settings that limit fragmentation, die with their parent, and
report stages, the finished ComponentRecord, or a one-sentence error back over a pipe of their own.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

# glibc reads these when a process starts: big tensors get their own mappings and the heap is trimmed.
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
_context: Any = None


def context() -> Any:
    global _context
    if _context is None:
        os.environ.update({k: v for k, v in MALLOC_ENVIRONMENT.items() if k not in os.environ})
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["neuron_export._preload"])
    return _context


def die_with_parent() -> None:
    """The kernel kills this process when its parent dies, even by SIGKILL and even while it is stopped or busy.
    Set in the fork server (the exporter's child, see _preload) and in each worker (the fork server's child)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def worker_main(plan: Any, job: Any, build_dir: Path, workdir: Path, pipe: Any) -> None:
    """Build one component into `build_dir`; send stages, then exactly one 'done' or 'error' message."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt means
    from neuron_export.build import build_component
    from neuron_export.errors import UserError

    name = job.component

    def send(message: tuple) -> None:
        try:
            pipe.send(message)
        except OSError:  # the exporter is gone (interrupted or killed): nobody is left to build for
            os._exit(1)

    try:
        record = build_component(job, plan, build_dir, workdir, lambda stage: send(("stage", stage)))
        send(("done", record.model_dump_json()))
    except UserError as exc:
        send(("error", (type(exc).__name__, str(exc))))
    except BaseException as exc:  # a crash inside torch or the compiler: report it, the parent fails cleanly
        detail = traceback.format_exc(limit=-3)
        send(("error", ("crash", f"building {name} crashed: {type(exc).__name__}: {exc}".strip(), detail)))
    finally:
        pipe.close()
