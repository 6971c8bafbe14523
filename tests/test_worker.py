"""A worker process receives the Job and the few settings it builds with, never the config (no Hub token)."""

from __future__ import annotations

import pickle

TOKEN = "hf_not_a_real_token_0123456789"


def test_what_a_worker_receives_holds_no_token(tiny_model):
    from neuron_export.build.parent import work_order
    from neuron_export.planning.exports import plan_exports

    plan = plan_exports("sd", model=str(tiny_model("sd")), backend="cpu", token=TOKEN)[0]
    assert plan.config.options.token == TOKEN  # the plan has it; the workers must not
    for job in plan.jobs:
        sent = pickle.dumps(work_order(job, plan))  # what multiprocessing sends to the worker
        assert TOKEN.encode() not in sent
        assert job.cache_key.encode() in sent
