"""Read models of executions and steps, as the store holds them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["ExecutionInfo", "ExecutionStatus", "StepInfo", "StepStatus"]


class ExecutionStatus(StrEnum):
    """Life of an execution. ``failed``, ``cancelled`` and ``interrupted`` can be retried."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        """True once nothing runs any more (completed or stopped)."""
        return self is not ExecutionStatus.PENDING and self is not ExecutionStatus.RUNNING

    @property
    def retryable(self) -> bool:
        """True when :meth:`JobEngine.retry` may resume the execution."""
        return self in (
            ExecutionStatus.FAILED,
            ExecutionStatus.CANCELLED,
            ExecutionStatus.INTERRUPTED,
        )


class StepStatus(StrEnum):
    """Life of a step: pending (waiting for dependencies) -> ready -> running -> completed,
    or -> retrying -> ready ..., or -> failed; ``cancelled`` when its execution was."""

    PENDING = "pending"
    READY = "ready"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class StepInfo:
    """One step of an execution as stored."""

    key: str
    name: str
    status: StepStatus
    params: dict[str, Any]
    depends_on: list[str]
    weight: float
    progress: float
    message: str | None
    attempt: int
    failures: int
    crashes: int
    output: dict[str, Any] | None
    error: str | None
    spawned_by: str | None
    created_at: float
    ready_at: float | None
    started_at: float | None
    finished_at: float | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class ExecutionInfo:
    """One execution as stored, with its steps and merged ``data``."""

    id: str
    pipeline: str
    pipeline_ref: str | None
    status: ExecutionStatus
    inputs: dict[str, Any]
    progress: float
    error: str | None
    owner: str | None
    runs: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    data: dict[str, Any] = field(default_factory=dict)
    steps: list[StepInfo] = field(default_factory=list)

    @property
    def errors(self) -> dict[str, str]:
        """Error text of each step that failed, by step key."""
        return {
            s.key: s.error
            for s in self.steps
            if s.status is StepStatus.FAILED and s.error is not None
        }

    def step(self, key: str) -> StepInfo:
        """The step with ``key``; KeyError if there is none."""
        for s in self.steps:
            if s.key == key:
                return s
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, steps included."""
        return asdict(self)
