"""Where a live app's events go besides its callbacks: the state store and a Redis Stream.

Both sinks are :meth:`App.on <framepipe.app.App.on>` callbacks (``app.on("*", sink)``).
Guarantees:

* Calling a sink never blocks and never raises: the event is queued (bounded: past
  ``max_pending`` the oldest queued event is dropped and counted in ``dropped``). Called
  outside a running event loop, the event waits in the queue for the writer, which starts with
  the next event emitted inside the loop (or with :meth:`aclose`).
* One writer task per sink writes the queued events in the order they were emitted, in batches
  (one transaction, one pipeline round trip).
* A backend that is away (database restarting, Redis down or hung) costs a warning per failed
  batch, never the app: the batch is retried with backoff while newer events queue behind it,
  and it is dropped (counted) after ``retries`` failed attempts. A Redis that accepts the
  connection and never answers fails an attempt after ``socket_timeout`` seconds (10 s).
* An event type no backend can store (a lone surrogate, a NUL) is written with
  :func:`~framepipe.untrusted.storable_text`'s escapes, so it never fails the batch of
  good events it is written with.
* :meth:`aclose` writes what is queued (bounded by ``timeout``) and releases the connection;
  what could not be written by then, the batch in flight included, is counted in ``dropped``.

:class:`StoreEventSink` commits the events to the ``fp_events`` table, where ``/api/events``,
the service's WebSocket and ``framepipe serve``'s dashboard read them; the data gets an ``app``
field, and with ``retention_days`` it deletes the app events older than that every hour (see
:mod:`framepipe.backends.state.retention`). :class:`RedisEventSink` appends each event to a
Redis Stream (``XADD`` with approximate ``MAXLEN`` trimming) as fields ``type``, ``ts`` and
``data`` (JSON), for consumers elsewhere, e.g. an order-checking service reading
``order.completed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from framepipe.backends.state import StateStore
from framepipe.backends.state.event_log import append_events
from framepipe.backends.state.retention import prune_events
from framepipe.backoff import Backoff
from framepipe.errors import MissingDependencyError
from framepipe.events import Event
from framepipe.logs import get_logger

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisEventSink", "StoreEventSink"]


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(json.dumps(data, default=str))
    return result


def _storable_type(event: str) -> str:
    if event.isascii() and "\x00" not in event:
        return event
    from framepipe.untrusted import storable_text

    return storable_text(event)


class _QueuedSink:
    """The queue, the ordered batching writer and the retry policy; subclasses write."""

    kind = "events"

    def __init__(
        self,
        *,
        max_pending: int = 10_000,
        batch: int = 256,
        retries: int = 5,
        backoff: Backoff | None = None,
    ) -> None:
        if max_pending < 1 or batch < 1 or retries < 1:
            raise ValueError("max_pending, batch and retries must be >= 1")
        self.max_pending = max_pending
        self.batch = batch
        self.retries = retries
        self.backoff = backoff or Backoff(0.5, 2.0, 10.0, 0.1)
        self.dropped = 0
        self.written = 0
        self._pending: deque[Event] = deque()
        self._inflight: list[Event] = []
        """The batch the writer is writing (and retrying): off the queue, not yet counted."""
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._log = get_logger(f"events.{self.kind}")

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        """Queue one event (an ``App.on`` callback); never blocks, never raises."""
        if self._closed:
            self.dropped += 1
            return
        try:
            shaped = Event(_storable_type(event), time.time(), None, None, self._shape(data))
        except Exception:  # data that does not serialize (a reference cycle): never the app's
            self.dropped += 1
            self._log.exception("event %s not queued", event)
            return
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(shaped)
        with contextlib.suppress(RuntimeError):  # outside a running loop: it waits in the queue
            self._ensure_writer()

    def _ensure_writer(self) -> None:
        """Start the writer if it is not running and wake it; ``RuntimeError`` outside a
        running event loop."""
        if self._writer is None:
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._writer = loop.create_task(self._write_loop(), name=f"event-sink-{self.kind}")
        assert self._wake is not None
        self._wake.set()

    def _shape(self, data: dict[str, Any]) -> dict[str, Any]:
        return _jsonable(data)

    async def _write_loop(self) -> None:
        assert self._wake is not None
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Taken off the queue before writing: an overflow while the batch is in flight
            # drops the oldest queued events, never events of the batch. The batch stays on
            # the sink (_inflight) until counted, so aclose counts it if it cancels the writer.
            batch = [self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))]
            self._inflight = batch
            if await self._write_with_retries(batch):
                self.written += len(batch)
            else:
                self.dropped += len(batch)
            self._inflight = []

    async def _write_with_retries(self, batch: list[Event]) -> bool:
        for attempt in range(1, self.retries + 1):
            try:
                await self._write(batch)
                return True
            except Exception as exc:
                if attempt == self.retries:
                    self._log.warning(
                        "%d event(s) not written after %d attempt(s): %s", len(batch), attempt, exc
                    )
                    return False
                delay = self.backoff.delay(attempt)
                self._log.warning(
                    "writing %d event(s) failed (%s); retrying in %.1fs", len(batch), exc, delay
                )
                await asyncio.sleep(delay)
        return False

    async def _write(self, batch: list[Event]) -> None:
        raise NotImplementedError

    async def aclose(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Write what is queued (bounded by ``timeout``), stop the writer, release the backend.
        What is not written by then (queued, or the batch being written) is counted in
        ``dropped``."""
        self._closed = True
        if self._pending:
            self._ensure_writer()  # events queued outside a loop had no writer yet
        writer = self._writer
        if writer is not None:
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout)
            except TimeoutError:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                lost = len(self._inflight) + len(self._pending)
                self.dropped += lost
                self._log.warning("%d event(s) not written before close", lost)
            self._inflight = []
            self._pending.clear()
        await self._release()

    async def _release(self) -> None:
        """Release the backend connection (subclasses)."""


