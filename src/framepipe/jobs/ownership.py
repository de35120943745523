"""An embedded engine's hold on an execution in the store: taking it over, giving it back, and
ending it when the store refuses its changes.

Guarantees:

* :func:`take_over` makes one engine the owner of an execution to resume only if it is still in
  the status it was found in, so two processes resuming it at once cannot both win; it returns
  what it changed, read in the same transaction.
* :func:`give_back` undoes a take-over exactly (every column it changed) while the engine still
  holds the execution, and never drops a cancel request.
* :func:`fail_refused` ends only an execution its owner still runs; what was committed before
  stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, steps
from framepipe.backends.state.event_log import insert_events
from framepipe.events import Event
from framepipe.jobs.models import ExecutionStatus, StepStatus

__all__ = ["TakenOver", "fail_refused", "give_back", "take_over"]


@dataclass(frozen=True, slots=True)
class TakenOver:
    """The columns :func:`take_over` changes in an execution, as they were before it: what
    :func:`give_back` puts back."""

    id: str
    status: str
    owner: str | None
    heartbeat_at: float | None
    cancel_requested: bool
    finished_at: float | None
    error: str | None
    runs: int
    pipeline_ref: str | None


def take_over(
    store: StateStore,
    execution_id: str,
    status: str,
    owner: str,
    now: float,
    ref: str | None = None,
) -> TakenOver | None:
    """Make ``owner`` the engine of an execution to resume, if it is still ``status`` (so two
    processes resuming it at once cannot both win): running again, a new run counted, its
    error and any cancel request cleared; ``ref``, when given, becomes its stored pipeline
    reference. Returns what it changed as it was, read in the same transaction (for
    :func:`give_back`); None if the execution was not ``status`` any more."""
    with store.write() as conn:
        before = conn.execute(
            sa.select(
                executions.c.status,
                executions.c.owner,
                executions.c.heartbeat_at,
                executions.c.cancel_requested,
                executions.c.finished_at,
                executions.c.error,
                executions.c.runs,
                executions.c.pipeline_ref,
            )
            .where(executions.c.id == execution_id, executions.c.status == status)
            .with_for_update()
        ).first()
        if before is None:
            return None
        conn.execute(
            executions.update()
            .where(executions.c.id == execution_id, executions.c.status == status)
            .values(
                status=ExecutionStatus.RUNNING.value,
                owner=owner,
                heartbeat_at=now,
                cancel_requested=False,
                finished_at=None,
                error=None,
                runs=executions.c.runs + 1,
                **({"pipeline_ref": ref} if ref else {}),
            )
        )
        return TakenOver(
            id=execution_id,
            status=before.status,
            owner=before.owner,
            heartbeat_at=before.heartbeat_at,
            cancel_requested=bool(before.cancel_requested),
            finished_at=before.finished_at,
            error=before.error,
            runs=before.runs,
            pipeline_ref=before.pipeline_ref,
        )


def fail_refused(
    store: StateStore, execution_id: str, owner: str, error: str, now: float
) -> list[Event]:
    """End an execution of ``owner`` whose changes the store refused (not a lost connection:
    their data): ``failed`` with ``error``, its ready, retrying and running steps back to
    ``pending`` (as a failed execution leaves them, so a retry runs them), and an
    ``execution.failed`` event; what it had committed before stays. Returns the event (none
    if the execution is not stored as running under ``owner``)."""
    with store.write() as conn:
        ended = conn.execute(
            executions.update()
            .where(
                executions.c.id == execution_id,
                executions.c.owner == owner,
                executions.c.status == ExecutionStatus.RUNNING.value,
            )
            .values(status=ExecutionStatus.FAILED.value, error=error, finished_at=now)
        ).rowcount
        if not ended:
            return []
        conn.execute(
            steps.update()
            .where(
                steps.c.execution_id == execution_id,
                steps.c.status.in_(
                    [
                        StepStatus.READY.value,
                        StepStatus.RETRYING.value,
                        StepStatus.RUNNING.value,
                    ]
                ),
            )
            .values(status=StepStatus.PENDING.value, next_attempt_at=None)
        )
        return insert_events(
            store,
            conn,
            [Event("execution.failed", now, execution_id, None, {"error": error})],
        )


def give_back(store: StateStore, taken: TakenOver, owner: str) -> bool:
    """Undo :func:`take_over` for an execution that ``owner`` took over but could not adopt:
    every column it changed (status, owner, heartbeat, cancel request, error, end time, run
    count, pipeline reference) as ``taken`` has it, so the execution is as it was before the
    take-over. A cancel request is never dropped: one pending before the take-over is pending
    again, and one made while ``owner`` held it (flagged for this engine) stays. Only while
    ``owner`` still holds it running; True if it was given back."""
    values: dict[str, Any] = {
        "status": taken.status,
        "owner": taken.owner,
        "heartbeat_at": taken.heartbeat_at,
        "finished_at": taken.finished_at,
        "error": taken.error,
        "runs": taken.runs,
        "pipeline_ref": taken.pipeline_ref,
    }
    if taken.cancel_requested:
        values["cancel_requested"] = True
    with store.write() as conn:
        return bool(
            conn.execute(
                executions.update()
                .where(
                    executions.c.id == taken.id,
                    executions.c.owner == owner,
                    executions.c.status == ExecutionStatus.RUNNING.value,
                )
                .values(**values)
            ).rowcount
        )
