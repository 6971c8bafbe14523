"""What `plan --json` shows beside the jobs, returned by the Python API too: each Plan's estimated build
schedule (`estimated_wall_seconds`) and the CI builds of a set of plans (`neuron_export.builds`)."""

from __future__ import annotations

import json

import pytest

import neuron_export


def test_the_schedule_runs_jobs_in_parallel_only_where_the_compiler_gains(tiny_model, tmp_path):
    def plan(backend: str, jobs: int):
        return neuron_export.plan(
            "sd", model=str(tiny_model("sd")), backend=backend, jobs=jobs, max_memory="64GiB", output=tmp_path / "o"
        )

    one, two = plan("neuron", 1), plan("neuron", 2)  # planning needs no Neuron SDK
    serial = sum(job.estimated_seconds for job in one.jobs)
    assert one.estimated_wall_seconds == pytest.approx(serial)
    assert max(job.estimated_seconds for job in two.jobs) <= two.estimated_wall_seconds < serial
    cpu = plan("cpu", 2)  # torch's trace already uses every core: cpu jobs run one at a time
    assert cpu.estimated_wall_seconds == pytest.approx(sum(job.estimated_seconds for job in cpu.jobs))


@pytest.mark.slow  # builds one export
def test_the_api_returns_the_ci_builds_plan_json_shows_each_key_once(cli, tiny_model, tmp_path, monkeypatch):
    model = str(tiny_model("sd"))
    monkeypatch.chdir(tmp_path)  # the default outputs are named in the working directory
    options = {"model": model, "backend": "cpu", "components": ["text_encoder", "vae_decoder"]}
    plans = neuron_export.plan("sd", height=[64, 128], **options)  # two shapes share the text encoder
    builds = neuron_export.builds(plans)
    assert sorted(b["component"] for b in builds) == ["text_encoder", "vae_decoder", "vae_decoder"]
    assert [b["cached"] for b in builds] == [False] * 3 and len(builds[0]["outputs"]) == 2

    matrix = ["--backend", "cpu", "--height", "64,128", "--components", "text_encoder,vae_decoder"]
    shown = cli("plan", "sd", "-m", model, *matrix, "--json")
    assert shown.exit_code == 0, shown
    assert json.loads(shown.stdout)["builds"] == builds
    assert [p["estimated_wall_seconds"] for p in json.loads(shown.stdout)["plans"]] == [
        round(p.estimated_wall_seconds, 1) for p in plans
    ]

    neuron_export.export(plans[0])
    after = neuron_export.builds(plans)
    assert [(b["cached"], b["cached_where"]) for b in after] == [(True, "local"), (True, "local"), (False, None)]
