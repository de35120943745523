"""The types of the job client's calls: what they return (:class:`ExecutionSummary`,
:class:`EventPage`, :class:`CancelResult`, :data:`Mode`) and the status filter they take.

The results are frozen dataclasses, the same in both modes, built by
:class:`~framepipe.jobs.client.JobClient` (and so
:class:`~framepipe.jobs.sync_client.SyncJobClient`) from what the store holds; each ``to_dict``
is JSON-ready, as the command line and the HTTP service print and answer them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from framepipe.events import Event
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus

__all__ = [
    "CancelResult",
    "EventPage",
    "ExecutionSummary",
    "Mode",
    "StatusFilter",
    "status_values",
]

Mode = Literal["embedded", "workers"]
"""Where executions run: in the client's engine, or on ``framepipe worker`` processes."""
StatusFilter = str | ExecutionStatus | Iterable[str | ExecutionStatus] | None
"""One status or several, as names or :class:`ExecutionStatus`; None: any."""


def status_values(status: StatusFilter) -> list[str] | None:
    """The status names ``status`` filters by (see :data:`StatusFilter`), None for any."""
    if status is None:
        return None
    if isinstance(status, str):
        return [str(status)]
    return [str(s) for s in status]


@dataclass(frozen=True)
class ExecutionSummary:
    """One execution in a listing: what :class:`ExecutionInfo` holds but its steps and data,
    with its step counts. ``inputs`` is None when the listing did not read them."""

    id: str
    pipeline: str
    pipeline_ref: str | None
    status: ExecutionStatus
    inputs: dict[str, Any] | None
    progress: float
    error: str | None
    owner: str | None
    runs: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    steps_done: int
    steps_total: int

    @classmethod
    def of(
        cls, info: ExecutionInfo, steps_done: int, steps_total: int, *, with_inputs: bool
    ) -> ExecutionSummary:
        """The summary of ``info`` (read without its steps)."""
        return cls(
            id=info.id,
            pipeline=info.pipeline,
            pipeline_ref=info.pipeline_ref,
            status=info.status,
            inputs=info.inputs if with_inputs else None,
            progress=info.progress,
            error=info.error,
            owner=info.owner,
            runs=info.runs,
            created_at=info.created_at,
            started_at=info.started_at,
            finished_at=info.finished_at,
            steps_done=steps_done,
            steps_total=steps_total,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; without ``inputs`` when they were not read."""
        out = asdict(self)
        if self.inputs is None:
            del out["inputs"]
        return out


@dataclass(frozen=True)
class EventPage:
    """Stored events, oldest first; ``next`` is the ``after`` that reads the page after this
    one (the last event's id, or the ``after`` asked for when the page is empty)."""

    events: list[Event]
    next: int

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"events": [...], "next": id}``."""
        return {"events": [e.to_dict() for e in self.events], "next": self.next}


@dataclass(frozen=True)
class CancelResult:
    """What :meth:`JobClient.cancel` did, the same in both modes. ``cancelled``: the store
    records the execution cancelled on return (no step of it was running; ``events`` are the
    committed ones). Otherwise its waiting steps will not start and its running steps were
    asked to stop: by this client's engine at once, by another process's engine within its
    heartbeat interval, by workers at their next lease renewal; the store shows ``cancelled``
    once the last of them has ended, so a finished execution has no step running."""

    execution_id: str
    cancelled: bool
    events: list[Event]
