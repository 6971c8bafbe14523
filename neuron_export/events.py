"""What a build reports while it runs: a component enters a Stage. The CLI's renderer (cli/render.py) turns
events into words; the Python API hands them to `export(..., on_event=...)` as they are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neuron_export.manifest import ComponentRecord


class Stage(str, Enum):
    """Where a component is; each value is the word progress shows for it."""

    QUEUED = "queued"  # submitted to the Ray cluster (--executor ray)
    STARTED = "started"  # a Ray task began on a node (again, when `attempt` > 1)
    WAITING = "waiting"  # another export on this host is building it
    CACHED = "cached"  # found in the local cache (record given)
    DOWNLOADING = "downloading"  # from the remote cache
    DOWNLOADED = "downloaded"  # from the remote cache (record given)
    LOADING = "loading"
    FUSING_LORA = "fusing LoRA"
    TRACING = "tracing"
    VALIDATING = "validating"
    DONE = "done"  # built (record given)
    UPLOADING = "uploading"  # to the remote cache
    VALIDATED = "validated"  # a cached artifact compared with the eager model again (record given)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BuildEvent:
    """Progress: a component enters a stage, or finishes with its record."""

    component: str
    index: int
    total: int
    stage: Stage
    record: ComponentRecord | None = None
    remote: str | None = None  # the remote cache's URL, for DOWNLOADING, DOWNLOADED and UPLOADING
    node: str | None = None  # the Ray cluster node a task runs on (--executor ray)
    attempt: int = 1  # which try of a Ray task this is (a lost node or worker makes Ray run it again)
    detail: str | None = None  # why this stage came about, when it is not the usual way (a retry's cause)


EventHandler = Callable[[BuildEvent], None]
