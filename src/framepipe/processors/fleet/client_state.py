"""A processor client's state: what its constructor resolves (options, environment, keys),
its counters and collaborators (membership, consumer), and the small steps the other parts of
the client share (its record written again, the check of its result stream, the start of its
draining).

:class:`ClientState` is the base of :class:`~framepipe.processors.fleet.client.ProcessorClient`;
the handling of one frame is in :mod:`~framepipe.processors.fleet.answering`, its life (start,
consume, reconnect, drain, deregister) in :mod:`~framepipe.processors.fleet.serving`.
"""

from __future__ import annotations

import abc
import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from framepipe.backoff import Backoff
from framepipe.errors import ConfigError
from framepipe.logs import get_logger
from framepipe.processors.fleet.consuming import Consumer
from framepipe.processors.fleet.deadlines import RedisClock
from framepipe.processors.fleet.environment import (
    namespace_from,
    orchestrator_url_from,
    processor_id_from,
    redis_url_from,
)
from framepipe.processors.fleet.field_values import text
from framepipe.processors.fleet.frame_entries import Attempts
from framepipe.processors.fleet.handling import Raised
from framepipe.processors.fleet.health import HealthServer
from framepipe.processors.fleet.keys import Keys, ProcessorState
from framepipe.processors.fleet.membership import Membership
from framepipe.processors.fleet.options import (
    DEFAULT_CAPACITY,
    DEFAULT_HEALTH_HOST,
    DEFAULT_IMAGE_ENCODING,
    check_options,
    check_orchestrator_url,
)
from framepipe.processors.fleet.outages import (
    REDIS_ERRORS,
    unavailable,
)
from framepipe.processors.fleet.publishing import Publisher
from framepipe.processors.fleet.registry import set_state
from framepipe.redis import safe_url
from framepipe.redis.streams import Fields
from framepipe.redis.wire import Wire

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["ClientState"]


