"""--executor ray: every component the exports miss (in no cache, local or remote) is a Ray task, each cache key
once however many exports share it. A task requests its estimated peak as Ray `memory` (and the CPUs the build
keeps busy), so Ray places it on a node with room; it builds in a worker process exactly as a local export
does (build.build_one), stores the result in the node's cache and uploads it to the remote cache. The exports
are then assembled here from the remote cache. A task whose node dies is run again on another (max_retries).

Imported only when --executor ray is used: Ray is an optional extra (`neuron-export[ray]`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from neuron_export.build.backends.select import get_backend
from neuron_export.build.parent import build_one, work_order
from neuron_export.build.worker import WorkOrder
from neuron_export.errors import BuildError, ExportError, MemoryBudgetError
from neuron_export.events import BuildEvent, EventHandler, Stage
from neuron_export.files import default_cache_dir
from neuron_export.manifest import ComponentRecord
from neuron_export.planning.fleet import FleetJob, unique_jobs
from neuron_export.planning.jobs import Plan, traced_library_versions
from neuron_export.planning.source import ComponentOrigin
from neuron_export.planning.sources import hub_download
from neuron_export.store.cache import ComponentCache
from neuron_export.store.remote import RemoteCache, display_url
from neuron_export.store.remote_trust import Trust, trust_of
from neuron_export.store.supply import BUILT, supply
from neuron_export.version import __version__

RETRIES = 2  # a task whose node or worker dies runs again (on another node when that one is gone)
POLL_SECONDS = 0.5
HEAD_RESOURCE = "node:__internal_head__"  # every Ray head node has it: the progress board lives there


def build_on_cluster(plans: list[Plan], on_event: EventHandler) -> dict[str, str]:
    """Build what the plans miss on the Ray cluster; returns cache key -> the node that supplied it."""
    address, url = _one_cluster(plans)
    trust = trust_of(plans[0].config.options)
    remote = RemoteCache(url, required=True, trust=trust)
    remote.check()
    todo = [
        fleet_job
        for fleet_job in unique_jobs(plans)  # an untrusted remote entry is no help: built again
        if not ComponentCache(fleet_job.plan.cache_dir).peek(fleet_job.key) and not remote.has_trusted(fleet_job.key)
    ]
    if not todo:
        return {}
    import ray

    connected_here = not ray.is_initialized()
    if connected_here:
        _connect(ray, address)
    try:
        _check_fits(ray, todo, address)
        return _run(ray, todo, url, trust, on_event)
    finally:
        if connected_here:
            ray.shutdown()


def _one_cluster(plans: list[Plan]) -> tuple[str, str]:
    pairs = {(plan.config.options.ray_address, plan.config.options.remote_cache) for plan in plans}
    if len(pairs) > 1:
        raise ExportError(
            "The exports name different Ray clusters or remote caches (ray_address, remote_cache); "
            "build them in separate runs, or give them the same ones."
        )
    address, url = pairs.pop()
    assert address and url  # config.check_ray_executor refused anything else
    return address, url


def _connect(ray: Any, address: str) -> None:
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ExportError(
            f"--ray-address {address}: no Ray cluster answered there ({str(error).splitlines()[0][:200]}); "
            "start one (ray start --head) or pass the address of a running one."
        ) from None


def _check_fits(ray: Any, todo: list[FleetJob], address: str) -> None:
    """A task no node can hold would wait forever: refused now, in one sentence."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    most_memory = max((node.get("memory", 0) for node in nodes), default=0)
    most_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    for fleet_job in todo:
        peak = fleet_job.job.estimated_peak_bytes
        if peak > most_memory:
            raise MemoryBudgetError(
                f"Building {fleet_job.label} needs about {peak / 2**30:.1f} GiB (estimated), more than any node of the "
                f"Ray cluster at {address} offers ({most_memory / 2**30:.1f} GiB at most); add a node with more memory."
            )
        if fleet_job.cpus > most_cpus:
            raise ExportError(
                f"Building {fleet_job.label} needs {fleet_job.cpus} CPUs, more than any node of the Ray cluster at "
                f"{address} has ({most_cpus:g} at most); add a larger node."
            )


