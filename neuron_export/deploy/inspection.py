"""Read an export's manifest and summarise it for people (rich) or machines (the manifest's own JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.format import human_bytes, human_count
from neuron_export.roles.registry import find_role

if TYPE_CHECKING:
    from neuron_export.manifest import ComponentRecord, Manifest


def validation_text(record: ComponentRecord) -> str:
    v = record.validation
    by = f", as its {v.by} reported it" if v.by else ""  # a downloaded component: not checked on this host
    if v.status == "passed" and v.max_abs_diff is not None and v.atol is not None:
        return f"passed (max diff {v.max_abs_diff:.2g} <= {v.atol:g}{', measured earlier' if v.reused else ''}{by})"
    return (f"{v.status}: {v.reason}" if v.reason else v.status) + by


def artifact_bytes(record: ComponentRecord) -> int:
    return sum(f.size for f in record.files)


def sharding(record: ComponentRecord, architecture: str | None, tensor_parallel_size: int) -> dict[str, Any] | None:
    """A neuronx-distributed role's ranks and the weight shards its folder holds (None: a plain trace)."""
    role = find_role(record.name, architecture)
    if role is None or not role.sharded:
        return None
    shards = [f.path for f in record.files if f.path.startswith(f"{record.name}/weights/")]
    return {"tensor_parallel_size": tensor_parallel_size, "shards": shards}


def summary(manifest: Manifest, directory: Path) -> dict[str, Any]:
    """The facts `inspect` shows, as plain data (also what tests look at)."""
    p, s, c = manifest.pipeline, manifest.source, manifest.config
    components = list(manifest.components.values())
    backends = sorted({r.backend for r in components})
    tp = int(c.get("tensor_parallel_size") or 1)
    return {
        "export": str(directory),
        "pipeline": {
            "architecture": p.architecture,
            "family": p.family,
            "task": p.task,
            "lcm": p.is_lcm,
            "diffusers_pipeline": p.diffusers_pipeline,
            "optimum_pipeline": p.optimum_pipeline,
            "size": f"{p.height}x{p.width}",
            "batch_size": p.batch_size,
            "num_images_per_prompt": p.num_images_per_prompt,
            "data_parallel_mode": p.data_parallel_mode,
        },
        "source": {k: v for k, v in s.model_dump().items() if v is not None},
        "build": {
            "tool": f"{manifest.tool} {manifest.tool_version}",
            "created_at": manifest.created_at,
            "backend": ", ".join(backends),
            "target": c.get("target"),
            "auto_cast": c.get("auto_cast"),
            "auto_cast_type": c.get("auto_cast_type"),
            "optlevel": c.get("optlevel"),
            "inline_weights": c.get("inline_weights"),
            "dynamic_batch_size": c.get("dynamic_batch_size"),
            "torch_dtype": c.get("torch_dtype") or "float32",
            "tensor_parallel_size": tp,
        },
        "components": [
            {
                "name": r.name,
                "model_type": r.model_type,
                "compiler": f"{r.compiler_type} {r.compiler_version}",
                "inputs": [{"name": t.name, "shape": t.shape, "dtype": t.dtype} for t in r.inputs],
                "outputs": r.outputs,
                "parameters": r.parameter_count,
                "artifact_bytes": artifact_bytes(r),
                "build_seconds": r.build_seconds,
                "peak_rss_bytes": r.peak_rss_bytes,
                "validation": validation_text(r),
                "compiler_args": r.compiler_args,
                "neuron_compiler_args": r.neuron_compiler_args,
                "sharding": sharding(r, p.architecture, tp),
            }
            for r in components
        ],
        "environment": manifest.environment,
        "totals": {
            "files": len(manifest.all_files()) + 1,
            "bytes": sum(f.size for f in manifest.all_files()),
            "artifact_bytes": sum(artifact_bytes(r) for r in components),
            "parameters": sum(r.parameter_count for r in components),
            "build_seconds": sum(r.build_seconds for r in components),
            "peak_rss_bytes": max((r.peak_rss_bytes for r in components), default=0),
        },
    }