class ClientState(abc.ABC):
    """What a :class:`~framepipe.processors.fleet.client.ProcessorClient` holds; see its
    docstring for the constructor's arguments."""

    def __init__(
        self,
        processor_id: str | None = None,
        capabilities: Sequence[str] | None = None,
        orchestrator_url: str | None = None,
        capacity: int = DEFAULT_CAPACITY,
        redis_client: Redis | None = None,
        redis_url: str | None = None,
        result_stream: str | None = None,
        health_port: int | None = None,
        health_check_interval: float | None = None,
        *,
        health_interval: float | None = None,
        namespace: str | None = None,
        image_encoding: Literal["raw", "base64"] | None = None,
        health_host: str = DEFAULT_HEALTH_HOST,
        environ: Mapping[str, str] | None = None,
        frame_timeout: float | None = None,
        shutdown_timeout: float = 30.0,
        connect_retries: int = 3,
        backoff: Backoff | None = None,
        poll_interval: float = 0.5,
        result_maxlen: int | None = 10_000,
    ) -> None:
        check_orchestrator_url(orchestrator_url)
        env = os.environ if environ is None else environ
        ident = processor_id_from(processor_id, env)
        self._code_id = processor_id
        processor_id = ident.value
        names, interval = check_options(
            processor_id,
            capabilities,
            capacity,
            health_interval=health_interval,
            health_check_interval=health_check_interval,
            poll_interval=poll_interval,
            image_encoding=image_encoding,
            health_port=health_port,
            health_host=health_host,
        )
        self.processor_id = processor_id
        self.processor_id_source = ident.source
        """``argument`` or ``PROCESSOR_ID`` (the environment's id wins over the code's)."""
        self.capabilities = names
        self.capacity = capacity
        self.orchestrator_url = orchestrator_url_from(orchestrator_url, env)
        self.namespace = namespace_from(namespace, env)
        self.keys = Keys(self.namespace)
        self.result_stream = result_stream or self.keys.results
        redis_setting = redis_url_from(redis_url, env, self.orchestrator_url)
        self.redis_url = redis_setting.value
        self.redis_url_source = "redis_client" if redis_client is not None else redis_setting.source
        """Where ``redis_url`` came from: ``argument``, ``REDIS_URL``,
        ``REDIS_HOST/REDIS_PORT``, ``orchestrator_url``, ``default`` (or ``redis_client``)."""
        self.health_interval = interval
        self.health_port = health_port
        self.health_host = health_host
        self.image_encoding: Literal["raw", "base64"] = image_encoding or DEFAULT_IMAGE_ENCODING
        self._encoding_defaulted = image_encoding is None
        self.frame_timeout = frame_timeout
        self.shutdown_timeout = shutdown_timeout
        self.connect_retries = connect_retries
        self.backoff = backoff or Backoff(0.5, 2.0, 30.0, 0.1)
        self.poll_interval = poll_interval
        self.result_maxlen = result_maxlen
        self.stream = self.keys.frames(processor_id)
        self.log = get_logger(f"processor:{processor_id}", "framepipe.processors.client")
        self.processed = 0
        """Frames handled with an ``ok`` result."""
        self.failed = 0
        """Frames reported as errors."""
        self.state = "stopped"
        """``starting``, ``ready``, ``reconnecting``, ``draining`` or ``stopped`` (what the
        health endpoint reports)."""
        self._started_at: float | None = None
        self._health: HealthServer | None = None
        self._external = redis_client
        self._redis: Redis | None = redis_client
        clock = RedisClock()  # Redis's clock: frames' deadlines are judged on it
        self._consumer = Consumer(
            processor_id, self.stream, self.log, self._handle, self._give_up, clock
        )
        self._membership = Membership(
            processor_id,
            self.keys,
            capabilities=self.capabilities,
            capacity=capacity,
            stream=self.stream,
            result_stream=self.result_stream,
            health_interval=interval,
            redis_url=self.redis_url,
            consumer=self._consumer,
            clock=clock,
            log=self.log,
            counts=self._counts,
            stopping=lambda: self._stopping,
            on_ready=self._on_ready,
            on_displaced=self._on_stop,
        )
        self._registered = self._membership.registered  # the same event, for the life of it
        self._instance = self._membership.instance
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopped_event: asyncio.Event | None = None
        self._stop_requested = False
        self._draining_task: asyncio.Task[None] | None = None
        self._reads: Wire | None = None  # XREADGROUP (blocks)
        self._publisher: Publisher | None = None  # publish + acknowledge, once started
        self._running = False
        self._raised = Raised(self.log)  # process_frame raising: logged at once, then rarely

    # -- what a subclass implements ---------------------------------------------------------

    @abc.abstractmethod
    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        """Handle one frame. ``frame_data`` holds the entry's raw fields (bytes keys and
        values; ``image_data`` as chosen by ``image_encoding``). Return a JSON-serialisable
        dict (published as the result), or None (no result to publish). Raising reports an
        error result for this frame; the client goes on."""

    @abc.abstractmethod
    async def _handle(self, mid: bytes, fields: Fields) -> None:
        """Run one frame and answer it (:mod:`~framepipe.processors.fleet.answering`)."""

    @abc.abstractmethod
    async def _give_up(self, mid: bytes, fields: Fields, attempts: Attempts) -> None:
        """Answer a frame delivered too often without running it
        (:mod:`~framepipe.processors.fleet.answering`)."""

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the processor is healthy (registered and taking frames) and its state, as
        the health endpoint reports them."""
        started = self._started_at
        return self.state == ProcessorState.READY, {
            "status": "healthy" if self.state == ProcessorState.READY else "unhealthy",
            "state": self.state,
            "processor_id": self.processor_id,
            "capabilities": list(self.capabilities),
            "capacity": self.capacity,
            "in_flight": self.in_flight,
            "processed": self.processed,
            "failed": self.failed,
            "expired": self.expired,
            "last_heartbeat": self.last_heartbeat,
            "uptime_s": None if started is None else round(time.monotonic() - started, 3),
            "redis": safe_url(self.redis_url),
            "namespace": self.namespace,
            "result_stream": self.result_stream,
            "image_encoding": self.image_encoding,
            "orchestrator_url": self.orchestrator_url and safe_url(self.orchestrator_url),
        }

    # -- counters ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Frames being processed now."""
        return len(self._consumer.inflight)

    @property
    def max_in_flight(self) -> int:
        """The most frames that were inside ``process_frame`` at once."""
        return self._consumer.max_in_flight

    @property
    def expired(self) -> int:
        """Frames skipped past their deadline: acknowledged without running
        :meth:`process_frame` (their senders had stopped waiting for them)."""
        return self._consumer.expiry.count

    @property
    def last_heartbeat(self) -> float | None:
        """When (``time.time()``) its record was last written (registration or heartbeat)."""
        return self._membership.last_heartbeat

    @property
    def running(self) -> bool:
        """True from :meth:`start` until it returns."""
        return self._running

    def _on_stop(self) -> None:
        """In the loop: take no new frame; tell the routers at once (``draining``)."""
        if self._stop_event is None or self._stop_event.is_set():
            return
        self._stop_event.set()
        self.state = ProcessorState.DRAINING
        if self._registered.is_set() and self._draining_task is None:
            self._draining_task = asyncio.ensure_future(self._set_draining())
        self._consumer.wake()

    # -- registration ------------------------------------------------------------------------

    def _counts(self) -> dict[str, int]:
        """The counters its record carries (written at registration and every heartbeat)."""
        return {
            "in_flight": self.in_flight,
            "processed": self.processed,
            "failed": self.failed,
            "max_in_flight": self.max_in_flight,
            "expired": self.expired,
        }

    def _on_ready(self) -> None:
        if not self._stopping:
            self.state = ProcessorState.READY

    async def _register(self) -> None:
        """:meth:`Membership.register` (its record written again)."""
        await self._membership.register(self._require_redis())

    async def _check_result_stream(self) -> None:
        """:class:`ConfigError` when ``result_stream`` names a key that is not a stream (every
        result would be rejected)."""
        kind = text(await self._require_redis().type(self.result_stream))
        if kind not in ("none", "stream"):
            raise ConfigError(
                f"processor {self.processor_id!r}: its result stream {self.result_stream!r} "
                f"is a Redis {kind}, not a stream; give another result_stream, or delete "
                "the key"
            )

    # -- consuming --------------------------------------------------------------------------

    @property
    def _stopping(self) -> bool:
        return self._stop_event is None or self._stop_event.is_set()

    def _require_redis(self) -> Redis:
        if self._redis is None:
            raise RuntimeError(f"processor {self.processor_id!r} is not running")
        return self._redis

    # -- shutdown -----------------------------------------------------------------------------

    async def _set_draining(self) -> None:
        try:
            await set_state(
                self._require_redis(), self.keys, self.processor_id, ProcessorState.DRAINING
            )
        except REDIS_ERRORS as exc:
            if not unavailable(exc):
                raise
            self.log.warning("could not mark itself draining: %s: %s", type(exc).__name__, exc)
