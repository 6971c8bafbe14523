"""Progress as typed events: what `neuron_export.export(..., on_event=...)` receives (a Stage per step, the
record when a component is finished), and the line the CLI's renderer makes of one."""

from __future__ import annotations

import io
import json

import pytest

import neuron_export
from neuron_export.cli.render import Sink
from neuron_export.events import BuildEvent, Stage

pytestmark = pytest.mark.slow  # builds exports


def export_events(model, output, **options) -> list[BuildEvent]:
    events: list[BuildEvent] = []
    neuron_export.export(
        "sd",
        model=str(model),
        backend="cpu",
        output=output,
        components=["vae_decoder"],
        on_event=events.append,
        **options,
    )
    return events


def test_a_build_reports_its_stages_in_order_and_the_next_export_finds_it_cached(tiny_model, tmp_path):
    built = export_events(tiny_model("sd"), tmp_path / "a")
    stages = [event.stage for event in built]
    assert stages[0] == Stage.LOADING and stages[-1] == Stage.DONE
    assert stages.index(Stage.TRACING) < stages.index(Stage.VALIDATING)
    assert Stage.CACHED not in stages and Stage.FUSING_LORA not in stages  # no cache entry, no --lora
    assert {(e.component, e.index, e.total, e.attempt, e.node, e.detail) for e in built} == {
        ("vae_decoder", 1, 1, 1, None, None)
    }
    assert built[-1].record is not None and built[-1].record.validation.status == "passed"
    assert json.dumps(stages[:1]) == '["loading"]'  # the enum's values are the plain words

    again = export_events(tiny_model("sd"), tmp_path / "b")
    assert [event.stage for event in again] == [Stage.CACHED, Stage.VALIDATED]
    assert again[0].record is not None and again[0].record.built_at == built[-1].record.built_at


def test_a_retried_ray_task_is_one_started_event_with_its_attempt_and_the_renderer_words_it():
    lost = BuildEvent("unet", 2, 4, Stage.STARTED, node="10.0.0.2 ab12", attempt=2, detail="its node was lost")
    stream = io.StringIO()
    Sink(stream=stream).event(lost)
    Sink(stream=stream).event(BuildEvent("unet", 2, 4, Stage.STARTED, node="10.0.0.2 ab12"))
    assert stream.getvalue().splitlines() == [
        "[2/4] unet: started again (attempt 2: its node was lost) on 10.0.0.2 ab12",
        "[2/4] unet: started on 10.0.0.2 ab12",
    ]


def test_json_mode_sends_the_words_to_stderr_and_the_result_alone_to_stdout(capsys):
    sink = Sink(json_mode=True)
    sink.event(BuildEvent("vae_decoder", 1, 1, Stage.WAITING))
    sink.result({"ok": True})
    out, err = capsys.readouterr()
    assert json.loads(out) == {"ok": True}
    assert err == "[1/1] vae_decoder: waiting: another export on this host is building it\n"
