"""``ProcessorClient``: the base class of a frame-processing service that registers on Redis.

A service subclasses :class:`ProcessorClient` and implements only
``async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict | None``; ``frame_data``
holds the fields of one frame entry (see :mod:`~framepipe.processors.fleet.protocol` for the
wire format and the keys), ``image_data`` as base64 of the image unless
``image_encoding="raw"``. Code written for the processor fleet's own ``ProcessorClient`` runs
as written: its constructor keywords and positional order, its defaults (capacity 10, base64
image data), the compose environment (``PROCESSOR_ID``, ``REDIS_HOST``/``REDIS_PORT``,
``ORCHESTRATOR_URL``; :mod:`~framepipe.processors.fleet.environment`), ``health_port``
(:mod:`~framepipe.processors.fleet.health`), and its main (``signal.signal`` handlers calling
``processor.stop()``, then ``asyncio.run(processor.start())``).

``await client.start()`` registers the processor, consumes its dedicated stream and returns
once the client was stopped (``await client.stop()``, or
SIGTERM/SIGINT after :meth:`ProcessorClient.install_signal_handlers`).

Guarantees:

* At most ``capacity`` frames are inside ``process_frame`` at any moment (XREADGROUP asks for
  no more than the free capacity).
* A frame entry is acknowledged only after its result was published, in one Lua script with
  the acknowledgement, to ``result_stream`` and to the router's reply stream. A frame whose handling
  is interrupted (the process killed, Redis lost for good, the shutdown timeout) stays pending in
  the processor's stream; the :class:`~framepipe.processors.fleet.registry.ProcessorRegistry`
  re-routes it to another processor. Delivery is at least once.
* A malformed entry (missing field, image that is not JPEG/PNG bytes or base64 of them, bad
  metadata JSON, a ``reply_to`` that is not a reply stream of its namespace: never written
  to), a ``process_frame`` that raises (or exceeds ``frame_timeout``) and a result
  that is not a JSON-serialisable dict each give an error result for that frame (``status``
  ``error``, ``error_kind`` ``input``/``processor``/``output``, the error text), are acked and
  logged; the consumer goes on. So is a result Redis rejects for good (``result_stream`` a key
  of another type, an ACL without it): an ``output`` error naming the result stream, on the
  router's reply stream. A ``result_stream`` that is a key of another type at start fails the
  start with :class:`~framepipe.errors.ConfigError` naming it.
* Redis unreachable at start: :class:`~framepipe.errors.RegistryConnectionError` naming the URL
  after ``connect_retries`` retries; its credentials refused (a wrong password): a
  :class:`~framepipe.errors.ConfigError` at once (later, said once at error level and waited
  out); never a hang. Redis lost later, or refusing for a while
  (``LOADING`` after a restart, ``BUSY``, ``OOM``, ``READONLY``:
  :mod:`~framepipe.processors.fleet.outages`): the client reconnects with exponential backoff
  (for as long as it runs; cut short by the first heartbeat that goes through, so that it
  reads its stream again within a heartbeat period of Redis's return), registers again,
  takes back the entries it held and publishes the results it finished meanwhile.
* Entries pending in its stream that it does not hold are taken back: at start (an earlier
  life's), after reconnecting, and whenever a heartbeat finds entries of its stream held by
  another consumer (the registry takes the entries of a processor it declared dead; when none
  can take them over and the processor turns out alive, they are answered here). Each taking
  back is a delivery: an entry already delivered ``max_attempts`` times (its router's setting,
  :class:`~framepipe.processors.fleet.protocol.Attempts`) is not run again but answered with
  an error result (``error_kind`` ``lost``) and acknowledged, so a frame that kills the process
  stops after ``max_attempts`` restarts under the same id.
* A ``process_frame`` that raises while ``image_encoding`` was left to its default gets a
  hint in its error text when the error is plausibly about reading the image (a decoder's
  error, or one naming an image, decoding or base64:
  :func:`~framepipe.processors.fleet.handling.about_image`): the image data is base64 unless
  ``image_encoding="raw"``. Its log does not get a traceback per frame: the first error of
  each kind at once, then one line per 10 s with the count of frames failed so
  (:class:`~framepipe.processors.fleet.handling.Raised`); every frame still gets its error.
* One process per id: a start under an id a live process holds fails with
  :class:`~framepipe.errors.ConfigError` naming it (the record of one that died without
  deregistering is taken over, once its heartbeat is seen standing still:
  :mod:`~framepipe.processors.fleet.identity`). A process whose id was taken over so while it
  was only cut off from Redis finds it at its first heartbeat back (the record holds another
  client's ``instance``): it stops without touching the other's record or stream, and
  ``start()`` raises :class:`~framepipe.errors.ConfigError` naming the holder.
* A frame read or taken back past its deadline (its sender stopped waiting for it: a call's
  result timeout, a route's ``max_age``; judged on Redis's clock) is acknowledged and deleted
  without running ``process_frame`` and without a result, counted in :attr:`expired` and
  logged at most once per 10 s with the count (:mod:`~framepipe.processors.fleet.deadlines`).
  So a processor that was away does not spend its return on frames nobody waits for.
* Heartbeats every ``health_interval`` (``last_heartbeat``, ``in_flight``, ``processed``,
  ``failed``, ``expired`` in the processor's hash). A processor declared dead by the registry
  (silent too long) that turns out alive registers again at its next heartbeat.
* ``stop()`` / SIGTERM: the state becomes ``draining`` at once (routers send nothing more), the
  client takes no new frame, finishes the frames in flight (bounded by ``shutdown_timeout``;
  unfinished ones stay pending and are re-routed), deregisters and ``start()`` returns.

Connections: the processor's blocking ``XREADGROUP`` and its publish script run on two
:class:`~framepipe.redis.wire.Wire` connections; registration and heartbeats use redis-py.

The module holds one processor's life as its user sees it (start, consume, reconnect, drain,
deregister); its parts have modules of their own: its record in Redis (registration,
heartbeats, giving way to a process that took its id over:
:mod:`~framepipe.processors.fleet.membership`), its options
(:mod:`~framepipe.processors.fleet.options`),
the reading of its stream and the taking back of pending entries
(:mod:`~framepipe.processors.fleet.consuming`), the handling of one frame
(:mod:`~framepipe.processors.fleet.handling`), the publishing of its results
(:mod:`~framepipe.processors.fleet.publishing`) and the wire format
(:mod:`~framepipe.processors.fleet.protocol`).
"""

