"""Planning goes one way: every source resolved once, then facts read, then jobs and keys derived. Traced here on
a tiny SD pipeline with every input a plan can take (--vae, a ControlNet, an IP-Adapter, a LoRA): the planning
modules make_plan calls, in order, with no module entered twice."""

from __future__ import annotations

import sys
from itertools import groupby

import pytest

import neuron_export
from neuron_export.planning import jobs
from neuron_export.testing.adapters import IP_ADAPTER_SUBFOLDER, IP_ADAPTER_WEIGHT_NAME
from neuron_export.testing.lora import build_lora

PLANNING = "neuron_export.planning."


def is_step(frame) -> bool:
    """A module's own function (a step), not a method or property of a value the steps pass along."""
    function = frame.f_globals.get(frame.f_code.co_name)
    return getattr(function, "__code__", None) is frame.f_code


def planning_modules_called(run) -> list[str]:
    """The planning modules (other than jobs itself) whose functions make_plan calls directly while `run` runs,
    in call order, a run of calls into one module counted once."""
    entered: list[str] = []

    def profile(frame, event, arg):
        caller = frame.f_back
        if event == "call" and caller is not None and caller.f_code is jobs.make_plan.__code__ and is_step(frame):
            module = frame.f_globals.get("__name__", "")
            if module.startswith(PLANNING) and module != jobs.__name__:
                entered.append(module.removeprefix(PLANNING))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return [module for module, _ in groupby(entered)]


def add_on(tiny_model, name: str) -> dict:
    """A ControlNet or an IP-Adapter (an export takes one or the other)."""
    if name == "controlnet_0":
        return {"controlnet": [str(tiny_model("sd-controlnet"))]}
    return {
        "ip_adapter": str(tiny_model("sd-ip-adapter")),
        "ip_adapter_subfolder": IP_ADAPTER_SUBFOLDER,
        "ip_adapter_weight_name": IP_ADAPTER_WEIGHT_NAME,
    }


@pytest.mark.parametrize("added", ["controlnet_0", "image_encoder"])
def test_make_plan_enters_each_planning_module_once(tiny_model, tmp_path, added):
    model = tiny_model("sd")
    build_lora(model, tmp_path / "lora")
    options = {
        "model": str(model),
        "vae": str(model / "vae"),
        "lora": [str(tmp_path / "lora")],
        "backend": "cpu",
        "output": str(tmp_path / "out"),
        **add_on(tiny_model, added),
    }
    plans = []
    called = planning_modules_called(lambda: plans.append(neuron_export.plan("sd", **options)))

    (plan,) = plans  # the plan holds every input
    assert {added, "unet", "vae_decoder"} <= {job.component for job in plan.jobs}
    assert plan.loras and plan.source.vae_path is not None
    assert len(called) == len(set(called)), f"a planning module is entered twice: {' -> '.join(called)}"
