"""Live events for the service: the stored events, tailed and fanned out to subscribers.

Every event is committed to the state store before anyone may see it, by an embedded engine in
this process, by workers or by another process; so the service follows the store rather than an
in-process bus, and sees all of them alike. Ids are read only once every lower id is settled
(:func:`~framepipe.backends.state.event_log.insert_events` makes sure of it on PostgreSQL), so
reading the ids above the last one read misses none. A subscriber gets each event once, in id
order; one that falls behind (its queue of ``maxsize`` is full) is dropped with a ``lagged``
marker, so a slow browser cannot hold events in memory without bound. While the database does
not answer the feed retries (0.5 s up to 5 s apart) and says so in one warning, then in one
line when it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from framepipe.backends.state import StateStore
from framepipe.backoff import Backoff
from framepipe.events import Event
from framepipe.jobs.records import list_events, newest_event_id
from framepipe.logs import get_logger
from framepipe.outage import Outage

__all__ = ["EventFeed"]

_log = get_logger("server.feed")
_RETRY = Backoff(0.5, 2.0, 5.0)
_LAGGED = object()


class _Subscriber:
    def __init__(self, execution_id: str | None, maxsize: int) -> None:
        self.execution_id = execution_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self.lagged = False


class EventFeed:
    """Tails ``fp_events`` every ``interval`` seconds from the id it was started at."""

    def __init__(self, store: StateStore, *, interval: float = 0.1, maxsize: int = 1000) -> None:
        self.store = store
        self.interval = interval
        self.maxsize = maxsize
        self.last_id = 0
        self._subscribers: set[_Subscriber] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start tailing after the newest stored event."""
        self.last_id = await asyncio.to_thread(newest_event_id, self.store)
        self._task = asyncio.create_task(self._tail(), name="framepipe-event-feed")

    async def stop(self) -> None:
        """Stop tailing; subscribers get the end of their stream."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)

    async def _tail(self) -> None:
        outage = Outage()
        while True:
            try:
                batch = await asyncio.to_thread(
                    list_events, self.store, None, after_id=self.last_id, limit=1000
                )
            except Exception as exc:  # the database restarting: keep trying
                if outage.failed(exc):
                    _log.warning(
                        "event feed: the state database does not answer (%s); retrying until "
                        "it does, no events reach the browsers meanwhile",
                        outage.last_error,
                    )
                await asyncio.sleep(_RETRY.delay(outage.attempts))
                continue
            lasted = outage.answered()
            if lasted is not None:
                _log.info("event feed: the state database answers again after %.0fs", lasted)
            if batch:
                self.last_id = batch[-1].id or self.last_id
                self._fan_out(batch)
            else:
                await self._follow_ids_given_again()
            if len(batch) < 1000:
                await asyncio.sleep(self.interval)

    async def _follow_ids_given_again(self) -> None:
        """Nothing new: a backstop for ids given again below ``last_id`` (a database restored
        from a backup or recreated while the service runs; a SQLite table from before
        migration 0006, whose newest events a prune deleted). When the newest stored id is
        below ``last_id`` the feed goes on from it, so the events committed from then on are
        sent; those committed between the ids going back and this check (one poll) cannot be
        told from the old ones. Newer events deleted while the ids still rise cost nothing:
        no stored event lies between the two ids."""
        try:
            newest = await asyncio.to_thread(newest_event_id, self.store)
        except Exception:  # the next read says what is wrong
            return
        if newest >= self.last_id:
            return
        _log.warning(
            "event feed: the newest stored event id (%d) is below the last one read (%d): "
            "newer events were deleted, or the database was replaced; following from %d",
            newest,
            self.last_id,
            newest,
        )
        self.last_id = newest

    def _fan_out(self, batch: list[Event]) -> None:
        for sub in list(self._subscribers):
            if sub.lagged:
                continue
            for event in batch:
                if sub.execution_id is not None and event.execution_id != sub.execution_id:
                    continue
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.lagged = True
                    sub.queue = asyncio.Queue(1)
                    sub.queue.put_nowait(_LAGGED)
                    break

    @contextlib.asynccontextmanager
    async def subscribe(
        self, execution_id: str | None = None
    ) -> AsyncIterator[AsyncIterator[Event | None]]:
        """Events from now on (of one execution, or all); ``None`` marks a subscriber that fell
        behind and was cut off (reconnect and read the current state)."""
        sub = _Subscriber(execution_id, self.maxsize)
        self._subscribers.add(sub)

        async def stream() -> AsyncIterator[Event | None]:
            while True:
                item = await sub.queue.get()
                if item is None:
                    return
                if item is _LAGGED:
                    yield None
                    return
                yield item

        try:
            yield stream()
        finally:
            self._subscribers.discard(sub)
