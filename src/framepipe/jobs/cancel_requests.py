"""Cancelling an execution as far as the store alone can, and the cancel requests it leaves for
the engine that runs one.

Guarantees:

* :func:`cancel_or_flag` decides in one transaction: a completed or cancelled execution is
  refused, one running in an embedded engine is flagged for that engine, one running on
  workers is left to the workers' transaction, anything else is cancelled at once with its
  unfinished steps and its ``execution.cancelled`` event.
* A flag stays until an engine takes the execution over
  (:func:`~framepipe.jobs.ownership.take_over`): an engine's routine writes never clear it
  (:mod:`framepipe.jobs.batches`), so the engine running the execution sees it
  (:func:`cancel_requested`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, steps
from framepipe.backends.state.event_log import insert_events
from framepipe.errors import ExecutionNotFoundError, ExecutionStateError
from framepipe.events import Event
from framepipe.jobs.models import ExecutionStatus, StepStatus

__all__ = ["CancelHow", "cancel_or_flag", "cancel_requested"]

CancelHow = Literal["flagged", "cancelled", "workers"]


def cancel_or_flag(
    store: StateStore, execution_id: str, *, workers_mode: str, now: float
) -> tuple[CancelHow, list[Event]]:
    """Cancel the execution with the full id ``execution_id`` as far as the store alone can.

    In one transaction: completed or already cancelled is :class:`ExecutionStateError`;
    running in an embedded engine sets ``cancel_requested`` for that engine to act on
    (``"flagged"``, no events); running on workers (its ``mode`` is ``workers_mode``) changes
    nothing and answers ``"workers"``, for the caller to cancel it with the workers'
    transaction; anything else (pending, failed, interrupted) is cancelled at once, its
    unfinished steps ``cancelled`` and ``execution.cancelled`` committed with it
    (``"cancelled"`` and that event, with its id)."""
    with store.write() as conn:
        row = conn.execute(
            sa.select(executions.c.status, executions.c.pipeline, executions.c.mode).where(
                executions.c.id == execution_id
            )
        ).first()
        if row is None:
            raise ExecutionNotFoundError(
                f"no execution {execution_id!r}", execution_id=execution_id
            )
        status = ExecutionStatus(row.status)
        if status in (ExecutionStatus.COMPLETED, ExecutionStatus.CANCELLED):
            raise ExecutionStateError(
                f"execution {execution_id[:12]} of pipeline "
                f"'{row.pipeline}' is already {status.value}",
                execution_id=execution_id,
            )
        if status is ExecutionStatus.RUNNING:
            if row.mode == workers_mode:
                return "workers", []
            conn.execute(
                executions.update()
                .where(executions.c.id == execution_id)
                .values(cancel_requested=True)
            )
            return "flagged", []
        conn.execute(
            steps.update()
            .where(
                steps.c.execution_id == execution_id,
                steps.c.status.notin_([StepStatus.COMPLETED.value, StepStatus.FAILED.value]),
            )
            .values(status=StepStatus.CANCELLED.value)
        )
        conn.execute(
            executions.update()
            .where(executions.c.id == execution_id)
            .values(
                status=ExecutionStatus.CANCELLED.value,
                finished_at=now,
                error="cancelled by request",
            )
        )
        return "cancelled", insert_events(
            store,
            conn,
            [
                Event(
                    "execution.cancelled",
                    now,
                    execution_id,
                    None,
                    {"error": "cancelled by request"},
                )
            ],
        )


def cancel_requested(store: StateStore, ids: Sequence[str]) -> list[str]:
    """Those of ``ids`` whose cancel another process requested (:func:`cancel_or_flag`)."""
    with store.read() as conn:
        return list(
            conn.execute(
                sa.select(executions.c.id).where(
                    executions.c.id.in_(ids), executions.c.cancel_requested.is_(True)
                )
            ).scalars()
        )
