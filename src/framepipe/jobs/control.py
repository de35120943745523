"""Control of executions through the store, from any process (the job client, the engine)."""

from __future__ import annotations

import time

from framepipe.backends.state import StateStore
from framepipe.events import Event
from framepipe.jobs.cancel_requests import cancel_or_flag
from framepipe.jobs.dispatch import cancel as dispatch_cancel
from framepipe.jobs.execution_row import MODE
from framepipe.jobs.records import find_execution

__all__ = ["request_cancel"]


def request_cancel(store: StateStore, execution_id: str) -> list[Event]:
    """Cancel an execution by id (or unique prefix); return the committed events.

    A running execution of an embedded engine is flagged; its engine sees the flag within its
    heartbeat interval and stops it (returns no events). A running distributed execution is
    cancelled at once in the store; its workers stop its running steps at their next
    heartbeat. One that is not running (pending, failed, interrupted) is cancelled at once: its
    unfinished steps become ``cancelled``. Completed or already cancelled: ExecutionStateError."""
    execution_id = find_execution(store, execution_id)
    how, events = cancel_or_flag(store, execution_id, workers_mode=MODE, now=time.time())
    if how == "workers":
        return dispatch_cancel(store, execution_id)
    return events
