"""The compiler as planning sees it, without importing it: which backend this machine can use (the Neuron SDK
probe and its torch pairing), each backend's compiler version, and the neuronx-cc flags and post-trace calls of
a component role. Planning, deploy and the build backends all ask here."""

from __future__ import annotations

import functools
import sys
from importlib import metadata

from neuron_export.errors import ExportError
from neuron_export.roles.registry import role_of

AUTO_CAST_FLAG = {"none": "none", "matmul": "matmult", "all": "all"}  # neuronx-cc spells it "matmult"

INSTALL_HINT = (
    "install it on an inf2/trn1 host with pip install 'neuron-export[neuron]' from AWS's Neuron package "
    "repository, or pass --backend cpu to trace with TorchScript on this machine"
)


def neuron_sdk_error() -> str | None:
    """None when torch_neuronx imports; otherwise why not (PyPI's placeholder package raises on import)."""
    try:
        import torch_neuronx  # noqa: F401
    except Exception as exc:  # the placeholder raises ImportError("WRONG PACKAGE ..."); others may raise more
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return None


NXD_INSTALL_HINT = (
    "install it on the Neuron host with pip install neuronx-distributed from AWS's Neuron package repository, "
    "or pass --backend cpu"
)


def neuronx_distributed_error() -> str | None:
    """None when neuronx-distributed's ModelBuilder imports (what sharded roles are traced and loaded with)."""
    try:
        import neuronx_distributed.trace.model_builder  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising on import
        return f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return None


# Neuron SDK 2.21 (torch-neuronx 2.5) to 2.31 (torch-neuronx 2.9), the last release with torch-neuronx for inf2.
SUPPORTED_SDK = "Neuron SDK 2.21 to 2.31"
SUPPORTED_TORCH_NEURONX = ((2, 5), (2, 9))


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def torch_requirement(requirements: list[str]) -> str | None:
    """The torch specifier among a distribution's requirements ("==2.8.*"), extras left out."""
    from packaging.requirements import InvalidRequirement, Requirement

    for line in requirements:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.name.lower() == "torch" and (
            requirement.marker is None or requirement.marker.evaluate({"extra": ""})
        ):
            return str(requirement.specifier) or None
    return None


def check_torch_match(flag: str) -> None:
    """Before anything is loaded or imported: refuse a torch other than the one the installed torch-neuronx
    requires (read from its metadata; importing a mismatched pair fails, or crashes)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    neuronx = _version("torch-neuronx")
    wanted = torch_requirement(metadata.requires("torch-neuronx") or []) if neuronx else None
    if wanted is None:
        return
    torch = _version("torch")
    try:
        fits = torch is not None and SpecifierSet(wanted).contains(Version(torch), prereleases=True)
    except InvalidVersion:
        fits = False
    if not fits:
        found = f"torch {torch} is installed" if torch else "torch is not installed"
        raise ExportError(
            f"{flag}: torch-neuronx {neuronx} requires torch{wanted}, but {found}; install that "
            f"torch (pip install 'torch{wanted}') or run in the Neuron SDK's own virtualenv."
        )


def warn_outside_range() -> None:
    """One line, once per process, when the installed torch-neuronx is not one of the supported SDK's."""
    from packaging.version import InvalidVersion, Version

    neuronx = _version("torch-neuronx")
    try:
        release = Version(neuronx).release[:2] if neuronx else ()
    except InvalidVersion:
        release = ()
    if neuronx and not SUPPORTED_TORCH_NEURONX[0] <= release <= SUPPORTED_TORCH_NEURONX[1]:
        _warn_once(neuronx)


@functools.cache
def _warn_once(neuronx: str) -> None:
    low, high = (".".join(map(str, part)) for part in SUPPORTED_TORCH_NEURONX)
    print(
        f"neuron-export: warning: torch-neuronx {neuronx} is outside the range neuron-export supports "
        f"({SUPPORTED_SDK}: torch-neuronx {low} to {high}); continuing.",
        file=sys.stderr,
        flush=True,
    )


def resolve_backend(requested: str) -> str:
    """'auto' becomes 'neuron' when the SDK imports; a missing SDK is an error, never a silent CPU build."""
    if requested == "cpu":
        return "cpu"
    flag = "--backend neuron" if requested == "neuron" else "--backend auto"
    check_torch_match(flag)
    problem = neuron_sdk_error()
    if problem is None:
        warn_outside_range()
        return "neuron"
    raise ExportError(
        f"{flag} needs the AWS Neuron SDK, but torch_neuronx does not import ({problem}); {INSTALL_HINT}."
    )


def compiler_version(backend: str) -> str:
    return _neuronx_cc_version() if backend == "neuron" else _torch_version()


def _neuronx_cc_version() -> str:
    try:
        import neuronxcc

        return str(getattr(neuronxcc, "__version__", "unknown"))
    except Exception:
        return "unknown"


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError

    from neuron_export.version import installed_version

    found = installed_version("torch")  # read without importing torch, so plans stay instant
    if found is None:
        raise PackageNotFoundError("torch")
    return found


def compiler_args(
    component: str,
    is_xl: bool,
    auto_cast: str,
    auto_cast_type: str | None,
    optlevel: int,
    target: str,
    architecture: str | None = None,
) -> list[str]:
    role = role_of(component, architecture)
    if not role.generic_flags:  # a ModelBuilder role: its fixed string, whatever the export's cast and level
        return list(role.flags)
    args = ["--auto-cast", AUTO_CAST_FLAG[auto_cast]]
    if auto_cast != "none" and auto_cast_type:
        args += ["--auto-cast-type", auto_cast_type]
    args += ["--optlevel", str(optlevel), "--target", target]
    return args + list(role.compiler_flags(is_xl))


def after_trace_calls(component: str, dynamic_batch: bool, architecture: str | None = None) -> list[str]:
    """The torch_neuronx calls made on a traced module before it is saved, in order.

    dynamic_batch lets the runtime split larger batches; async_load overlaps loading of every component,
    and lazy_load defers the UNet's weights until first use so loading streams them to the device.
    """
    role = role_of(component, architecture)
    calls = ["dynamic_batch"] if dynamic_batch else []
    calls += ["async_load"] if role.async_load else []
    calls += ["lazy_load"] if role.lazy_load else []
    return calls
