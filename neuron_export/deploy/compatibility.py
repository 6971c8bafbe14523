"""verify's compatibility check: this host's torch / torch-neuronx / neuronx-cc / diffusers against the
manifest, by the rules in RULES (exit 4).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neuron_export.deploy.checks import CPU_COMPILER, NEURON_COMPILER, CheckResult
from neuron_export.deploy.instances import Instance

if TYPE_CHECKING:
    from neuron_export.manifest import Manifest


MIN_DIFFUSERS = (0, 30)  # the oldest diffusers this project supports (pyproject.toml)


@dataclass(frozen=True)
class RuntimeEnv:
    """The versions on the host that will load the export (this one)."""

    torch: str | None
    diffusers: str | None
    torch_neuronx: str | None = None
    neuronx_cc: str | None = None
    sdk_problem: str | None = "not probed"  # None when torch_neuronx imports
    diffusers_pipelines: frozenset[str] | None = None  # pipeline classes the installed diffusers exports

    @property
    def has_sdk(self) -> bool:
        return self.sdk_problem is None


def probe_environment() -> RuntimeEnv:
    from importlib import metadata, util

    from neuron_export.compiler import neuron_sdk_error

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    problem = neuron_sdk_error()  # PyPI's placeholder has a distribution but no usable module: import it
    pipelines: frozenset[str] | None = None
    spec = util.find_spec("diffusers")  # finds the package without importing it (importing takes seconds)
    if spec is not None and spec.origin:
        try:
            text = Path(spec.origin).read_text(errors="replace")
            pipelines = frozenset(re.findall(r"\b(\w+Pipeline)\b", text))
        except OSError:
            pipelines = None
    return RuntimeEnv(
        torch=version("torch"),
        diffusers=version("diffusers"),
        torch_neuronx=version("torch-neuronx") if problem is None else None,
        neuronx_cc=version("neuronx-cc") if problem is None else None,
        sdk_problem=problem,
        diffusers_pipelines=pipelines,
    )


def release(version: str | None, parts: int = 2) -> tuple[int, ...] | None:
    """'2.13.0+cpu' -> (2, 13); None when there is no leading number."""
    if not version:
        return None
    numbers = re.findall(r"\d+", version.split("+")[0])
    return tuple(int(n) for n in numbers[:parts]) if numbers else None


@dataclass(frozen=True)
class RuleOutcome:
    status: str  # ok | failed | unchecked | n/a
    message: str


@dataclass(frozen=True)
class Rule:
    id: str
    reason: str  # one line: why a mismatch breaks loading
    check: Callable[[Manifest, RuntimeEnv, bool], RuleOutcome]


def _components_by(manifest: Manifest, compiler_type: str) -> list[str]:
    return [name for name, r in manifest.components.items() if r.compiler_type == compiler_type]


def _no_sdk(env: RuntimeEnv) -> RuleOutcome:
    return RuleOutcome(
        "unchecked",
        f"this host has no usable Neuron SDK (torch_neuronx: {env.sdk_problem}), so a neuron "
        "export's runtime compatibility cannot be checked here; run verify on the inf2/trn1 host",
    )


def _rule_cpu_artifact(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    cpu = _components_by(manifest, CPU_COMPILER)
    if not cpu:
        return RuleOutcome("n/a", "no CPU-traced components")
    names = ", ".join(cpu)
    if on_neuron:
        return RuleOutcome(
            "failed",
            f"{names}: compiler_type {CPU_COMPILER} (exported with --backend cpu) cannot run on a "
            "NeuronCore; re-export with --backend neuron on an inf2/trn1 host",
        )
    return RuleOutcome("ok", f"{names}: CPU TorchScript traces; they run on this host's CPU, never on a NeuronCore")


def _rule_neuronx_cc(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    neuron = _components_by(manifest, NEURON_COMPILER)
    if not neuron:
        return RuleOutcome("n/a", "no Neuron-compiled components")
    if not env.has_sdk:
        return _no_sdk(env)
    if env.neuronx_cc is None:
        return RuleOutcome(
            "unchecked", "torch_neuronx imports but no neuronx-cc distribution is installed to compare with"
        )
    bad = [
        f"{n} (neuronx-cc {manifest.components[n].compiler_version})"
        for n in neuron
        if release(manifest.components[n].compiler_version) != release(env.neuronx_cc)
    ]
    if bad:
        return RuleOutcome(
            "failed",
            f"{', '.join(bad)} compiled by a different neuronx-cc major.minor than this host's "
            f"{env.neuronx_cc}; re-export on this SDK or install the recorded neuronx-cc release",
        )
    return RuleOutcome("ok", f"neuronx-cc {env.neuronx_cc} matches the compiler of {', '.join(neuron)}")


def _rule_torch_neuronx(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    if not _components_by(manifest, NEURON_COMPILER):
        return RuleOutcome("n/a", "no Neuron-compiled components")
    if not env.has_sdk:
        return _no_sdk(env)
    recorded = manifest.environment.get("torch_neuronx")
    if recorded is None:
        return RuleOutcome("unchecked", "the manifest does not record the torch-neuronx that traced the export")
    if release(recorded) != release(env.torch_neuronx):
        return RuleOutcome(
            "failed",
            f"traced with torch-neuronx {recorded}, this host has {env.torch_neuronx}; "
            "install the recorded torch-neuronx release or re-export here",
        )
    return RuleOutcome("ok", f"torch-neuronx {env.torch_neuronx} matches the recorded {recorded}")


def _rule_torch(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    recorded = manifest.environment.get("torch")
    if env.torch is None:
        return RuleOutcome(
            "failed",
            f"torch is not installed on this host; install the torch the manifest records ({recorded}) or newer",
        )
    saved, here = release(recorded), release(env.torch)
    if saved is None or here is None:
        return RuleOutcome("unchecked", f"cannot compare torch versions (recorded {recorded}, this host {env.torch})")
    if saved > here:
        return RuleOutcome(
            "failed",
            f"model.neuron files were saved by torch {recorded}, newer than this host's "
            f"{env.torch}; upgrade torch here or re-export with this torch",
        )
    return RuleOutcome("ok", f"torch {env.torch} can read TorchScript saved by torch {recorded}")


def _rule_diffusers(manifest: Manifest, env: RuntimeEnv, on_neuron: bool) -> RuleOutcome:
    wanted = manifest.pipeline.diffusers_pipeline
    if env.diffusers is None:
        return RuleOutcome(
            "failed", f"diffusers is not installed on this host; install diffusers>={'.'.join(map(str, MIN_DIFFUSERS))}"
        )
    if (release(env.diffusers) or (0,)) < MIN_DIFFUSERS:
        return RuleOutcome(
            "failed",
            f"diffusers {env.diffusers} is older than {'.'.join(map(str, MIN_DIFFUSERS))}, the "
            f"oldest this export's runtime supports; upgrade diffusers",
        )
    if env.diffusers_pipelines is not None and wanted not in env.diffusers_pipelines:
        return RuleOutcome(
            "failed",
            f"diffusers {env.diffusers} has no {wanted}, the pipeline class this export needs; upgrade diffusers",
        )
    return RuleOutcome("ok", f"diffusers {env.diffusers} provides {wanted}")


# The rules, in order. Each names what breaks loading and why, in one line.
RULES: tuple[Rule, ...] = (
    Rule(
        "cpu-artifact-on-neuroncore",
        "a --backend cpu export is a plain TorchScript trace with no NEFF inside: a NeuronCore cannot execute it",
        _rule_cpu_artifact,
    ),
    Rule(
        "neuronx-cc-release",
        "a NEFF compiled by one neuronx-cc major.minor is not guaranteed to load under another SDK release's runtime "
        "('Could not load the model status=2')",
        _rule_neuronx_cc,
    ),
    Rule(
        "torch-neuronx-release",
        "torch-neuronx deserialises the NEFF wrapper it wrote; another major.minor may not load it",
        _rule_torch_neuronx,
    ),
    Rule(
        "torchscript-newer-torch",
        "torch.jit.load cannot read TorchScript written by a newer torch (newer file format and operator versions)",
        _rule_torch,
    ),
    Rule(
        "diffusers-pipeline-class",
        "the runtime builds the diffusers pipeline class the manifest records; a diffusers without it cannot",
        _rule_diffusers,
    ),
)


def check_compatibility(manifest: Manifest, env: RuntimeEnv, instance: Instance | None = None) -> CheckResult:
    """Apply RULES. The export runs on a NeuronCore when an --instance is given or this host has the SDK."""
    on_neuron = instance is not None or env.has_sdk
    outcomes = [(rule, rule.check(manifest, env, on_neuron)) for rule in RULES]
    problems = [f"{rule.id}: {o.message} ({rule.reason})" for rule, o in outcomes if o.status == "failed"]
    unchecked = [f"{rule.id}: {o.message}" for rule, o in outcomes if o.status == "unchecked"]
    notes = [f"{rule.id}: {o.message}" for rule, o in outcomes if o.status == "ok"]
    where = (
        f"a NeuronCore ({instance.name})"
        if instance
        else ("this host's NeuronCores" if env.has_sdk else "this host's CPU")
    )
    if problems:
        verdict, summary = (
            "failed",
            f"{len(problems)} rule(s) say this export will not load on {where}: "
            + ", ".join(rule.id for rule, o in outcomes if o.status == "failed"),
        )
    elif unchecked:
        verdict, summary = "unchecked", "not fully checked: " + "; ".join(unchecked)
    else:
        verdict, summary = "ok", f"loads on {where} by every rule that applies"
    details = {
        "runs_on": where,
        "host": {
            "torch": env.torch,
            "diffusers": env.diffusers,
            "torch_neuronx": env.torch_neuronx,
            "neuronx_cc": env.neuronx_cc,
            "neuron_sdk": "imports" if env.has_sdk else env.sdk_problem,
        },
        "recorded": {k: manifest.environment.get(k) for k in ("torch", "diffusers", "torch_neuronx", "neuronx_cc")},
        "rules": [
            {"id": rule.id, "status": o.status, "message": o.message, "reason": rule.reason} for rule, o in outcomes
        ],
    }
    return CheckResult("compatibility", verdict, summary, problems, unchecked + notes, details)
