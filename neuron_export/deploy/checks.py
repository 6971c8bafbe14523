"""What each of verify's checks returns, and the compiler names the manifest records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CPU_COMPILER = "torchscript-cpu"
NEURON_COMPILER = "neuronx-cc"


@dataclass
class CheckResult:
    name: str
    verdict: str  # ok | failed | unchecked | skipped
    summary: str
    problems: list[str] = field(default_factory=list)  # each names the file / package / resource at fault
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.verdict == "failed"
