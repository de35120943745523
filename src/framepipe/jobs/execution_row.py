"""The locked row of a distributed execution, with the counters a transaction keeps.

Guarantees:

* :class:`ExecutionRow` holds the execution's row as a transaction locked it, and
  :meth:`ExecutionRow.values` gives back every column a transaction may change, with the
  progress recomputed from the counters (:func:`~framepipe.jobs.rules.execution_progress`),
  so the counters and the progress are saved together.
* :attr:`ExecutionRow.running` is the one test of whether steps of the execution may start:
  running and not stopping (failing fast or cancelling).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from framepipe.jobs.models import ExecutionStatus
from framepipe.jobs.rules import execution_progress

__all__ = ["MODE", "RUNNING", "ExecutionRow"]

MODE = "workers"
"""The ``mode`` of an execution run by workers."""
RUNNING = ExecutionStatus.RUNNING.value


class ExecutionRow:
    """The locked row of one execution, with the counters a transaction changes."""

    def __init__(self, row: Mapping[str, Any]) -> None:
        self.id: str = row["id"]
        self.pipeline: str = row["pipeline"]
        self.status: str = row["status"]
        self.unfinished: int = row["unfinished"]
        self.active: int = row["active"]
        self.wsum: float = row["wsum"]
        self.wtotal: float = row["wtotal"]
        self.next_seq: int = row["next_seq"]
        self.next_done_seq: int = row["next_done_seq"]
        self.progress: float = row["progress"]
        self.error: str | None = row["error"]
        self.finished_at: float | None = row["finished_at"]
        self.started_at: float | None = row["started_at"]
        self.pipeline_ref: str | None = row["pipeline_ref"]
        self.inputs: dict[str, Any] = row["inputs"]
        self.input_roots: list[str] | None = row["input_roots"]
        self.stopping: str | None = row["stopping"]
        self.traceparent: str | None = row["traceparent"]
        self.owner: str | None = row.get("owner")

    @property
    def running(self) -> bool:
        """True while steps of the execution may start: running and not stopping."""
        return self.status == RUNNING and self.stopping is None

    @property
    def cancelling(self) -> bool:
        """True while the execution stops because it was cancelled."""
        return self.stopping == ExecutionStatus.CANCELLED.value

    def refresh_progress(self) -> float:
        """The execution's progress from its counters (:func:`execution_progress`), kept."""
        self.progress = execution_progress(
            self.progress,
            self.wsum,
            self.wtotal,
            completed=self.next_seq - self.unfinished,
            total=self.next_seq,
        )
        return self.progress

    def values(self) -> dict[str, Any]:
        self.refresh_progress()
        return {
            "status": self.status,
            "unfinished": self.unfinished,
            "active": self.active,
            "wsum": self.wsum,
            "wtotal": self.wtotal,
            "next_seq": self.next_seq,
            "next_done_seq": self.next_done_seq,
            "progress": self.progress,
            "error": self.error,
            "finished_at": self.finished_at,
            "stopping": self.stopping,
        }
