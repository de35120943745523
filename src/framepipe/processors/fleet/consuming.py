"""The frames of one processor: read from its stream within its free capacity, each handled in
a task of its own, and the entries pending in its stream that it does not hold taken back.

* At most ``capacity`` frames are handled at any moment: ``XREADGROUP`` asks for no more than
  the free capacity, and a full processor reads nothing until a frame finishes.
* Entries pending in the stream that it does not hold (an earlier life's, or those the
  registry took while it was declared dead) are queued with their delivery counts
  (:meth:`Consumer.recover`) and claimed as capacity frees up, before anything new is read.
  Each taking back is a delivery: an entry delivered ``max_attempts`` times already
  (:class:`~framepipe.processors.fleet.frame_entries.Attempts`) is given up instead of run again.
* An entry read or taken back past its deadline (its sender stopped waiting for it:
  :mod:`~framepipe.processors.fleet.deadlines`) is acknowledged and deleted unrun, before
  anything else is done with it.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from framepipe.logs import ComponentLogger
from framepipe.processors.fleet.deadlines import Expiry, RedisClock
from framepipe.processors.fleet.field_values import text
from framepipe.processors.fleet.frame_entries import Attempts
from framepipe.processors.fleet.keys import GROUP
from framepipe.processors.fleet.registry import pending_deliveries
from framepipe.redis.connection import ResponseError
from framepipe.redis.streams import Fields, stream_entries
from framepipe.redis.wire import Wire

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Consumer"]


class Consumer:
    """The consumer ``processor_id`` of ``stream``: ``handle(mid, fields)`` handles one entry
    and ``give_up(mid, fields, attempts)`` answers one whose attempts are exhausted, each in
    a task of its own (:attr:`inflight`); entries past their deadline on ``clock`` (Redis's
    clock as last learned) are skipped (:attr:`expiry`)."""

    def __init__(
        self,
        processor_id: str,
        stream: str,
        log: ComponentLogger,
        handle: Callable[[bytes, Fields], Coroutine[Any, Any, None]],
        give_up: Callable[[bytes, Fields, Attempts], Coroutine[Any, Any, None]],
        clock: RedisClock,
    ) -> None:
        self.processor_id = processor_id
        self.stream = stream
        self.log = log
        self.handle = handle
        self.give_up = give_up
        self.inflight: dict[bytes, asyncio.Task[None]] = {}
        """Entry id -> the task handling it."""
        self.max_in_flight = 0
        """The most entries that were handled at once."""
        self.expiry = Expiry(stream, clock, log)
        """The entries skipped past their deadline (``expiry.count``)."""
        self._slot: asyncio.Future[None] | None = None
        self._backlog: dict[bytes, int] = {}  # pending entries to take back -> times delivered
        self._recover_wanted = False  # a heartbeat found entries held by another consumer

    def reset(self) -> None:
        """Forget the entries queued to be taken back (a new start finds them again)."""
        self._backlog = {}
        self._recover_wanted = False

    def wake(self) -> None:
        """Wake the consumer waiting for a free slot (a frame finished, or stopping)."""
        slot = self._slot
        if slot is not None and not slot.done():
            slot.set_result(None)

    def free(self, mid: bytes) -> None:
        """Entry ``mid``'s result is out: its slot is free now (called by its task, not a
        loop turn later in the task's done callback)."""
        if self.inflight.get(mid) is asyncio.current_task():
            del self.inflight[mid]
            self.wake()

    async def held_elsewhere(self, redis: Redis) -> bool:
        """Whether a consumer other than this processor (the registry's reaper) holds
        entries pending in its stream."""
        try:
            summary = await redis.xpending(self.stream, GROUP)
        except ResponseError:  # no stream or group: the next heartbeat registers again
            return False
        return any(
            text(c.get("name")) != self.processor_id and int(c.get("pending") or 0) > 0
            for c in summary.get("consumers") or ()
        )

    def want_recovery(self) -> None:
        """Have the consumer take back the pending entries it does not hold."""
        self._recover_wanted = True
        self.wake()

    async def recover(self, redis: Redis) -> None:
        """Queue every entry pending in the stream that is neither being handled here nor
        queued already (this processor's earlier life, entries the registry took while it was
        declared dead) with its delivery count; :meth:`take_back` claims them as capacity
        frees up."""
        held = set(self.inflight) | set(self._backlog)
        found = 0
        for mid, delivered in (await pending_deliveries(redis, self.stream)).items():
            if mid not in held:
                self._backlog[mid] = delivered
                found += 1
        if found:
            self.log.info("Taking back %d pending frame(s)", found)

    async def take_back(self, redis: Redis, count: int) -> None:
        """Claim the first ``count`` queued entries and run them; an entry that was delivered
        ``max_attempts`` times already gets its error result instead, one past its deadline
        is skipped (see the module docstring). Entries finished or re-routed meanwhile are no
        longer pending: left."""
        ids = list(itertools.islice(self._backlog, count))
        delivered = {mid: self._backlog.pop(mid) for mid in ids}
        claimed = cast(
            "list[tuple[bytes | None, Fields | None]]",
            await redis.xclaim(self.stream, GROUP, self.processor_id, 0, list[Any](ids)),
        )
        entries = [(mid, fields) for mid, fields in claimed or () if mid is not None and fields]
        fresh, stale = self.expiry.split(entries)
        await self.expiry.skip(redis, stale)
        for mid, fields in fresh:
            if fields is None:
                continue
            attempts = Attempts.of(fields, delivered.get(mid, 0))
            if attempts.exhausted:
                self.spawn(mid, fields, attempts)
            else:
                self.spawn(mid, fields)

    async def consume(
        self,
        redis: Redis,
        reads: Wire,
        *,
        capacity: int,
        poll_interval: float,
        stopping: Callable[[], bool],
    ) -> None:
        """Take back, then read, entries as capacity frees up, until ``stopping()``; each
        read blocks at most ``poll_interval`` seconds on ``reads``."""
        loop = asyncio.get_running_loop()
        self._recover_wanted = True
        block_ms = max(1, int(poll_interval * 1000))
        while not stopping():
            if self._recover_wanted:
                self._recover_wanted = False
                await self.recover(redis)
            free = capacity - len(self.inflight)
            if free <= 0:  # wait for a frame to finish (or stop())
                self._slot = loop.create_future()
                try:
                    await self._slot
                finally:
                    self._slot = None
                continue
            if self._backlog:
                await self.take_back(redis, free)
                continue
            # stop() marks the processor draining at once; the read ends within poll_interval
            reply = await reads.execute(
                "XREADGROUP",
                "GROUP",
                GROUP,
                self.processor_id,
                "COUNT",
                free,
                "BLOCK",
                block_ms,
                "STREAMS",
                self.stream,
                ">",
                block=poll_interval,
            )
            if reply:
                fresh, stale = self.expiry.split(stream_entries(reply))
                await self.expiry.skip(redis, stale)
                for mid, entry in fresh:
                    self.spawn(mid, entry)

    def spawn(self, mid: bytes, fields: Fields | None, exhausted: Attempts | None = None) -> None:
        """Handle the entry in a task of its own (or give it up, when its attempts are
        ``exhausted``)."""
        if fields is None:  # deleted while pending
            return
        job = (
            self.handle(mid, fields) if exhausted is None else self.give_up(mid, fields, exhausted)
        )
        task = asyncio.create_task(job, name=f"{self.processor_id}:{mid!r}")
        self.inflight[mid] = task
        self.max_in_flight = max(self.max_in_flight, len(self.inflight))
        task.add_done_callback(functools.partial(self._finished, mid))

    def _finished(self, mid: bytes, task: asyncio.Task[None]) -> None:
        if self.inflight.get(mid) is task:
            del self.inflight[mid]
        self.wake()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.error(
                "handling entry %s failed unexpectedly: %s: %s",
                mid.decode(),
                type(exc).__name__,
                exc,
                exc_info=exc,
            )