class StoreEventSink(_QueuedSink):
    """Commits an app's events to the state store's event table (see the module docstring).
    ``app_name`` is added to each event's data as ``app``."""

    kind = "store"

    def __init__(
        self,
        store: StateStore,
        app_name: str,
        *,
        retention_days: float | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.store = store
        self.app_name = app_name
        self.retention_days = retention_days
        self._pruned_at = float("-inf")

    def _shape(self, data: dict[str, Any]) -> dict[str, Any]:
        return _jsonable({"app": self.app_name, **data})

    async def _write(self, batch: list[Event]) -> None:
        await asyncio.to_thread(append_events, self.store, batch)
        if self.retention_days is not None and time.monotonic() - self._pruned_at > 3600:
            self._pruned_at = time.monotonic()
            try:
                deleted = await asyncio.to_thread(
                    prune_events, self.store, self.retention_days * 86400
                )
            except Exception as exc:  # retention is housekeeping: the events go on
                self._log.warning(
                    "pruning events older than %g days failed: %s", self.retention_days, exc
                )
            else:
                if deleted:
                    self._log.info(
                        "pruned %d event(s) older than %g days", deleted, self.retention_days
                    )


class RedisEventSink(_QueuedSink):
    """Appends an app's events to the Redis Stream ``stream`` at ``url`` (see the module
    docstring); ``types`` limits it to those event types (default: all). ``connect_timeout``
    and ``socket_timeout`` (seconds) bound one attempt's connect and each answer awaited, so
    a Redis that is hung fails the attempt (a warning, a retry) instead of freezing the writer."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        maxlen: int = 100_000,
        types: set[str] | frozenset[str] | None = None,
        connect_timeout: float = 5.0,
        socket_timeout: float = 10.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not connect_timeout > 0 or not socket_timeout > 0:
            raise ValueError("connect_timeout and socket_timeout must be > 0")
        try:
            from framepipe.redis.connection import connect
        except ImportError as exc:
            raise MissingDependencyError("redis", "redis", "events on Redis Streams") from exc
        self.stream = stream
        self.maxlen = maxlen
        self.types = frozenset(types) if types is not None else None
        self._client: Redis = connect(
            url, retries=None, connect_timeout=connect_timeout, socket_timeout=socket_timeout
        )

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if self.types is None or event in self.types:
            super().__call__(event, data)

    async def _write(self, batch: list[Event]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for event in batch:
                pipe.xadd(
                    self.stream,
                    {"type": event.type, "ts": repr(event.ts), "data": json.dumps(event.data)},
                    maxlen=self.maxlen,
                    approximate=True,
                )
            await pipe.execute()

    async def _release(self) -> None:
        await self._client.aclose()