class Board:
    """Stages the running tasks report, kept until the driver takes them (a Ray actor on the head node)."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, str]] = []

    def update(self, key: str, stage: str, node: str) -> None:  # the Stage's value: plain data crosses nodes
        self._events.append((key, stage, node))

    def take(self) -> list[tuple[str, str, str]]:
        events, self._events = self._events, []
        return events


def build_versions(backend: str) -> dict[str, str | None]:
    """What the cache keys were computed with; a node with other versions would build other bytes."""
    return {
        "neuron-export": __version__,
        "compiler": get_backend(backend).compiler_version(),
        **traced_library_versions(backend),
    }


def _run(ray: Any, todo: list[FleetJob], url: str, trust: Trust, on_event: EventHandler) -> dict[str, str]:
    board = ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001})(Board).remote()
    # Ray's worker processes are reused (torch stays imported in their fork server); each build still runs in a
    # process of its own that exits, so its memory goes back to the OS and its TorchScript names start afresh.
    task = ray.remote(node_build)
    total, shown = len(todo), display_url(url)
    submitted: dict[Any, tuple[int, FleetJob]] = {}
    by_key = {fleet_job.key: (index, fleet_job) for index, fleet_job in enumerate(todo, start=1)}
    for index, fleet_job in by_key.values():
        options = {
            "memory": max(1, fleet_job.job.estimated_peak_bytes),
            "num_cpus": fleet_job.cpus,
            "max_retries": RETRIES,
            "retry_exceptions": False,
            "name": f"neuron-export {fleet_job.label}",
        }
        versions = build_versions(fleet_job.plan.backend)
        # a node without the job's files on its disks downloads them from the hub snapshots they came from
        origin = fleet_job.plan.source.origin(fleet_job.job.component)
        ref = task.options(**options).remote(
            work_order(fleet_job.job, fleet_job.plan), origin, versions, url, trust, board
        )
        submitted[ref] = (index, fleet_job)
        on_event(BuildEvent(fleet_job.label, index, total, Stage.QUEUED))
    supplied: dict[str, str] = {}
    attempts: dict[str, int] = {}
    pending = list(submitted)

    def show_progress() -> None:
        for key, value, node in ray.get(board.take.remote()):
            if key in supplied:  # a report that arrived after the task's result: its story is told
                continue
            index, fleet_job = by_key[key]
            stage = Stage(value)
            if stage == Stage.STARTED:
                attempts[key] = attempts.get(key, 0) + 1
            attempt = attempts.get(key, 1)
            lost = "its node or worker was lost" if stage == Stage.STARTED and attempt > 1 else None
            if stage != Stage.DONE:  # the result's own event says done, with the record
                on_event(BuildEvent(fleet_job.label, index, total, stage, None, shown, node, attempt, lost))

    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
            show_progress()
            for ref in done:
                index, fleet_job = submitted[ref]
                result = _result(ray, ref, fleet_job)
                record = ComponentRecord.model_validate_json(result["record"])
                supplied[fleet_job.key] = result["node"]
                stage = Stage.DONE if result["origin"] == BUILT else Stage.CACHED  # built now, or found on the node
                attempt = attempts.get(fleet_job.key, 1)
                on_event(BuildEvent(fleet_job.label, index, total, stage, record, shown, result["node"], attempt))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        ray.kill(board)
    return supplied


def _result(ray: Any, ref: Any, fleet_job: FleetJob) -> dict[str, Any]:
    """A task's result, or its error as the exception a local build would raise (so the same exit code)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, ExportError):
            raise cause from None
        first = (str(cause).splitlines() or [""])[0][:300]
        raise BuildError(
            f"Building {fleet_job.label} on the Ray cluster crashed: {type(cause).__name__}: {first}; nothing was kept."
        ) from None
    except ray.exceptions.RayError as error:  # its node or worker died more often than retried, or it was cancelled
        raise BuildError(
            f"Building {fleet_job.label} on the Ray cluster failed after {RETRIES + 1} attempts "
            f"({type(error).__name__}); nothing was kept."
        ) from None


# -- the node's side --------------------------------------------------------------------------------------------


