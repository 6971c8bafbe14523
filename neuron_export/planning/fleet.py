"""Several exports as one set of jobs: each cache key once, whichever exports share it. What a CI matrix fans
out (`plan --json`'s `jobs`) and what the Ray executor submits (build/ray_executor.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from neuron_export.manifest import normalized_config
from neuron_export.planning.estimate import estimate_cpus
from neuron_export.planning.jobs import Job, Plan
from neuron_export.store.cache import ComponentCache


@dataclass(frozen=True)
class FleetJob:
    """One cache key to build, and the exports that need it (the first one's plan builds it)."""

    job: Job
    plan: Plan
    outputs: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.job.cache_key

    @property
    def cpus(self) -> int:
        return estimate_cpus(self.plan.backend, self.job.component)

    @property
    def label(self) -> str:
        """How progress names it: the role, its shapes and the key's start (two exports may share a role)."""
        batch = self.job.spec.static_shapes["batch_size"]
        return f"{self.job.component} {self.plan.height}x{self.plan.width} b{batch} [{self.key[:8]}]"


def unique_jobs(plans: list[Plan]) -> list[FleetJob]:
    """Every component the plans need, each cache key once, in plan order (up-to-date exports need nothing)."""
    first: dict[str, tuple[Job, Plan]] = {}
    outputs: dict[str, list[str]] = {}
    for plan in plans:
        if plan.up_to_date:
            continue
        for job in plan.jobs:
            first.setdefault(job.cache_key, (job, plan))
            outputs.setdefault(job.cache_key, []).append(str(plan.output))
    return [FleetJob(job, plan, tuple(outputs[key])) for key, (job, plan) in first.items()]


def ci_jobs(plans: list[Plan], remote: Any = None) -> list[dict[str, Any]]:
    """`plan --json`'s jobs: one per cache key, with its estimate, whether some cache already has it, and the
    config that builds exactly it (`neuron-export build job.yaml --remote-cache URL` on any runner)."""
    found = []
    for fleet_job in unique_jobs(plans):
        job, plan = fleet_job.job, fleet_job.plan
        local = ComponentCache(plan.cache_dir).peek(job.cache_key)
        # only an entry a trusted key signed counts: an export would skip any other and build it
        in_remote = None if remote is None else (remote.has_trusted(job.cache_key) if not local else None)
        config = {**normalized_config(plan.config), "components": [job.component]}
        found.append(
            {
                "cache_key": job.cache_key,
                "component": job.component,
                "cached": local or bool(in_remote),
                "cached_where": "local" if local else "remote" if in_remote else None,
                "estimated_peak_bytes": job.estimated_peak_bytes,
                "estimated_seconds": round(job.estimated_seconds, 1),
                "estimated_cpus": fleet_job.cpus,
                "outputs": list(fleet_job.outputs),
                "config": {key: value for key, value in config.items() if value is not None},
            }
        )
    return found


def builds(plans: list[Plan]) -> list[dict[str, Any]]:
    """`plan --json`'s builds: ci_jobs asked of the local cache and of the remote cache the plans name, if any."""
    from neuron_export.store.remote import RemoteCache
    from neuron_export.store.remote_trust import trust_of

    url = plans[0].config.options.remote_cache if plans else None
    return ci_jobs(plans, RemoteCache(url, trust=trust_of(plans[0].config.options)) if url else None)
