"""What the user sees: rich progress on a terminal, plain lines in logs and CI, one JSON object with --json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from shlex import quote
from typing import TYPE_CHECKING, Any

from neuron_export.deploy.inspection import validation_text
from neuron_export.events import Stage
from neuron_export.files import MANIFEST_NAME
from neuron_export.format import human_bytes
from neuron_export.roles.registry import CONTROLNET, role_of

if TYPE_CHECKING:
    from neuron_export.events import BuildEvent
    from neuron_export.manifest import Manifest
    from neuron_export.planning.jobs import Plan


# What the stages around a build mean, in words (the build's own stages print as their names).
STAGE_TEXT = {
    Stage.WAITING: "waiting: another export on this host is building it",
    Stage.DOWNLOADING: "downloading from {remote}",
    Stage.UPLOADING: "uploading to {remote}",
}
FINISHED = (Stage.DONE, Stage.CACHED, Stage.DOWNLOADED, Stage.VALIDATED)  # with the component's record


def stage_text(event: BuildEvent) -> str:
    """A stage in words, without the component: the one place an event becomes text."""
    node = f" on {event.node}" if event.node else ""  # a Ray task's node (--executor ray)
    if event.stage == Stage.STARTED and event.attempt > 1:
        return f"started again (attempt {event.attempt}: {event.detail or 'retried'}){node}"
    return STAGE_TEXT.get(event.stage, event.stage.value).format(remote=event.remote) + node


class Sink:
    """Where a command's output goes, made once from --json: words for a terminal (rich progress) or a log
    (plain lines), or one JSON object on stdout with the words on stderr."""

    def __init__(self, json_mode: bool = False, stream: Any = None, out: Any = None) -> None:
        self.json_mode = json_mode
        self.out = out or sys.stdout  # the JSON result's stream
        self.stream = stream or (sys.stderr if json_mode else self.out)
        self.interactive = self.stream.isatty()
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}

    def plan(self, plan: Plan) -> None:
        names = ", ".join(job.component for job in plan.jobs)
        self.line(
            f"Exporting {plan.source.model_id} ({plan.facts.architecture}{', LCM' if plan.facts.is_lcm else ''}, {plan.config.spec.task}) "
            f"at {plan.height}x{plan.width} (height x width), batch {plan.config.spec.batch_size}, backend {plan.backend}: {names}"
        )
        if plan.config.spec.task == "instruct-pix2pix":
            self.line(
                "--task instruct-pix2pix: --dynamic-batch-size is on (its UNet runs three times the prompt batch "
                "over two NeuronCores)."
            )

    def line(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def result(self, value: Any, indent: int | None = None) -> None:
        """A command's result: the one JSON value on stdout with --json (the words said it already otherwise)."""
        if self.json_mode:
            print(json.dumps(value, indent=indent), file=self.out, flush=True)

    def error(self, message: str, exit_code: int) -> None:
        if self.json_mode:
            print(json.dumps({"ok": False, "error": message, "exit_code": exit_code}), file=self.out, flush=True)
        else:
            print(f"neuron-export: error: {message}", file=sys.stderr, flush=True)

    def event(self, event: BuildEvent) -> None:
        if self.interactive:
            self._rich_event(event)
            return
        prefix = f"[{event.index}/{event.total}] {event.component}"
        node = f" on {event.node}" if event.node else ""
        record = event.record if event.stage in FINISHED else None
        if record is None:
            self.line(f"{prefix}: {stage_text(event)}")
        elif event.stage in (Stage.CACHED, Stage.DOWNLOADED):
            where = f"downloaded from {event.remote}" if event.stage == Stage.DOWNLOADED else "cached"
            self.line(f"{prefix}: {where}{node} (built {record.built_at})")  # its validation follows
        elif event.stage == Stage.VALIDATED:  # a cached artifact's validation for this export
            v = record.validation
            done = "validation" if v.reused or v.status == "skipped" else "validated the cached artifact:"
            self.line(f"{prefix}: {done} {validation_text(record)}")
        else:
            self.line(
                f"{prefix}: done{node} in {record.build_seconds:.1f}s, peak RSS {human_bytes(record.peak_rss_bytes)}, "
                f"validation {validation_text(record)}"
            )

    def _rich_event(self, event: BuildEvent) -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        if self._progress is None:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
            )
            self._progress.start()
        progress = self._progress
        label = f"[{event.index}/{event.total}] {event.component}"
        if event.component not in self._tasks:
            self._tasks[event.component] = progress.add_task(label, total=1)
        task = self._tasks[event.component]
        if event.stage in FINISHED and event.record is not None:
            node = f" on {event.node}" if event.node else ""
            cached = f"{event.stage.value}, " if event.stage != Stage.DONE else ""
            progress.update(task, description=f"{label}: {cached}{validation_text(event.record)}{node}", completed=1)
            progress.stop_task(task)
        else:
            progress.update(task, description=f"{label}: {stage_text(event)}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._tasks.clear()  # their ids belonged to the stopped display

    def summary(
        self, manifest: Manifest, output: Any, origins: dict[str, str] | None = None, seconds: float | None = None
    ) -> None:
        """The components' table (--json: the object on stdout holds it), then totals and the next command."""
        self.close()
        origins = origins or {}
        absolute = Path(output).resolve()
        if not self.json_mode:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=f"Exported to {absolute}", title_justify="left")
            for column in ("component", "origin", "inputs", "seconds", "peak RSS", "size", "validation"):
                table.add_column(column)
            for record in manifest.components.values():
                shapes = ", ".join(f"{t.name}{tuple(t.shape)}" for t in record.inputs)
                size = sum(f.size for f in record.files)
                table.add_row(
                    record.name,
                    origins.get(record.name, ""),
                    shapes,
                    f"{record.build_seconds:.1f}",
                    human_bytes(record.peak_rss_bytes),
                    human_bytes(size),
                    validation_text(record),
                )
            Console(file=self.stream, width=None if self.interactive else 160).print(table)
        counts = ", ".join(
            f"{sum(origin == kind for origin in origins.values())} {kind}" for kind in ("built", "cached", "downloaded")
        )
        took = f" in {seconds:.1f}s" if seconds is not None else ""
        self.line(f"Exported {len(manifest.components)} component(s){took} ({counts}) to {absolute}")
        self.line(f"Next: {next_command(manifest, absolute)}  (or: neuron-export verify {quote(str(absolute))})")