from __future__ import annotations

import abc
import asyncio
import base64
import contextlib
import json
import os
import signal
import time
from collections.abc import Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from framepipe.backoff import Backoff
from framepipe.errors import ConfigError, RegistryConnectionError
from framepipe.logs import get_logger
from framepipe.processors.fleet.consuming import Consumer
from framepipe.processors.fleet.deadlines import RedisClock
from framepipe.processors.fleet.environment import (
    namespace_from,
    orchestrator_url_from,
    processor_id_from,
    redis_url_from,
)
from framepipe.processors.fleet.handling import Raised, run_frame
from framepipe.processors.fleet.health import HealthServer
from framepipe.processors.fleet.identity import RUNNING, claim
from framepipe.processors.fleet.membership import Membership
from framepipe.processors.fleet.options import (
    DEFAULT_CAPACITY,
    DEFAULT_HEALTH_HOST,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_IMAGE_ENCODING,
    check_options,
    check_orchestrator_url,
    log_settings,
)
from framepipe.processors.fleet.outages import (
    REDIS_ERRORS,
    denied,
    kind,
    outage,
    reach,
    unavailable,
)
from framepipe.processors.fleet.protocol import (
    Attempts,
    Fields,
    Keys,
    Outcome,
    ProcessorState,
    lost_result,
    result_fields,
    text,
)
from framepipe.processors.fleet.publishing import Publisher
from framepipe.processors.fleet.registry import deregister, set_state
from framepipe.processors.fleet.shown import loggable
from framepipe.processors.fleet.spans import end_process_span, process_span
from framepipe.redis import safe_url
from framepipe.redis.connection import ResponseError, connect, lost, refused
from framepipe.redis.wire import Wire
from framepipe.tracing import parse_traceparent

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from redis.asyncio import Redis

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_HEALTH_HOST",
    "DEFAULT_HEALTH_INTERVAL",
    "DEFAULT_IMAGE_ENCODING",
    "ProcessorClient",
]

_RAW_HINT = (
    " (frame_data[b'image_data'] holds base64 of the image by default; pass "
    "image_encoding='raw' for the raw bytes, or use self.decode_image(frame_data))"
)


class _StopWaiter:
    """What :meth:`ProcessorClient.stop` returns: await it to wait for the end, or ignore it."""

    def __init__(self, client: ProcessorClient) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, None]:
        return self._client._wait_stopped().__await__()