def render(manifest: Manifest, directory: Path, console: Any) -> None:
    """The rich view: pipeline, source, build options, a component table, compiler flags, versions, totals."""
    from rich.table import Table
    from rich.text import Text

    info = summary(manifest, directory)
    p, b, t = info["pipeline"], info["build"], info["totals"]
    console.print(Text(f"Export {directory}", style="bold"))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    lcm = ", LCM" if p["lcm"] else ""
    facts.add_row(
        "pipeline",
        Text(f"{p['architecture']} {p['task']}{lcm}: {p['optimum_pipeline']} (diffusers {p['diffusers_pipeline']})"),
    )
    facts.add_row(
        "shapes",
        Text(
            f"{p['size']} pixels (height x width), batch {p['batch_size']}, {p['num_images_per_prompt']} image(s) per prompt, "
            f"torch dtype {b['torch_dtype']}"
        ),
    )
    facts.add_row(
        "parallel",
        Text(f"data-parallel mode {p['data_parallel_mode']}, tensor parallel size {b['tensor_parallel_size']}"),
    )
    facts.add_row("source", Text(source_text(info["source"])))
    facts.add_row(
        "built",
        Text(
            f"{b['tool']} at {b['created_at']}, backend {b['backend']}, target {b['target']}, "
            f"auto-cast {b['auto_cast']}/{b['auto_cast_type']}, -O{b['optlevel']}, "
            f"inline weights {_yes_no(b['inline_weights'])}, dynamic batch {_yes_no(b['dynamic_batch_size'])}"
        ),
    )
    facts.add_row(
        "versions",
        Text(
            ", ".join(f"{k} {v}" for k, v in info["environment"].items() if v is not None)
            + _missing_versions(info["environment"])
        ),
    )
    facts.add_row(
        "totals",
        Text(
            f"{t['files']} files, {human_bytes(t['bytes'])} ({human_bytes(t['artifact_bytes'])} of artifacts), "
            f"{human_count(t['parameters'])} parameters, built in {t['build_seconds']:.1f}s, "
            f"peak RSS {human_bytes(t['peak_rss_bytes'])}"
        ),
    )
    console.print(facts)

    table = Table(title="Components", title_justify="left")
    for column in (
        "component",
        "model type",
        "inputs (name shape dtype)",
        "params",
        "artifact",
        "seconds",
        "peak RSS",
        "validation",
    ):
        table.add_column(column, no_wrap=column in ("component", "inputs (name shape dtype)"))  # shapes read whole
    for c in info["components"]:
        inputs = "\n".join(f"{i['name']} {tuple(i['shape'])} {i['dtype']}" for i in c["inputs"])
        table.add_row(
            Text(c["name"]),
            Text(c["model_type"]),
            Text(inputs),
            human_count(c["parameters"]),
            human_bytes(c["artifact_bytes"]),
            f"{c['build_seconds']:.1f}",
            human_bytes(c["peak_rss_bytes"]),
            Text(c["validation"]),
        )
    console.print(table)

    sharded = [c for c in info["components"] if c["sharding"]]
    if sharded:  # neuronx-distributed roles: their weights live beside the NEFF, one shard per rank
        console.print(Text("Sharded (neuronx-distributed)", style="bold"))
        for c in sharded:
            shards = ", ".join(c["sharding"]["shards"]) or "no shard"
            console.print(Text(f"  {c['name']}: tp {c['sharding']['tensor_parallel_size']}, {shards}"))

    console.print(Text("Compiler", style="bold"))
    for c in info["components"]:
        if c["compiler_args"]:
            line = f"  {c['name']} ({c['compiler']}): {' '.join(c['compiler_args'])}"
        else:
            line = (
                f"  {c['name']} ({c['compiler']}): no compiler flags; a Neuron build of this component would pass "
                f"{' '.join(c['neuron_compiler_args'])}"
            )
        console.print(Text(line))


def _yes_no(value: Any) -> str:
    return {True: "yes", False: "no"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def _item_text(item: dict[str, Any]) -> str:
    """One LoRA or add-on: its first field, then the others that are set ("sha256 0102f0a1b2c3", "components unet+text_encoder")."""
    head, *rest = [(k, v) for k, v in item.items() if v not in (None, [], "")]
    parts: list[str] = []
    for key, value in rest:
        if isinstance(value, list):
            value = "+".join(map(str, value))
        elif key == "sha256" or key.endswith("commit"):
            value = str(value)[:12]
        parts.append(f"{key.replace('_', ' ')} {value}")
    return f"{head[1]} ({', '.join(parts)})" if parts else str(head[1])


def source_text(source: dict[str, Any]) -> str:
    """The source record in words: "model_id models/sd, lora a (weight name x.safetensors, scale 0.9, ...)"."""
    parts: list[str] = []
    for key, value in source.items():
        if isinstance(value, list):
            singular = key[:-1] if key.endswith("s") else key
            parts.extend(f"{singular} {_item_text(item)}" for item in value)
        elif isinstance(value, dict):
            parts.append(f"{key.replace('_', '-')} {_item_text(value)}")
        else:
            parts.append(f"{key} {value}")
    return ", ".join(parts)


def _missing_versions(environment: dict[str, str | None]) -> str:
    missing = [k for k, v in environment.items() if v is None]
    return f" (not recorded: {', '.join(missing)})" if missing else ""