def next_command(manifest: Manifest, export_dir: Path) -> str:
    """The `generate` call that runs this export, with the inputs its task needs."""
    task = manifest.pipeline.task
    extra = {
        "image-to-image": " --image INIT.png",
        "inpainting": " --image INIT.png --mask MASK.png",
        "instruct-pix2pix": " --image IMAGE.png",
    }.get(task, "")
    extra += " --control-image CONTROL.png" * sum(CONTROLNET.matches(name) for name in manifest.components)
    if "image_encoder" in manifest.components:
        extra += " --ip-adapter-image STYLE.png"
    prompts = " --prompt 'a photo of a cat'" * (1 if manifest.pipeline.batch_size == 1 else 0)
    if manifest.pipeline.batch_size > 1:
        prompts = f" --prompt 'a photo of a cat' --batch-size {manifest.pipeline.batch_size}"
    return f"neuron-export generate {quote(str(export_dir))}{prompts}{extra} -o sample.png"


def result_object(manifest: Manifest, output: Any, origins: dict[str, str]) -> dict[str, Any]:
    """The --json result; `origins` says per component whether it was built, cached or downloaded this run."""
    return {
        "ok": True,
        "output": str(output),
        "manifest": str(output / MANIFEST_NAME),
        "backend": next(iter(manifest.components.values())).backend if manifest.components else None,
        "pipeline": manifest.pipeline.model_dump(),
        "components": {
            name: {
                "origin": origins[name],
                "remote": record.remote if origins[name] == "downloaded" else None,
                "signed_by": record.signed_by if origins[name] == "downloaded" else None,
                "seconds": record.build_seconds,
                "peak_rss_bytes": record.peak_rss_bytes,
                "validation": record.validation.model_dump(),
                "files": [f.model_dump() for f in record.files],
            }
            for name, record in manifest.components.items()
        },
    }


def plan_summary(plan: Plan) -> dict[str, Any]:
    """`plan --json`'s object for one export: its jobs (shapes, flags, cache hit or miss, estimates) and schedule."""
    return {
        "output": str(plan.output),
        "backend": plan.backend,
        "up_to_date": plan.up_to_date,
        "jobs": plan.config.options.jobs,
        "memory_budget_bytes": plan.memory_budget,
        "estimated_wall_seconds": round(plan.estimated_wall_seconds, 1),
        "notes": list(plan.notes),
        "components": [
            {
                "component": job.component,
                "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in job.spec.inputs],
                "compiler_args": list(job.compiler_args),
                "cache": "hit" if job.cached else "miss",
                "cache_key": job.cache_key,
                "loras": [lora.adapter_name for lora in job.loras],  # fused into this component, in order
                "parameters": job.weights.parameters,
                "estimated_peak_bytes": job.estimated_peak_bytes,
                "estimated_seconds": round(job.estimated_seconds, 1),
                **sharding(plan, job.component),
            }
            for job in plan.jobs
        ],
    }


def sharding(plan: Plan, component: str) -> dict[str, Any]:
    """A neuronx-distributed role is sharded over --tensor-parallel-size ranks (one weights/ shard each)."""
    sharded = role_of(component, plan.facts.architecture).sharded
    return {"sharded": sharded, "tensor_parallel_size": plan.config.spec.tensor_parallel_size if sharded else 1}


def render_plans(plans: list[Plan], sink: Sink) -> None:
    """The jobs of each export as tables, or (--json) one object with them and the CI builds they need."""
    from neuron_export.planning.fleet import builds

    summaries = [plan_summary(plan) for plan in plans]
    if sink.json_mode:
        found = {"builds": builds(plans)}  # one per cache key: what a CI matrix fans out
        sink.result({**summaries[0], **found} if len(summaries) == 1 else {"plans": summaries, **found})
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sink.stream, width=None if sink.interactive else 200)
    for summary in summaries:
        table = Table(title=f"{summary['output']} ({summary['backend']} backend)")
        for column in ("component", "inputs", "compiler args", "cache", "est. peak", "est. time"):
            table.add_column(column)
        for job in summary["components"]:
            table.add_row(
                f"{job['component']}\n(sharded, tp {job['tensor_parallel_size']})"
                if job["sharded"]
                else job["component"],
                ", ".join(f"{t['name']}{tuple(t['shape'])}" for t in job["inputs"]),
                " ".join(job["compiler_args"]),
                job["cache"],
                human_bytes(job["estimated_peak_bytes"]),
                f"{job['estimated_seconds']:.0f} s",
            )
        console.print(table)
        misses = sum(job["cache"] == "miss" for job in summary["components"])
        state = (
            "up to date, nothing to build"
            if summary["up_to_date"]
            else "every component is cached; assembling only"
            if not misses
            else f"{misses} to build, about {summary['estimated_wall_seconds']:.0f} s"
        )
        console.print(f"with --jobs {summary['jobs']} within {human_bytes(summary['memory_budget_bytes'])}: {state}")
        for note in summary["notes"]:
            console.print(f"note: {note}", markup=False, highlight=False)
