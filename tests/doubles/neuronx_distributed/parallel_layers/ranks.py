"""DOUBLE ONLY (no such module in neuronx-distributed): run a function on every rank of a tensor-parallel group,
one thread per rank (parallel_state.py's ThreadGroup), as the real collectives would across NeuronCores."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from neuronx_distributed.parallel_layers import parallel_state


def run(tp: int, fn: Callable[[int], Any], timeout: float = 120.0) -> list[Any]:
    """[fn(rank) for each rank], each called in its own thread with parallel_state at (tp, rank); an exception
    on any rank is raised here (the others are released from the barrier)."""
    group = parallel_state.ThreadGroup(tp)
    results: list[Any] = [None] * tp
    errors: list[BaseException] = []

    def rank_thread(rank: int) -> None:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, group=group)
        parallel_state.set_tensor_model_parallel_rank(rank)
        try:
            results[rank] = fn(rank)
        except BaseException as exc:
            errors.append(exc)
            group._barrier.abort()
        finally:
            parallel_state.destroy_model_parallel()

    threads = [threading.Thread(target=rank_thread, args=(rank,), daemon=True) for rank in range(tp)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if any(thread.is_alive() for thread in threads):
        group._barrier.abort()
        raise TimeoutError(f"TEST DOUBLE: a rank of {tp} did not finish in {timeout} s")
    real = [error for error in errors if not isinstance(error, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results
