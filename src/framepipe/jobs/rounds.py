"""What a worker and the state store exchange: a ready step to deliver, an attempt a worker
claimed, and the round of progress reports, spawned steps and outcomes a worker commits in one
transaction (:func:`framepipe.jobs.dispatch.commit_round`), with what that commit produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from framepipe.events import Event
from framepipe.jobs.outcomes import NO_RETRY, RetryPolicy
from framepipe.jobs.rules import StepPlan

__all__ = ["Claimed", "Delivery", "Outcome", "ProgressUpdate", "Round", "RoundResult", "Spawn"]


@dataclass(frozen=True, slots=True, order=True)
class Delivery:
    """A ready step to hand to the broker."""

    execution_id: str
    key: str


@dataclass(slots=True)
class Claimed:
    """A step this worker now runs, as attempt ``attempt``."""

    execution_id: str
    key: str
    name: str
    params: dict[str, Any]
    attempt: int
    weight: float
    progress: float
    pipeline: str
    pipeline_ref: str | None
    inputs: dict[str, Any]
    input_roots: list[str] | None  # the execution's recorded roots (None: unrestricted)
    ready_at: float | None
    started_at: float
    traceparent: str | None = None  # the execution's submit span (OpenTelemetry), if traced


@dataclass(slots=True)
class ProgressUpdate:
    """A running attempt's progress; ``before`` is the value last committed for it."""

    execution_id: str
    key: str
    attempt: int
    weight: float
    before: float
    pct: float
    message: str | None


@dataclass(slots=True)
class Outcome:
    """How an attempt ended.

    ``done``: completed with ``output``; ``failed``: raised (``error``; retried as ``policy``
    allows unless ``permanent``: :func:`~framepipe.jobs.rules.after_failure`); ``cancelled``:
    stopped because its execution
    was cancelled; ``handback``: the worker gives the step back (stopping, or it had claimed
    more long steps than it can start), not counted as a failure; one that never ``ran`` does
    not count as an attempt either."""

    execution_id: str
    key: str
    attempt: int
    kind: Literal["done", "failed", "cancelled", "handback"]
    weight: float
    before: float
    output: dict[str, Any] | None = None
    ledger: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    permanent: bool = False
    policy: RetryPolicy = NO_RETRY
    ran: bool = True


@dataclass(slots=True)
class Spawn:
    """A step spawned by a running attempt."""

    execution_id: str
    spawner: str
    attempt: int
    spec: StepPlan


@dataclass(slots=True)
class Round:
    """What a worker commits in one transaction."""

    outcomes: list[Outcome] = field(default_factory=list)
    progress: list[ProgressUpdate] = field(default_factory=list)
    spawns: list[Spawn] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.progress or self.spawns)


@dataclass(slots=True)
class RoundResult:
    """What a commit produced: steps to publish, retry times, fenced writes, events."""

    ready: list[Delivery] = field(default_factory=list)
    claimed: list[Claimed] = field(default_factory=list)
    retry_at: list[tuple[float, Delivery]] = field(default_factory=list)
    fenced: list[tuple[str, str, int]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