class ProcessorClient(abc.ABC):
    """A frame-processing service registered on Redis. Subclass it and implement
    :meth:`process_frame`; see the module docstring for the guarantees.

    The positional order is the processor fleet's: ``processor_id``, ``capabilities``,
    ``orchestrator_url``, ``capacity``, ``redis_client``, ``redis_url``, ``result_stream``,
    ``health_port``, ``health_check_interval``; everything else is keyword-only.

    ``processor_id`` must be unique in the namespace (one process per id); ``PROCESSOR_ID`` in
    the environment wins over it. ``capabilities`` are the names a router matches
    (``["face_detection", "face_recognition"]``). ``capacity`` is the number of frames processed
    at once (10). ``redis_url`` (``redis://host:6379/0``) defaults to ``REDIS_URL``, else
    ``REDIS_HOST``/``REDIS_PORT``, else ``127.0.0.1:6379``; ``redis_client`` is used instead when
    given (not closed by the client). ``orchestrator_url`` (default ``ORCHESTRATOR_URL``) is
    reported and never contacted: registration goes through Redis (a ``redis://`` URL there
    names the Redis when nothing else does). ``result_stream`` (default ``<ns>:results``)
    receives every result, trimmed to about ``result_maxlen`` entries (None: never trimmed).
    ``health_port`` serves ``GET /health`` on ``health_host``
    (:mod:`~framepipe.processors.fleet.health`). ``health_check_interval`` (or its other name
    ``health_interval``) is the heartbeat period in seconds (5); the registry waits
    ``max(heartbeat_timeout, 3 x the period)`` before declaring it dead. ``namespace`` defaults
    to ``FRAMEPIPE_NAMESPACE``, else ``framepipe:``. ``image_encoding`` chooses what
    ``frame_data[b"image_data"]`` holds: ``base64`` of the image (the default, the processor
    fleet's frame format), or the ``raw`` bytes; :meth:`decode_image` reads either (the wire
    carries raw bytes either way). ``frame_timeout`` bounds one ``process_frame`` call.
    ``environ`` is the environment read for the settings above (default ``os.environ``; ``{}``
    reads none).
    """

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

    # -- helpers for subclasses -------------------------------------------------------------

    def decode_image(self, frame_data: Mapping[bytes, bytes]) -> npt.NDArray[np.uint8]:
        """The frame's image as a BGR array (OpenCV); raises :class:`FrameError` on bad data."""
        from framepipe.frames import decode_jpeg

        data = frame_data[b"image_data"]
        if self.image_encoding == "base64":
            data = base64.b64decode(data)
        return decode_jpeg(data)

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

    @staticmethod
    def metadata(frame_data: Mapping[bytes, bytes]) -> dict[str, Any]:
        """The entry's ``metadata`` JSON object ({} when absent)."""
        raw = frame_data.get(b"metadata")
        return dict(json.loads(raw)) if raw else {}

    # -- lifecycle ----------------------------------------------------------------------------

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

    async def wait_registered(self) -> None:
        """Wait until the processor is registered (bound it with ``asyncio.timeout``)."""
        await self._registered.wait()

    def install_signal_handlers(
        self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Stop gracefully on ``signals`` (call inside the running loop, before ``start``)."""
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)

    def stop(self) -> _StopWaiter:
        """Ask the client to stop (see the module docstring). Safe from a signal handler or
        another thread; ``await client.stop()`` also waits until ``start()`` has finished."""
        self._stop_requested = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_stop)
        return _StopWaiter(self)

    def _on_stop(self) -> None:
        """In the loop: take no new frame; tell the routers at once (``draining``)."""
        if self._stop_event is None or self._stop_event.is_set():
            return
        self._stop_event.set()
        self.state = ProcessorState.DRAINING
        if self._registered.is_set() and self._draining_task is None:
            self._draining_task = asyncio.ensure_future(self._set_draining())
        self._consumer.wake()

    async def _wait_stopped(self) -> None:
        if self._stopped_event is not None and self._running:
            await self._stopped_event.wait()

    async def run(self) -> None:
        """:meth:`start` with SIGTERM/SIGINT handlers installed (the service's main)."""
        self.install_signal_handlers()
        await self.start()

    async def start(self) -> None:
        """Connect, register, and process frames until stopped; returns after the graceful
        shutdown. Raises :class:`RegistryConnectionError` when Redis cannot be reached at
        start (after ``connect_retries`` retries), :class:`ConfigError` when it refuses the
        credentials."""
        if self._running:
            raise RuntimeError(f"processor {self.processor_id!r} is already running")
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._stopped_event = asyncio.Event()
        self._membership.reset()
        self._consumer.reset()
        if self._stop_requested:
            self._stop_event.set()
        self._running = True
        self.state = "starting"
        self._started_at = time.monotonic()
        try:
            if self.health_port is not None:
                self._health = HealthServer(
                    self.health_host, self.health_port, self.health, self.log
                )
                await self._health.start()
            log_settings(
                self.log,
                processor_id=self.processor_id,
                processor_id_source=self.processor_id_source,
                code_id=self._code_id,
                redis_url=self.redis_url,
                redis_url_source=self.redis_url_source,
                orchestrator_url=self.orchestrator_url,
            )
            if self._redis is None:
                self._redis = connect(self.redis_url)
            what = f"processor {self.processor_id!r}"
            await reach(
                self._redis,
                self.redis_url,
                retries=self.connect_retries,
                backoff=self.backoff,
                what=what,
            )
            try:
                await self._check_result_stream()
                await claim(self._redis, self.keys, self.processor_id, self._instance, self.log)
                RUNNING.add(self._instance)
                await self._register()
            except REDIS_ERRORS as exc:
                if not unavailable(exc):
                    raise
                if denied(exc):
                    raise refused(what, self.redis_url, exc) from exc
                raise RegistryConnectionError(
                    lost(what, self.redis_url, exc, during="registering"),
                    url=safe_url(self.redis_url),
                ) from exc
            self._reads = Wire(self._redis)
            self._publisher = Publisher(
                Wire(self._redis),
                self.keys,
                self.processor_id,
                self.stream,
                self.result_stream,
                self.result_maxlen,
                self.backoff,
                self.log,
            )
            beat_done = asyncio.Event()
            beating = asyncio.create_task(
                self._membership.beat(self._redis, beat_done), name=f"{self.processor_id}:heartbeat"
            )
            try:
                await self._serve()
            finally:
                await self._shutdown(beating, beat_done)
            if self._membership.displaced is not None:
                raise self._membership.displaced
        finally:
            RUNNING.discard(self._instance)
            self.state = ProcessorState.STOPPED
            if self._health is not None:
                await self._health.close()
                self._health = None
            if self._reads is not None:
                await self._reads.close()
                self._reads = None
            if self._publisher is not None:
                await self._publisher.close()
            if self._external is None and self._redis is not None:
                await self._redis.aclose()
                self._redis = None
            self._running = False
            self._stop_requested = False
            self._stopped_event.set()

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

    async def _serve(self) -> None:
        """Consume until stopped; reconnect with backoff while Redis is away."""
        failures = 0
        said = ""  # the kind of outage said at warning (error) level
        need_register = False
        while not self._stopping:
            try:
                if need_register:
                    await self._register()
                    need_register = False
                    if failures:
                        self.log.info("Reconnected to Redis after %d attempts", failures)
                    failures = 0
                    said = ""
                assert self._reads is not None
                await self._consumer.consume(
                    self._require_redis(),
                    self._reads,
                    capacity=self.capacity,
                    poll_interval=self.poll_interval,
                    stopping=lambda: self._stopping,
                )
            except REDIS_ERRORS as exc:
                if isinstance(exc, ResponseError) and (
                    "NOGROUP" in str(exc) or str(exc).startswith("UNBLOCKED")
                ):  # (UNBLOCKED: the stream was deleted under its blocking read)
                    self.log.warning(
                        "Its stream or group disappeared (deregistered as dead, or "
                        "Redis lost its data); registering again"
                    )
                    need_register = True
                    continue
                if not unavailable(exc):
                    raise
                failures += 1
                need_register = True
                if not self._stopping:
                    self.state = "reconnecting"
                delay = self.backoff.delay(failures)
                new, said = kind(exc) != said, kind(exc)
                first = self.log.error if denied(exc) else self.log.warning
                later = self.log.debug if denied(exc) else self.log.info
                (first if new else later)(
                    "%s; reconnecting in %.1fs (attempt %d)",
                    outage(self.redis_url, exc),
                    delay,
                    failures,
                )
                await self._sleep_unless_stopping(delay)

    async def _sleep_unless_stopping(self, delay: float) -> None:
        """Wait ``delay`` seconds before connecting again, or less: until stopped, or until
        a heartbeat went through (Redis is back: the backoff may have grown to
        ``backoff.maximum`` while it was away, and routers send frames again as soon as a
        heartbeat registered the processor again)."""
        assert self._stop_event is not None
        self._membership.back.clear()
        waits = {
            asyncio.ensure_future(self._stop_event.wait()),
            asyncio.ensure_future(self._membership.back.wait()),
        }
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    # -- one frame ----------------------------------------------------------------------------

    async def _handle(self, mid: bytes, fields: Fields) -> None:
        started = time.perf_counter()
        traceparent = parse_traceparent(fields.get(b"trace_context"))
        span = process_span(self.processor_id, fields, traceparent)
        outcome = await run_frame(
            self.process_frame,
            mid,
            fields,
            traceparent,
            keys=self.keys,
            image_encoding=self.image_encoding,
            frame_timeout=self.frame_timeout,
            log=self.log,
            raised=self._raised,
            image_hint=_RAW_HINT if self._encoding_defaulted else "",
            span=span,
        )
        end_process_span(span, outcome)
        if outcome.ok:
            self.processed += 1
        else:
            self.failed += 1
        payload = result_fields(
            self.processor_id,
            mid,
            fields,
            outcome,
            traceparent,
            (time.perf_counter() - started) * 1000.0,
        )
        if not await self._publish(mid, fields, outcome, payload) and outcome.ok:
            self.processed -= 1  # Redis rejected its result: answered as an output error
            self.failed += 1
        self._consumer.free(mid)

    async def _give_up(self, mid: bytes, fields: Fields, attempts: Attempts) -> None:
        """Answer an entry delivered ``attempts.limit`` times already with the error result
        the registry gives such a frame, and acknowledge it: it is not run again."""
        self.failed += 1
        self.log.error(
            "Frame %s was delivered %d times (max_attempts %d) to processors that died or "
            "restarted before finishing it; giving up on it",
            loggable(fields.get(b"frame_id")),
            attempts.used,
            attempts.limit,
        )
        payload = lost_result(self.processor_id, mid, fields, attempts.used)
        outcome = Outcome(ok=False, error=text(payload["error"]), kind="lost")
        await self._publish(mid, fields, outcome, payload)

    async def _publish(
        self, mid: bytes, fields: Fields, outcome: Outcome, payload: dict[str, str | bytes]
    ) -> bool:
        """:meth:`Publisher.publish` (frames are handled only once started)."""
        assert self._publisher is not None
        return await self._publisher.publish(mid, fields, outcome, payload)

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

    async def _shutdown(self, beating: asyncio.Task[None], beat_done: asyncio.Event) -> None:
        self.log.info("Stopping: %d frame(s) in flight", self.in_flight)
        displaced = self._membership.displaced is not None
        if self._draining_task is None and not displaced:
            self._draining_task = asyncio.ensure_future(self._set_draining())
        if self._draining_task is not None:
            await self._draining_task
        self._draining_task = None
        if self._consumer.inflight:
            _done, pending = await asyncio.wait(
                set(self._consumer.inflight.values()), timeout=self.shutdown_timeout
            )
            if pending:
                self.log.warning(
                    "%d frame(s) unfinished after %.1fs; left pending for the registry to re-route",
                    len(pending),
                    self.shutdown_timeout,
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5.0)
        # no cancel: redis-py can swallow a cancellation mid-command (redis/redis-py#2028)
        beat_done.set()
        await asyncio.wait({beating}, timeout=15.0)
        if not displaced:
            await self._deregister()

    async def _deregister(self) -> None:
        redis = self._require_redis()
        try:
            removed = await deregister(
                redis, self.keys, self.processor_id, self.stream, ProcessorState.DRAINING
            )
            if removed == 0:
                await set_state(redis, self.keys, self.processor_id, ProcessorState.STOPPED)
                self.log.info("Stopped; entries left in its stream go back to the registry")
            else:
                self.log.info("Deregistered (processed=%d failed=%d)", self.processed, self.failed)
        except REDIS_ERRORS as exc:
            if not unavailable(exc):
                raise
            self.log.warning(
                "could not deregister (Redis unreachable: %s: %s); the registry will declare "
                "it dead",
                type(exc).__name__,
                exc,
            )
