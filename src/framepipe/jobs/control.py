"""Control of executions through the store, from any process (the CLI, the service)."""

from __future__ import annotations

import time

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, steps
from framepipe.errors import ExecutionStateError
from framepipe.events import Event
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.records import find_execution

__all__ = ["request_cancel"]


def request_cancel(store: StateStore, execution_id: str) -> list[Event]:
    """Cancel an execution by id (or unique prefix).

    A running execution is flagged; its engine sees the flag within its heartbeat interval and
    stops it. One that is not running (pending, failed, interrupted) is cancelled at once: its
    unfinished steps become ``cancelled``. Completed or already cancelled: ExecutionStateError."""
    execution_id = find_execution(store, execution_id)
    now = time.time()
    with store.write() as conn:
        row = conn.execute(sa.select(executions.c.status, executions.c.pipeline)
                           .where(executions.c.id == execution_id)).one()
        status = ExecutionStatus(row.status)
        if status in (ExecutionStatus.COMPLETED, ExecutionStatus.CANCELLED):
            raise ExecutionStateError(f"execution {execution_id[:12]} of pipeline "
                                      f"'{row.pipeline}' is already {status.value}",
                                      execution_id=execution_id)
        if status is ExecutionStatus.RUNNING:
            conn.execute(executions.update().where(executions.c.id == execution_id)
                         .values(cancel_requested=True))
            return []
        conn.execute(steps.update().where(
            steps.c.execution_id == execution_id,
            steps.c.status.notin_([StepStatus.COMPLETED.value, StepStatus.FAILED.value]))
            .values(status=StepStatus.CANCELLED.value))
        conn.execute(executions.update().where(executions.c.id == execution_id)
                     .values(status=ExecutionStatus.CANCELLED.value, finished_at=now,
                             error="cancelled by request"))
    from framepipe.jobs.records import Batch, write_batch

    return write_batch(store, Batch(events=[Event("execution.cancelled", now, execution_id, None,
                                                  {"error": "cancelled by request"})]))