def node_build(
    order: WorkOrder, origin: ComponentOrigin, versions: dict[str, str | None], url: str, trust: Trust, board: Any
) -> dict[str, str]:
    """A Ray task: the component in this node's cache (downloaded, or built in a worker process under the node's
    per-key lock), then in the remote cache. Returns the node, where it came from, and its record."""
    import ray

    context = ray.get_runtime_context()
    node = f"{ray.util.get_node_ip_address()} {context.get_node_id()[:8]}"
    key = order.job.cache_key

    def report(stage: Stage) -> None:
        board.update.remote(key, stage.value, node)

    report(Stage.STARTED)
    mine = build_versions(order.backend)
    for name, wanted in versions.items():
        if mine.get(name) != wanted:
            raise ExportError(
                f"Cluster node {node} has {name} {mine.get(name)} where this export was planned with "
                f"{wanted}; install the same versions on every node (the cache keys assume them)."
            )
    order = on_this_node(order, origin, node)
    cache = ComponentCache(default_cache_dir())  # the node's own ($NEURON_EXPORT_CACHE there)
    try:  # the signing key is read from the same path on every node (or an unsigned bucket is allowed)
        trust.private_key()
    except ValueError as problem:
        raise ExportError(
            f"Cluster node {node} cannot use the signing key {trust.signing_key}: it {problem}; put it "
            "at the same path on every node."
        ) from None
    remote = RemoteCache(url, required=True, trust=trust)
    workdir = cache.work_dir(key)  # named so remove_orphans keeps it while we live
    try:
        entries, origins = supply(
            [order.job],
            cache,
            remote,
            lambda job, stage, record: report(stage),
            lambda jobs: {order.job.component: build_one(order, cache, workdir, report)},
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    entry = entries[order.job.component]
    remote.upload(key, entry)  # found in the node's cache: the remote may still lack it (a no-op otherwise)
    return {"node": node, "origin": origins[order.job.component], "record": entry.record.model_dump_json()}


def on_this_node(order: WorkOrder, origin: ComponentOrigin, node: str) -> WorkOrder:
    """The order with paths this node can read: as planned when it sees them (shared disk, same host), else
    the same files downloaded from the hub snapshots they came from (the node's own Hub credentials): the
    component's folder, and each file of another source it reads (the IP-Adapter, the LoRAs fused in)."""
    job = order.job
    added = {file.path: file.hub for file in origin.added}
    own = [job.source_folder / "config.json", *(path for path in job.weight_files if path not in added)]
    others = [*(path for path in job.weight_files if path in added), *(fusion.path for fusion in job.loras)]
    moved: dict[Path, Path] = {}
    for hub, paths in ((origin.hub, own), *((added.get(path), [path]) for path in others)):
        if all(path.is_file() for path in paths):
            continue
        if hub is None:
            what = f"{job.source_folder} ({job.component}'s weights)" if paths is own else str(paths[0])
            raise ExportError(
                f"Cluster node {node} cannot read {what}; put it where every node mounts it at the same path, "
                "or export it from the Hub."
            )
        here, _ = hub_download(
            hub.repo, hub.commit, [p.relative_to(hub.root).as_posix() for p in paths], None, None, False
        )
        moved.update({path: here / path.relative_to(hub.root) for path in paths})
        if paths is own:
            moved[job.source_folder] = here / job.source_folder.relative_to(hub.root)
            moved[order.source_root] = here / order.source_root.relative_to(hub.root)
    if not moved:
        return order
    spec = job.spec
    if spec.add_ons.get("ip_adapter_file"):
        adapter = Path(spec.add_ons["ip_adapter_file"])
        spec = dataclasses.replace(spec, add_ons={**spec.add_ons, "ip_adapter_file": str(moved.get(adapter, adapter))})
    job = dataclasses.replace(
        job,
        spec=spec,
        source_folder=moved.get(job.source_folder, job.source_folder),
        weight_files=tuple(moved.get(path, path) for path in job.weight_files),
        loras=tuple(dataclasses.replace(f, path=moved.get(f.path, f.path)) for f in job.loras),
    )
    return dataclasses.replace(order, job=job, source_root=moved.get(order.source_root, order.source_root))
