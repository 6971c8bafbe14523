"""`push`: upload a verified export to the Hugging Face Hub, with a generated model card.

The export directory is never modified: the card is uploaded as README.md by a separate `upload_file`
call (verify ignores a README.md, which is also what a download of the repository contains), and
`upload_folder` uploads exactly the files the manifest lists plus manifest.json, nothing else.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_export.errors import ExportError, PushError
from neuron_export.pipelines import pipeline_for

if TYPE_CHECKING:
    from neuron_export.manifest import Manifest

CARD_NAME = "README.md"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id or "") or ".." in repo_id or len(repo_id) > 96:
        raise ExportError(
            f"--repo-id {repo_id!r} is not a Hub repository id; pass it as org/name (letters, digits, '-', '_', '.')."
        )
    return repo_id


def _is_hub_id(model_id: str) -> bool:
    return bool(REPO_ID.match(model_id)) and not Path(model_id).exists()


def _table(rows: list[list[str]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    head, *body = rows
    lines = ["| " + " | ".join(cell(c) for c in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def model_card(manifest: Manifest, repo_id: str, revision: str | None = None) -> str:
    """Markdown with Hub metadata: what was exported, from what, at which shapes and flags, and how to load it."""
    from neuron_export.deploy.checks import CPU_COMPILER
    from neuron_export.deploy.footprint import footprint_of, smallest_fit
    from neuron_export.deploy.inspection import validation_text
    from neuron_export.format import human_bytes, human_count

    p, s, c, env = manifest.pipeline, manifest.source, manifest.config, manifest.environment
    records = list(manifest.components.values())
    cpu_only = any(r.compiler_type == CPU_COMPILER for r in records)
    target = c.get("target") or "inf2"
    tags = [
        "neuron-export",
        "optimum-neuron",
        "aws-neuron",
        "inferentia2" if target == "inf2" else target,
        "stable-diffusion-xl" if p.architecture.startswith("sdxl") else "stable-diffusion",
        "diffusers",
    ]
    if p.is_lcm:
        tags.append("lcm")
    controlnets = len(c.get("controlnet") or ())
    kind = pipeline_for(p.family, p.task, "controlnet" if controlnets else None)
    front = ["---", "tags:"] + [f"- {t}" for t in tags] + [f"pipeline_tag: {kind.hub_tag}"]
    if _is_hub_id(s.model_id):
        front.append(f"base_model: {s.model_id}")
    front.append("---")

    source = (
        f"`{s.model_id}`"
        + (f" at revision `{s.revision}`" if s.revision else "")
        + (f", commit `{s.commit}`" if s.commit else "")
    )
    if s.unet_id:
        source += f", with the UNet from `{s.unet_id}`" + (f" (commit `{s.unet_commit}`)" if s.unet_commit else "")
    compilers = sorted({f"{r.compiler_type} {r.compiler_version}" for r in records})
    fit = footprint_of(manifest)
    smallest = smallest_fit(fit, target)
    all_passed = all(r.validation.status == "passed" for r in records)

    lines = [*front, "", f"# {repo_id.split('/')[-1]}", ""]
    lines.append(
        f"{p.diffusers_pipeline} ({p.architecture}, {p.task}{', LCM' if p.is_lcm else ''}) from {source}, exported by "
        f"{manifest.tool} {manifest.tool_version} on {manifest.created_at} into optimum-neuron's layout for "
        f"AWS {'Inferentia2' if target == 'inf2' else target} (`{p.optimum_pipeline}`)."
    )
    lines.append("")
    if cpu_only:
        lines += [
            "> **Not for NeuronCores.** This export was traced with `--backend cpu` (compiler_type "
            f"`{CPU_COMPILER}`): its `model.neuron` files are plain TorchScript for the CPU, useful to test the "
            "layout and tooling. Re-export with `--backend neuron` on an inf2/trn1 host to deploy.",
            "",
        ]
    lines += [
        "## What was compiled",
        "",
        _table(
            [
                ["", ""],
                ["image size", f"{p.width}x{p.height} pixels (static; other sizes need a new export)"],
                ["batch", f"{p.batch_size} prompt(s) x {p.num_images_per_prompt} image(s) per prompt"],
                ["data-parallel mode", f"`{p.data_parallel_mode}`"],
                ["compiler", ", ".join(compilers)],
                [
                    "compile target",
                    f"{target}, auto-cast {c.get('auto_cast')}/{c.get('auto_cast_type')}, optlevel {c.get('optlevel')}, "
                    f"inline weights {c.get('inline_weights')}, dynamic batch {c.get('dynamic_batch_size')}",
                ],
                ["validation", "passed for every component" if all_passed else "see the table below"],
                [
                    "smallest instance that fits (estimate)",
                    smallest.name if smallest else "none in neuron-export's table",
                ],
            ]
        ),
        "",
    ]
    lines += [
        "## Components",
        "",
        _table(
            [["component", "inputs (name shape dtype)", "parameters", "artifact", "validation"]]
            + [
                [
                    r.name,
                    "; ".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in r.inputs),
                    human_count(r.parameter_count),
                    human_bytes(sum(f.size for f in r.files)),
                    validation_text(r),
                ]
                for r in records
            ]
        ),
        "",
    ]
    lines += ["## Compiler flags", ""]
    for r in records:
        flags = (
            " ".join(r.compiler_args)
            if r.compiler_args
            else f"(none: {r.backend} backend; a Neuron build passes {' '.join(r.neuron_compiler_args)})"
        )
        lines.append(f"- `{r.name}`: `{flags}`" if r.compiler_args else f"- `{r.name}`: {flags}")
    lines += ["", "## Versions used", "", ", ".join(f"{k} {v}" for k, v in env.items() if v is not None), ""]

    revision_arg = f', revision="{revision}"' if revision and revision != "main" else ""
    load = [f"from optimum.neuron import {p.optimum_pipeline}"]
    if kind.images:
        load.append("from PIL import Image")
    load += [
        "",
        f'pipe = {p.optimum_pipeline}.from_pretrained("{repo_id}"{revision_arg}, '
        f'data_parallel_mode="{p.data_parallel_mode}")',
        kind.example_call(controlnets),
        'image.save("image.png")',
    ]
    lines += [
        "## Load it",
        "",
        "With optimum-neuron on an inf2/trn1 host (the AWS Neuron SDK installed):",
        "",
        "```python",
        *load,
        "```",
        "",
    ]
    if "text_encoder" not in manifest.components:
        lines += [
            "optimum-neuron 0.4.5 cannot load a pipeline without `text_encoder` (the SDXL refiner); use "
            "`neuron-export generate` below.",
            "",
        ]
    revision_flag = f" --revision {revision}" if revision and revision != "main" else ""
    lines += [
        "With neuron-export (checks the files, this host's SDK and the instance's memory first):",
        "",
        "```bash",
        f"hf download {repo_id}{revision_flag} --local-dir ./{repo_id.split('/')[-1]}",
        f"neuron-export verify ./{repo_id.split('/')[-1]} --instance {smallest.name if smallest else 'inf2.xlarge'}",
        f"neuron-export generate ./{repo_id.split('/')[-1]} {kind.generate_args(controlnets)}",
        "```",
        "",
        "`manifest.json` records every file's sha256, the shapes, flags and versions above.",
        "",
    ]
    return "\n".join(lines)


def _default_api(token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _call(step: str, function: Any, **kwargs: Any) -> Any:
    try:
        return function(**kwargs)
    except ExportError:
        raise
    except Exception as exc:  # the Hub's HTTP errors, offline mode, connection errors: one sentence each
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise PushError(
            f"pushing to {kwargs.get('repo_id')} failed at {step} ({type(exc).__name__}: {detail}); check --repo-id, "
            "--token (or `hf auth login`) and the network, then push again."
        ) from None


def push_export(
    directory: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    api: Any = None,
) -> dict[str, Any]:
    """Verify integrity, then create_repo (exist_ok), upload the listed files, upload the card. Returns what was done."""
    from neuron_export.deploy.verify import require_integrity
    from neuron_export.files import MANIFEST_NAME
    from neuron_export.manifest import read_manifest

    check_repo_id(repo_id)
    manifest = read_manifest(directory)
    require_integrity(directory, manifest)
    card = model_card(manifest, repo_id, revision)
    files = sorted({f.path for f in manifest.all_files()} | {MANIFEST_NAME})
    api = api if api is not None else _default_api(token)
    title = f"{manifest.pipeline.architecture} {manifest.pipeline.width}x{manifest.pipeline.height} b{manifest.pipeline.batch_size}"

    repo_url = _call("create_repo", api.create_repo, repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        _call("create_branch", api.create_branch, repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
    folder = _call(
        "upload_folder",
        api.upload_folder,
        repo_id=repo_id,
        folder_path=str(directory),
        repo_type="model",
        revision=revision,
        allow_patterns=[glob.escape(f) for f in files],
        commit_message=f"neuron-export: {title} ({len(files)} files)",
    )
    card_commit = _call(
        "upload_file",
        api.upload_file,
        path_or_fileobj=card.encode(),
        path_in_repo=CARD_NAME,
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message="neuron-export: model card",
    )
    return {
        "ok": True,
        "repo_id": repo_id,
        "repo_url": str(repo_url) if repo_url is not None else None,
        "revision": revision or "main",
        "private": private,
        "files": files,
        "card": CARD_NAME,
        "commits": [getattr(folder, "commit_url", None), getattr(card_commit, "commit_url", None)],
    }
