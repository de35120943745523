"""Control of executions through the store, from any process (the CLI, the service)."""

from __future__ import annotations

import time

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, steps
from framepipe.errors import ExecutionStateError
from framepipe.events import Event
from framepipe.jobs.dispatch import MODE
from framepipe.jobs.dispatch import cancel as dispatch_cancel
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.records import Batch, find_execution, write_batch

__all__ = ["request_cancel"]


def request_cancel(store: StateStore, execution_id: str) -> list[Event]:
    """Cancel an execution by id (or unique prefix).

    A running execution of an embedded engine is flagged; its engine sees the flag within its
    heartbeat interval and stops it (returns no events). A running distributed execution is
    cancelled at once in the store; its workers stop its running steps at their next
    heartbeat. One that is not running (pending, failed, interrupted) is cancelled at once: its
    unfinished steps become ``cancelled``. Completed or already cancelled: ExecutionStateError."""
    execution_id = find_execution(store, execution_id)
    now = time.time()
    with store.write() as conn:
        row = conn.execute(sa.select(executions.c.status, executions.c.pipeline,
                                     executions.c.mode)
                           .where(executions.c.id == execution_id)).one()
        status = ExecutionStatus(row.status)
        if status in (ExecutionStatus.COMPLETED, ExecutionStatus.CANCELLED):
            raise ExecutionStateError(f"execution {execution_id[:12]} of pipeline "
                                      f"'{row.pipeline}' is already {status.value}",
                                      execution_id=execution_id)
        distributed_running = status is ExecutionStatus.RUNNING and row.mode == MODE
        if status is ExecutionStatus.RUNNING and not distributed_running:
            conn.execute(executions.update().where(executions.c.id == execution_id)
                         .values(cancel_requested=True))
            return []
        if not distributed_running:
            conn.execute(steps.update().where(
                steps.c.execution_id == execution_id,
                steps.c.status.notin_([StepStatus.COMPLETED.value, StepStatus.FAILED.value]))
                .values(status=StepStatus.CANCELLED.value))
            conn.execute(executions.update().where(executions.c.id == execution_id)
                         .values(status=ExecutionStatus.CANCELLED.value, finished_at=now,
                                 error="cancelled by request"))
    if distributed_running:
        return dispatch_cancel(store, execution_id)
    return write_batch(store, Batch(events=[Event("execution.cancelled", now, execution_id, None,
                                                  {"error": "cancelled by request"})]))
