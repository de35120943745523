"""Following an execution through the store: :func:`follow_stored`.

How :meth:`~framepipe.jobs.engine.JobEngine.wait` waits for an execution it does not run
(run by another process, or by workers). Guarantees: it returns only once the store shows
the execution finished; while the bus has watchers, every stored event of the execution is
published on it once, in id order, and the events that finished it are published before it
returns (the status is read first, then the events, in each poll).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from framepipe.backends.state import StateStore
from framepipe.events import Event, EventBus
from framepipe.jobs.database_thread import InDatabase
from framepipe.jobs.models import ExecutionStatus
from framepipe.jobs.records import execution_status, list_events

__all__ = ["Poll", "follow_stored", "poll_stored"]


def poll_stored(
    store: StateStore, execution_id: str, after: int, with_events: bool
) -> tuple[ExecutionStatus, list[Event]]:
    """The execution's status, then (``with_events``) its stored events with an id above
    ``after``: one poll of :func:`follow_stored`."""
    status = execution_status(store, execution_id)
    return status, (list_events(store, execution_id, after_id=after) if with_events else [])


Poll = Callable[[str, int, bool], tuple[ExecutionStatus, list[Event]]]
"""``(execution_id, after, with_events) -> (status, events)``, as :func:`poll_stored` on a
store."""


async def follow_stored(
    execution_id: str, *, bus: EventBus, in_db: InDatabase, poll: Poll, interval: float
) -> None:
    """Poll the execution every ``interval`` seconds until it is finished, publishing its new
    stored events on ``bus`` (see the module); each poll is one call of ``poll`` through
    ``in_db``."""
    after = 0
    while True:
        status, new = await in_db(poll, execution_id, after, bus.watched)
        if new:
            after = new[-1].id or after
            bus.publish(new)
        if status.finished:
            return
        await asyncio.sleep(interval)
