"""Worker processes die with the exporter. Light on purpose: the fork server sets this before importing torch."""

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """The kernel kills this process when its parent dies, even by SIGKILL and even while it is stopped or busy.
    Set in the fork server (the exporter's child, see _preload) and in each worker (the fork server's child)
    right after its fork, before it unpickles anything."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
