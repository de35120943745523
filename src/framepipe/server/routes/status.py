"""``GET /api/status/{job_id}``: an execution in the shape a hand-written job API answered
its polling frontend with (the ML video team's, beside ``/api/executions/{id}``).

::

    {"jobId": "3fa2...", "status": "processing", "progress": 42, "stage": "inference",
     "error": null, "resultPath": null, "thumbnailPath": null,
     "createdAt": "2026-12-04T18:00:00.000Z", "updatedAt": "...", "executionStatus": "running"}

``status`` is that API's vocabulary: ``queued`` (waiting for its first step to start: pending,
or running with every step still pending or ready, as a job submitted to workers reads until a
worker takes its first step), ``processing`` (running, once a step has started),
``completed``, ``failed`` (failed, and also cancelled or interrupted: ended without a result,
so a frontend that stops polling at ``completed`` or ``failed`` stops; ``executionStatus`` has
framepipe's own status and ``error`` says which). ``progress`` is a whole percentage (100 once
completed); ``stage`` the step running (or waiting to be retried, or the one that failed);
``resultPath`` and ``thumbnailPath`` the object keys of the execution's ``video`` and
``thumbnail`` data, once it completed (``GET /api/objects/{key}`` serves them); ``updatedAt``
when the state store last recorded something of it: its newest stored event (a progress
report, a step started or ended) or, once its events were pruned, the newest time of its
record and its steps.

Registered for every service, whatever its pipelines, so the API's schema stays the same for
every installation; it reads any execution, and only executions whose data name a ``video``
and a ``thumbnail`` have result paths. Behind the same token and browser checks as the rest of
``/api`` (an execution token reads its own execution here, by full id); an unknown id is a
404, one that cannot be an id (a NUL, too long) a 422 (:mod:`framepipe.server.params`).
"""

from datetime import UTC, datetime
from typing import Any

from framepipe.errors import MissingDependencyError
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepStatus
from framepipe.server.access import open_to_execution_tokens, shown_execution
from framepipe.server.params import ExecutionId
from framepipe.server.state import Service

try:
    from fastapi import APIRouter, Request
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["job_status", "router"]

router = APIRouter(tags=["status"])
"""Included under ``/api``."""

_STATUS = {
    ExecutionStatus.PENDING: "queued",
    ExecutionStatus.RUNNING: "processing",
    ExecutionStatus.COMPLETED: "completed",
    ExecutionStatus.FAILED: "failed",
    ExecutionStatus.CANCELLED: "failed",
    ExecutionStatus.INTERRUPTED: "failed",
}


_WAITING = frozenset({StepStatus.PENDING, StepStatus.READY})
"""The statuses of steps that have not started (in this run or before)."""


def _status(info: ExecutionInfo) -> str:
    """``queued`` while nothing of a running execution has started (its steps all pending or
    ready: waiting for the engine or a worker), else the word of :data:`_STATUS`."""
    if info.status is ExecutionStatus.RUNNING and all(s.status in _WAITING for s in info.steps):
        return "queued"
    return _STATUS.get(info.status, "processing")


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stage(info: ExecutionInfo) -> str | None:
    for wanted in (StepStatus.RUNNING, StepStatus.RETRYING, StepStatus.FAILED):
        for step in info.steps:
            if step.status is wanted:
                return step.name
    return None


def _error(info: ExecutionInfo) -> str | None:
    if info.status is ExecutionStatus.CANCELLED:
        return info.error or "cancelled"
    if info.status is ExecutionStatus.INTERRUPTED:
        return info.error or "interrupted (resume it with POST /api/executions/{id}/retry)"
    if info.status is ExecutionStatus.FAILED:
        return info.error or next(iter(info.errors.values()), None)
    return None


def job_status(info: ExecutionInfo, last_event_at: float | None = None) -> dict[str, Any]:
    """``info`` in the status shape described above; ``last_event_at`` is when its newest
    stored event was made (None: none is stored)."""
    done = info.status is ExecutionStatus.COMPLETED
    result = info.data.get("video") if done else None
    thumbnail = info.data.get("thumbnail") if done else None
    times = [t for t in (info.created_at, info.started_at, info.finished_at) if t is not None]
    times += [t for s in info.steps for t in (s.started_at, s.finished_at) if t is not None]
    if last_event_at is not None:
        times.append(last_event_at)
    return {
        "jobId": info.id,
        "status": _status(info),
        "progress": 100 if done else max(0, min(100, int(info.progress))),
        "stage": None if done else _stage(info),
        "error": _error(info),
        "resultPath": result if isinstance(result, str) else None,
        "thumbnailPath": thumbnail if isinstance(thumbnail, str) else None,
        "createdAt": _iso(info.created_at),
        "updatedAt": _iso(max(times)),
        "executionStatus": info.status.value,
    }


@router.get("/status/{job_id}")
@open_to_execution_tokens("path", "job_id")
async def status_show(job_id: ExecutionId, service: Service, request: Request) -> dict[str, Any]:
    """An execution (id or unique prefix) in the job-status shape a polling frontend reads:
    jobId, status (queued, processing, completed, failed), progress (0-100), stage, error,
    resultPath, thumbnailPath, createdAt, updatedAt."""
    info = await service.jobs.get(job_id)
    status = job_status(info, await service.jobs.last_event_at(info.id))
    return shown_execution(request, service, status)
