"""A real two-node Ray cluster on 127.0.0.1 for tests and benchmarks (ray.cluster_utils.Cluster: every node on
loopback; `ray start --address` would move to the host's outward address).

Ray turns 127.0.0.1 into the host's outward address when a driver connects, unless multi-host clustering is off
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read at import, so it is also patched in the imported module). Every Ray
process of the cluster is started under a temp dir of its own, so none can outlive it unnoticed: after
shutdown, any process still naming that dir is killed by its pid and reported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"
LOCAL_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass
class RayCluster:
    address: str
    cluster: Any
    head: Any  # ray's Node objects
    worker: Any
    caches: dict[str, Path]  # node name -> the component cache its tasks use

    def node_label(self, node: Any) -> str:
        """How progress lines name a node: its address and the start of its id."""
        return f"{LOOPBACK} {node.node_id[:8]}"


def processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@contextlib.contextmanager
def two_node_cluster(caches_root: Path, cpus: int = 1, env: dict[str, str] | None = None) -> Iterator[RayCluster]:
    """A head and a worker node, each `cpus` CPUs and its own component cache under caches_root (and `env` set)."""
    os.environ.update(LOCAL_ONLY)  # for the driver and every Ray process started from here
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False
    temp = tempfile.mkdtemp(prefix="nxray-", dir="/tmp")  # short: Ray's socket paths live below it
    caches = {name: caches_root / name for name in ("head", "worker")}
    common = {"node_ip_address": LOOPBACK, "num_cpus": cpus, "temp_dir": temp}
    cluster = Cluster(
        initialize_head=True,
        shutdown_at_exit=True,
        head_node_args={
            **common,
            "include_dashboard": False,
            "env_vars": {**(env or {}), "NEURON_EXPORT_CACHE": str(caches["head"])},
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    try:
        worker = cluster.add_node(**common, env_vars={**(env or {}), "NEURON_EXPORT_CACHE": str(caches["worker"])})
        yield RayCluster(cluster.address, cluster, cluster.head_node, worker, caches)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        leftovers = processes_naming(temp)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
        assert not leftovers, f"Ray processes outlived the cluster: {leftovers}"
