"""Where a live app's events go besides its callbacks: the state store and a Redis Stream.

Both sinks are :class:`~framepipe.sink_queue.QueuedSink` s, with its guarantees: calling one
never blocks nor raises (the event is queued, the oldest dropped past ``max_pending``); one
writer writes in order, in batches; a backend away is retried with backoff and said once, and
once when back; credentials refused at :meth:`~framepipe.sink_queue.QueuedSink.start` are a
:class:`~framepipe.errors.ConfigError`; counts on ``/metrics``; delivery at least once;
:meth:`~framepipe.sink_queue.QueuedSink.aclose` bounded by its ``timeout``.

:class:`StoreEventSink` commits the events to the ``fp_events`` table, where ``/api/events``,
the service's WebSocket and ``framepipe serve``'s dashboard read them; the data gets an ``app``
field, and with ``retention_days`` it deletes the app events older than that every hour (see
:mod:`framepipe.backends.state.retention`). :class:`RedisEventSink` appends each event to a Redis
Stream, for consumers elsewhere (an order-checking service reading ``order.completed``): each
event is one ``XADD`` (approximate ``MAXLEN`` trimming) with the fields ``type``, ``ts``,
``data`` (JSON) and ``event_id``. ``event_id`` is ``<origin>-<seq>``: ``origin`` is random,
made once per sink (so per process run), and ``seq`` counts from 1 the events given to the
sink. A consumer that has seen an ``event_id`` can skip it; a gap in ``seq`` is an event dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any, Self

import sqlalchemy as sa

from framepipe.backends.state import StateStore
from framepipe.backends.state.event_log import append_events
from framepipe.backends.state.retention import prune_events
from framepipe.errors import MissingDependencyError
from framepipe.events import Event
from framepipe.redis.urls import safe_url
from framepipe.sink_queue import QueuedSink, sink_json

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisEventSink", "StoreEventSink"]


class StoreEventSink(QueuedSink):
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

    @property
    def target(self) -> str:
        return self.store.safe_url

    def _shape(self, data: dict[str, Any]) -> dict[str, Any]:
        return sink_json({"app": self.app_name, **data})

    def _refuses(self, exc: Exception) -> bool:

        return isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError)

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


class RedisEventSink(QueuedSink):
    """Appends an app's events to the Redis Stream ``stream`` at ``url`` (see the module
    docstring); ``types`` limits it to those event types (default: all). ``connect_timeout``
    and ``socket_timeout`` (seconds) bound one attempt's connect and each answer awaited, so
    a Redis that is hung fails the attempt (retried) instead of freezing the writer. A broken
    connection (a Redis restarted since the last write) is opened again at once within an
    attempt; a timed-out one is not (the commands may still run: that is retried later)."""

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
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError

            from framepipe.redis.connection import connect
        except ImportError as exc:
            raise MissingDependencyError("redis", "redis", "events on Redis Streams") from exc
        self.url = safe_url(url)
        """The URL with its password masked."""
        self.stream = stream
        self.maxlen = maxlen
        self.types = frozenset(types) if types is not None else None
        self._check_wait = connect_timeout + socket_timeout
        self._client: Redis = connect(
            url,
            retries=None,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
        )

    @property
    def target(self) -> str:
        return f"{self.url} stream {self.stream}"

    async def start(self) -> Self:
        """One PING (bounded by ``connect_timeout`` + ``socket_timeout``): Redis refusing the
        credentials raises :class:`~framepipe.errors.ConfigError` naming the sink and its URL
        (password masked); Redis away or silent is left to the writer."""
        from framepipe.redis.connection import check_credentials

        await check_credentials(self._client, self.url, what=self._named(), within=self._check_wait)
        return self

    def _misconfigured(self, exc: Exception) -> str | None:
        from framepipe.redis.connection import denied, refused_credentials

        return refused_credentials(self.url, exc) if denied(exc) else None

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if self.types is None or event in self.types:
            super().__call__(event, data)

    async def _write(self, batch: list[Event]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for event in batch:
                fields: dict[Any, Any] = {
                    "type": event.type,
                    "ts": repr(event.ts),
                    "data": json.dumps(event.data),
                    "event_id": f"{self._origin}-{event.id}",
                }
                pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
            results = await pipe.execute(raise_on_error=False)
        for done, result in enumerate(results):
            if isinstance(result, Exception):  # a refused XADD (OOM): the ones before it stay
                del batch[:done]
                raise result

    async def _release(self) -> None:
        await self._client.aclose()
