"""``ProcessorRegistry``: the orchestrator's side of remote processors, and its router.

Processors (:class:`~framepipe.processors.fleet.client.ProcessorClient` subclasses, in any
process on any machine) register themselves on Redis; a registry mirrors the registrations
(:mod:`~framepipe.processors.fleet.registry`), routes frames to them and collects their
results. Several registries may share a namespace: each has its own reply stream and keeps its
own count of the frames it has in flight per processor.

Routing (:meth:`ProcessorRegistry.route`, :meth:`~ProcessorRegistry.route_many`,
:meth:`~ProcessorRegistry.call`):

* Among the ``ready`` processors offering the capability, whose circuit breaker
  (:mod:`~framepipe.processors.fleet.breaker`) lets frames through and that have free capacity
  (``capacity`` minus the frames this registry routed to them and has no result for yet), the
  least loaded one gets the frame, by one atomic Lua ``XADD`` to its dedicated stream that only
  succeeds while it is ``ready`` (the script runs by its SHA). Routes go out at once on the
  registry's own connection to Redis, so concurrent ones are pipelined; ``route_many`` writes
  its batch in one go.
* No live processor offers the capability: :class:`~framepipe.errors.NoProcessorError` at once,
  naming the capability and those on offer. Every processor offering it has its breaker open:
  :class:`~framepipe.errors.CircuitOpenError` at once. All busy: the route **waits** for free
  capacity, up to ``route_timeout`` (or the ``wait`` argument), then
  :class:`~framepipe.errors.NoCapacityError`.
* Redis unreachable at start: :class:`~framepipe.errors.RegistryConnectionError` naming the URL
  after ``connect_retries`` retries; its credentials refused (a wrong password): a
  :class:`~framepipe.errors.ConfigError` at once (later, said once at error level and waited
  out); during a route, or refusing it (``LOADING`` after a
  restart, ``OOM``, ``READONLY``, ``BUSY``: :mod:`~framepipe.processors.fleet.outages`): the
  same error at once (the caller decides); the background tasks wait either out with backoff
  by themselves.
* Results arrive on the registry's reply stream (read by one blocking ``XREAD`` loop on a
  connection of its own; the health watch trims the entries read, ``MAXLEN ~ 10000`` bounds
  it meanwhile) and resolve the awaiting :meth:`call` (and
  :class:`~framepipe.processors.fleet.remote.RemoteProcessor`) that sent them: by ``frame_id``
  and the ``reply_token`` the route gave the request (see
  :mod:`~framepipe.processors.fleet.protocol`), so a frame id may be sent again once its
  earlier request ended (a timeout) without the earlier request's late result reaching the
  new one (from a processor of an older framepipe, which echoes no token: unless the entry it
  answered is not known here); a result that does not come within ``result_timeout`` (or the
  call's timeout) fails the call with :class:`~framepipe.errors.ResultTimeoutError`.
* Deadlines: a call's entry carries its result timeout as the frame's time to live
  (``ttl_ms``), a route's its ``max_age`` (``route_max_age``; none by default): a processor
  that reaches the frame later skips it unrun
  (:mod:`~framepipe.processors.fleet.deadlines`).

Health (dead processors, their frames re-routed): see :mod:`~framepipe.processors.fleet.reaper`.

A background task that dies of a bug fails the registry loudly: it is logged, every waiting
call fails with the error, and later calls raise it.

The router's parts have modules of their own: the routes as they go out, entries sent as
capacity allows (:mod:`~framepipe.processors.fleet.dispatch`), the frames' deadlines
(:mod:`~framepipe.processors.fleet.deadlines`), the requests in flight and the capacity they
hold (:mod:`~framepipe.processors.fleet.inflight`), the routes waiting for capacity
(:mod:`~framepipe.processors.fleet.waiting`), what a route writes
(:mod:`~framepipe.processors.fleet.sending`), the registrations it reads
(:mod:`~framepipe.processors.fleet.registry`), the replies
(:mod:`~framepipe.processors.fleet.replies`), the breaker and the reaper.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from framepipe.backoff import Backoff
from framepipe.errors import (
    NoProcessorError,
    ProcessorRegistryError,
    RegistryConnectionError,
)
from framepipe.logs import get_logger
from framepipe.processors.fleet.deadlines import check_max_age, route_limits
from framepipe.processors.fleet.dispatch import Dispatcher
from framepipe.processors.fleet.frame_entries import DEFAULT_MAX_ATTEMPTS, Routable
from framepipe.processors.fleet.inflight import InFlight, Track
from framepipe.processors.fleet.keys import DEFAULT_NAMESPACE, DEFAULT_REDIS_URL, Keys
from framepipe.processors.fleet.outages import REDIS_ERRORS, reach, unavailable
from framepipe.processors.fleet.reaper import Reaper
from framepipe.processors.fleet.registry import ProcessorInfo, Registration, Registrations
from framepipe.processors.fleet.replies import ReplyReader
from framepipe.processors.fleet.result_entries import ProcessorResult
from framepipe.processors.fleet.sending import INLINE_ENCODE_PIXELS, send_entries
from framepipe.processors.fleet.waiting import Waiting
from framepipe.redis import safe_url
from framepipe.redis.connection import connect, lost
from framepipe.redis.wire import Wire

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["INLINE_ENCODE_PIXELS", "ProcessorRegistry", "Track"]


class ProcessorRegistry:
    """Registered processors on Redis, a router by capability and free capacity, and the
    health watch; see the module docstring for the guarantees.

    Use it as ``async with ProcessorRegistry(url) as registry:`` (or ``start()``/``stop()``).
    ``heartbeat_timeout`` must exceed the processors' ``health_interval`` a few times over.
    ``max_attempts`` (written on every entry it routes) bounds the deliveries of one frame:
    a frame delivered that often to processors that died or restarted before finishing it is
    given up with an error result (``error_kind`` ``lost``).
    """

    def __init__(
        self,
        redis_url: str = DEFAULT_REDIS_URL,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        heartbeat_timeout: float = 15.0,
        circuit_failures: int = 5,
        circuit_reset: float = 30.0,
        route_timeout: float = 10.0,
        result_timeout: float = 30.0,
        poll_interval: float | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        connect_retries: int = 3,
        backoff: Backoff | None = None,
        registry_id: str | None = None,
        route_max_age: float | None = None,
    ) -> None:
        if heartbeat_timeout <= 0 or circuit_reset < 0 or result_timeout <= 0:
            raise ValueError(
                "heartbeat_timeout and result_timeout must be positive, circuit_reset not negative"
            )
        check_max_age(route_max_age, "route_max_age")
        if circuit_failures < 1 or max_attempts < 1:
            raise ValueError("circuit_failures and max_attempts must be >= 1")
        self.redis_url = redis_url
        self.namespace = namespace
        self.keys = Keys(namespace)
        self.heartbeat_timeout = heartbeat_timeout
        self.circuit_failures = circuit_failures
        self.circuit_reset = circuit_reset
        self.route_timeout = route_timeout
        self.result_timeout = result_timeout
        self.poll_interval = poll_interval or min(1.0, heartbeat_timeout / 4)
        self.max_attempts = max_attempts
        self.route_max_age = route_max_age
        self.connect_retries = connect_retries
        self.backoff = backoff or Backoff(0.2, 2.0, 10.0, 0.1)
        self.registry_id = registry_id or uuid.uuid4().hex[:12]
        self.reply_stream = self.keys.replies(self.registry_id)
        self.log = get_logger("processors.registry")
        self._redis: Redis | None = None
        self._waiting = Waiting()
        self._mirror = Registrations(self.keys, self, self.log, self._waiting.changed)
        self._procs = self._mirror.procs  # the same dict for the registry's lifetime
        self._reaper = Reaper(self)
        self._reader = ReplyReader(self)
        self._inflight = InFlight(self._procs, self._reader.ended.add, self._waiting.changed)
        self._routed = self._inflight.tracks  # the same dict for the registry's lifetime
        self._dispatcher = Dispatcher(
            self._mirror,
            self._waiting,
            self._inflight,
            require=self._require,
            refresh=self.refresh,
            send=lambda items: self._send(items),  # noqa: PLW0108 - looked up at each send
            down=self._down,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._routes: Wire | None = None  # route scripts, pipelined
        self._replies: Wire | None = None  # the blocking read of the reply stream
        self._failed: BaseException | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (bounded retries), read the registrations, start the reply reader and the
        health watch."""
        if self._redis is not None:
            raise RuntimeError("registry already started")
        self._closed = False
        self._failed = None
        redis = connect(self.redis_url, retries=1)
        try:
            await reach(
                redis,
                self.redis_url,
                retries=self.connect_retries,
                backoff=self.backoff,
                what="processor registry",
            )
        except BaseException:
            await redis.aclose()
            raise
        self._redis = redis
        self._routes, self._replies = Wire(redis), Wire(redis)
        try:
            await self._reaper.check_restart(redis)  # Redis's run id, to notice a restart
        except REDIS_ERRORS as exc:
            if not unavailable(exc):
                raise
            raise self._down(exc) from exc
        await self.refresh()
        for coro, name in ((self._reader.run(), "replies"), (self._reaper.watch(), "watch")):
            task = asyncio.create_task(coro, name=f"registry-{self.registry_id}:{name}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
        self.log.info(
            "Registry %s started on %s (namespace %r): %d processor(s)",
            self.registry_id,
            safe_url(self.redis_url),
            self.namespace,
            len(self._procs),
        )

    async def stop(self) -> None:
        """Stop the background tasks, fail the calls still waiting, remove the reply stream."""
        if self._redis is None:
            return
        self._closed = True
        # Cancelling a task inside a redis-py command can be swallowed (redis/redis-py#2028,
        # #2551): the loops also check ``_closed`` after every command (blocks are <= 1 s).
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _done, stuck = await asyncio.wait(self._tasks, timeout=5.0)
            for task in stuck:
                self.log.warning("registry task %s did not stop within 5s", task.get_name())
        self._tasks = []
        for wire in (self._routes, self._replies):
            if wire is not None:
                await wire.close()
        self._routes = self._replies = None
        self._inflight.fail(
            lambda track: ProcessorRegistryError(
                f"registry stopped before the result of frame {track.frame_id} arrived"
            )
        )
        self._routed.clear()
        redis, self._redis = self._redis, None
        try:
            await redis.delete(self.reply_stream)
        except REDIS_ERRORS as exc:
            if not unavailable(exc):
                raise
        finally:
            await redis.aclose()
        self.log.info("Registry %s stopped", self.registry_id)

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._redis is not None

    async def __aenter__(self) -> ProcessorRegistry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        self._failed = exc
        self.log.error(
            "registry task %s died: %s: %s; the registry is failed",
            task.get_name(),
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        error = ProcessorRegistryError(
            f"registry task {task.get_name()} died: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        self._inflight.fail(lambda _track: error)
        self._waiting.changed()

    def _require(self) -> Redis:
        if self._failed is not None:
            raise ProcessorRegistryError(
                f"the registry failed: {type(self._failed).__name__}: {self._failed}"
            ) from self._failed
        if self._redis is None:
            raise ProcessorRegistryError(
                "the registry is not started: use 'async with "
                "ProcessorRegistry(...)' or 'await registry.start()'"
            )
        return self._redis

    def _down(self, exc: BaseException) -> RegistryConnectionError:
        return RegistryConnectionError(
            lost("processor registry", self.redis_url, exc), url=safe_url(self.redis_url)
        )

    # -- the view of the processors -----------------------------------------------------------

    async def refresh(self) -> list[ProcessorInfo]:
        """Read every registration now (the watch does it every ``poll_interval``)."""
        redis = self._require()
        try:
            # shielded: a caller's cancellation must not reach into redis-py, which can
            # swallow it (redis/redis-py#2028); the read finishes in the background
            ids, hashes = await asyncio.shield(self._mirror.read(redis))
        except REDIS_ERRORS as exc:
            if not unavailable(exc):
                raise
            raise self._down(exc) from exc
        self._mirror.update(ids, hashes, time.monotonic())
        self._waiting.changed()
        return self.processors(include_departed=False)

    def processors(self, *, include_departed: bool = True) -> list[ProcessorInfo]:
        """The processors as of the last refresh, with their state and circuit; with
        ``include_departed`` also the last 100 that left (state ``dead`` or ``deregistered``)."""
        return self._mirror.infos(time.monotonic(), include_departed=include_departed)

    def capabilities(self) -> dict[str, list[str]]:
        """Capability -> ids of the live processors offering it."""
        return self._mirror.capabilities()

    async def wait_for_processor(self, capability: str, timeout: float = 10.0) -> ProcessorInfo:  # noqa: ASYNC109
        """Wait until a live processor offers ``capability``; :class:`NoProcessorError` when
        none does within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            await self.refresh()
            for proc in self._procs.values():
                if proc.live and capability in proc.capabilities:
                    return proc.info()
            if time.monotonic() >= deadline:
                raise NoProcessorError(capability, sorted(self.capabilities()))
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    # -- routing ------------------------------------------------------------------------------

    async def _dispatch(
        self,
        items: Sequence[Routable],
        capability: str,
        *,
        wait: float | None,
        want_futures: bool,
        quality: int,
        result_wait: float,
        ttl: float | None,
    ) -> list[Track]:
        """:meth:`Dispatcher.dispatch <framepipe.processors.fleet.dispatch.Dispatcher.dispatch>`
        with this registry's settings (``wait`` None: ``route_timeout``)."""
        return await self._dispatcher.dispatch(
            items,
            capability,
            wait=self.route_timeout if wait is None else wait,
            want_futures=want_futures,
            quality=quality,
            result_wait=result_wait,
            ttl=ttl,
            reply_to=self.reply_stream,
            max_attempts=self.max_attempts,
        )

    async def _send(self, items: list[tuple[Registration, dict[str, bytes | str]]]) -> list[Any]:
        """:func:`~framepipe.processors.fleet.sending.send_entries` on the registry's route
        connection: message id, None (not ready) or an exception for each."""
        wire = self._routes
        if wire is None:
            self._require()
            raise ProcessorRegistryError("the registry is not started")
        return await send_entries(wire, items)

    async def route(
        self,
        item: Routable,
        capability: str,
        *,
        wait: float | None = None,
        quality: int = 85,
        max_age: float | None = None,
    ) -> str:
        """Send one frame to the least loaded live processor offering ``capability``; returns
        the stream message id. The result goes to the processor's result stream (and releases
        the capacity here). Waits up to ``wait`` (default ``route_timeout``) for free capacity.
        A processor that reaches the frame more than ``max_age`` seconds after it was written
        (default ``route_max_age``; None: no limit) skips it unrun
        (:mod:`~framepipe.processors.fleet.deadlines`).
        Raises NoProcessorError, CircuitOpenError, NoCapacityError, RegistryConnectionError."""
        return (
            await self._dispatch(
                [item],
                capability,
                wait=wait,
                want_futures=False,
                quality=quality,
                **route_limits(max_age, self.route_max_age, self.result_timeout),
            )
        )[0].message_id

    async def route_many(
        self,
        items: Sequence[Routable],
        capability: str,
        *,
        wait: float | None = None,
        quality: int = 85,
        max_age: float | None = None,
    ) -> list[str]:
        """:meth:`route` for a batch, written in pipelines; message ids in the items' order.
        Frames are sent as capacity frees up; ``wait`` bounds each wait for capacity;
        ``max_age`` as for :meth:`route`, counted for each frame from its own entry."""
        tracks = await self._dispatch(
            items,
            capability,
            wait=wait,
            want_futures=False,
            quality=quality,
            **route_limits(max_age, self.route_max_age, self.result_timeout),
        )
        return [t.message_id for t in tracks]

    async def call(
        self,
        item: Routable,
        capability: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - a result timeout
        wait: float | None = None,
        quality: int = 85,
    ) -> ProcessorResult:
        """Route one frame and wait for its result (``ok`` or not: see
        :meth:`ProcessorResult.check`). No result within ``timeout`` (default
        ``result_timeout``): :class:`ResultTimeoutError`, counted as a failure of the
        processor by its circuit breaker. The frame's deadline is the same ``timeout`` after
        its entry was written: a processor that reaches it later (it was away, or its backlog
        was long) skips it unrun (:mod:`~framepipe.processors.fleet.deadlines`)."""
        limit = self.result_timeout if timeout is None else timeout
        track = (
            await self._dispatch(
                [item],
                capability,
                wait=wait,
                want_futures=True,
                quality=quality,
                result_wait=limit,
                ttl=limit,
            )
        )[0]
        assert track.future is not None
        future = track.future
        # on time, InFlight.expire fails the future with ResultTimeoutError (no task cancellation)
        timer = asyncio.get_running_loop().call_later(limit, self._inflight.expire, track, limit)
        try:
            return await future
        finally:
            timer.cancel()
            if not track.future.done():  # cancelled caller: forget the frame's future
                track.future.cancel()
