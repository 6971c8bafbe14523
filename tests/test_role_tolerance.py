"""A role states its own validation tolerance (roles/registry.py): the plan asks the role, --atol overrides it,
and neither changes a cache key (validation results are stored beside the artifact, not in it)."""

from __future__ import annotations

import dataclasses

import pytest

import neuron_export
from neuron_export.roles.registry import TOLERANCES, register, role_of, roles, unregister

CPU = TOLERANCES[("cpu", "matmul")]  # --auto-cast matmul is the default
LOOSE = 3e-3  # a tolerance no registered role has


@pytest.fixture
def loose_vae_decoder():
    """The VAE decoder registered again, stating its own tolerance on the CPU (whatever the auto-cast)."""
    original = role_of("vae_decoder")
    later = roles()[roles().index(original) + 1 :]

    def put_in(decoder):  # the registry keeps its order: the roles after the decoder follow it again
        for role in (original, *later):
            unregister(role.registry_name)
        for role in (decoder, *later):
            register(role)

    loose = {(backend, cast): LOOSE if backend == "cpu" else atol for (backend, cast), atol in TOLERANCES.items()}
    put_in(dataclasses.replace(original, tolerances=loose))
    try:
        yield
    finally:
        put_in(original)


def atols(plan) -> dict[str, float]:
    return {job.component: job.atol for job in plan.jobs}


def keys(plan) -> dict[str, str]:
    return {job.component: job.cache_key for job in plan.jobs}


def test_the_plan_asks_each_role_and_atol_overrides_them_all(tiny_model, tmp_path):
    options = {"model": str(tiny_model("sd")), "backend": "cpu", "output": str(tmp_path / "out")}
    usual = neuron_export.plan("sd", **options)
    given = neuron_export.plan("sd", atol=0.5, **options)
    assert atols(usual) == dict.fromkeys(atols(usual), CPU) and len(usual.jobs) == 4
    assert atols(given) == dict.fromkeys(atols(usual), 0.5)
    assert keys(given) == keys(usual)


def test_a_role_with_its_own_tolerance_keeps_its_cache_key(loose_vae_decoder, tiny_model, tmp_path):
    options = {"model": str(tiny_model("sd")), "backend": "cpu", "output": str(tmp_path / "out")}
    plan = neuron_export.plan("sd", **options)
    assert atols(plan) == {**dict.fromkeys(atols(plan), CPU), "vae_decoder": LOOSE}
    assert keys(plan) == keys(neuron_export.plan("sd", atol=0.5, **options))
