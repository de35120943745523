"""A live app's events appended to a Redis Stream, for consumers elsewhere (an order-checking
service reading ``order.completed``).

:class:`RedisEventSink` is one of :mod:`framepipe.event_sinks`' sinks, with their guarantees
(a call never blocks nor raises; one writer, in order, in batches; an outage retried and said
once; counts; at least once). Each event is one ``XADD`` (approximate ``MAXLEN`` trimming)
with the fields ``type``, ``ts``, ``data`` (JSON) and ``event_id``. ``event_id`` is
``<origin>-<seq>``: ``origin`` is random, made once per sink (so per process run), and ``seq``
counts the events given to the sink from 1. A consumer that has seen an ``event_id`` can skip
it; a gap in ``seq`` is an event dropped.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Self

from framepipe.errors import MissingDependencyError
from framepipe.event_sinks import _QueuedSink
from framepipe.events import Event
from framepipe.redis.urls import safe_url

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisEventSink"]


class RedisEventSink(_QueuedSink):
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
