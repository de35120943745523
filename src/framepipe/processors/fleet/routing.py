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
  after ``connect_retries`` retries; during a route: the same error at once (the caller
  decides); the background tasks reconnect with backoff by themselves.
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

Health (dead processors, their frames re-routed): see :mod:`~framepipe.processors.fleet.reaper`.

A background task that dies of a bug fails the registry loudly: it is logged, every waiting
call fails with the error, and later calls raise it.

At some 500 lines the module is one concept, the registry's router: its routes, the frames in
flight per processor (reserved, released, expired) and the calls waiting for results are one
state; the registrations it reads, the replies, the breaker and the reaper have modules of
their own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import secrets
import time
import uuid
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from framepipe.backoff import Backoff
from framepipe.errors import (
    CircuitOpenError,
    NoCapacityError,
    NoProcessorError,
    ProcessorRegistryError,
    RegistryConnectionError,
    ResultTimeoutError,
)
from framepipe.frames import Frame
from framepipe.logs import get_logger
from framepipe.processors.fleet.protocol import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
    Keys,
    ProcessorResult,
    Routable,
    answers,
    entry_fields,
    frame_entry,
    text,
)
from framepipe.processors.fleet.reaper import Reaper
from framepipe.processors.fleet.registry import ProcessorInfo, Registration, Registrations
from framepipe.processors.fleet.replies import ReplyReader
from framepipe.processors.fleet.spans import send_spans
from framepipe.redis import safe_url
from framepipe.redis.connection import REDIS_DOWN, connect, lost, ping_with_retries
from framepipe.redis.scripts import ROUTE
from framepipe.redis.wire import Wire
from framepipe.tracing import end_span, traceparent_of

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["INLINE_ENCODE_PIXELS", "ProcessorRegistry", "Track"]

INLINE_ENCODE_PIXELS = 256 * 256
"""Frames up to this many pixels are JPEG-encoded on the event loop (at most about 0.2 ms
here; the hand-off to a thread costs more than that); larger ones in the default executor."""


@dataclass
class Track:
    """A frame this registry routed and has no result for yet."""

    frame_id: str
    processor_id: str
    capability: str
    routed_at: float
    future: asyncio.Future[ProcessorResult] | None
    """What :meth:`ProcessorRegistry.call` awaits (None for :meth:`~ProcessorRegistry.route`)."""
    timeout: float
    message_id: str = ""
    """Its entry's id in the stream it was last routed to, once known ("" until the route's
    ``XADD`` replied; the reaper's move of it sets it when its script replied)."""
    reply_token: str = ""
    """The request's token on the wire: only a result that echoes it is this frame's (see
    :func:`~framepipe.processors.fleet.protocol.answers`)."""
    entries: list[tuple[str, str]] = field(default_factory=list)
    """``(processor_id, entry id)`` of every entry this registry wrote for the request (its
    route, the reaper's moves), as they became known: remembered when it ends
    (:class:`~framepipe.processors.fleet.replies.Ended`)."""

    def answered_by(self, result: ProcessorResult, ended: Container[tuple[str, str]]) -> bool:
        """Whether ``result`` is this request's, not a late one of an earlier request of the
        same frame id (``ended``: the entries of those this registry knows of)."""
        return answers(result, self.reply_token, ended)


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
    ) -> None:
        if heartbeat_timeout <= 0 or circuit_reset < 0 or result_timeout <= 0:
            raise ValueError(
                "heartbeat_timeout and result_timeout must be positive, circuit_reset not negative"
            )
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
        self.connect_retries = connect_retries
        self.backoff = backoff or Backoff(0.2, 2.0, 10.0, 0.1)
        self.registry_id = registry_id or uuid.uuid4().hex[:12]
        self.reply_stream = self.keys.replies(self.registry_id)
        self.log = get_logger("processors.registry")
        self._redis: Redis | None = None
        self._mirror = Registrations(self.keys, self, self.log, self._notify)
        self._procs = self._mirror.procs  # the same dict for the registry's lifetime
        self._reaper = Reaper(self)
        self._routed: dict[str, Track] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._routes: Wire | None = None  # route scripts, pipelined
        self._replies: Wire | None = None  # the blocking read of the reply stream
        self._pulse = asyncio.Event()
        self._pulse_waiters = 0
        self._lines: dict[str, collections.deque[int]] = {}  # capability -> tickets of the
        # routes waiting for capacity, in arrival order: only the first may take a free slot
        self._tickets = itertools.count()
        self._failed: BaseException | None = None
        self._closed = False
        self._reader = ReplyReader(self)

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
            await ping_with_retries(
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
        for track in list(self._routed.values()):
            if track.future is not None and not track.future.done():
                track.future.set_exception(
                    ProcessorRegistryError(
                        f"registry stopped before the result of frame {track.frame_id} arrived"
                    )
                )
        self._routed.clear()
        redis, self._redis = self._redis, None
        try:
            with contextlib.suppress(*REDIS_DOWN):
                await redis.delete(self.reply_stream)
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
            "registry task %s died: %r; the registry is failed", task.get_name(), exc, exc_info=exc
        )
        error = ProcessorRegistryError(
            f"registry task {task.get_name()} died: {type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        for track in list(self._routed.values()):
            if track.future is not None and not track.future.done():
                track.future.set_exception(error)
        self._notify()

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

    def _notify(self) -> None:
        if self._pulse_waiters:  # a fresh Event per change only when a route waits on it
            self._pulse.set()
            self._pulse = asyncio.Event()

    async def _wait_change(self, seconds: float) -> None:
        self._pulse_waiters += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pulse.wait(), seconds)
        finally:
            self._pulse_waiters -= 1

    # -- the view of the processors -----------------------------------------------------------

    async def refresh(self) -> list[ProcessorInfo]:
        """Read every registration now (the watch does it every ``poll_interval``)."""
        redis = self._require()
        try:
            # shielded: a caller's cancellation must not reach into redis-py, which can
            # swallow it (redis/redis-py#2028); the read finishes in the background
            ids, hashes = await asyncio.shield(self._mirror.read(redis))
        except REDIS_DOWN as exc:
            raise self._down(exc) from exc
        self._mirror.update(ids, hashes, time.monotonic())
        self._notify()
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

    def _reserve(
        self, proc: Registration, fields: dict[str, bytes | str], capability: str, want_future: bool
    ) -> Track:
        frame_id = text(fields["frame_id"])
        future = asyncio.get_running_loop().create_future() if want_future else None
        now = time.monotonic()
        token = secrets.token_hex(8)
        track = Track(
            frame_id, proc.id, capability, now, future, self.result_timeout, reply_token=token
        )
        proc.breaker.sent(frame_id)
        proc.outstanding.add(frame_id)
        proc.last_routed = now
        self._routed[frame_id] = track
        fields["capability"] = capability
        fields["reply_to"] = self.reply_stream
        fields["reply_token"] = token
        fields.setdefault("attempt", "1")
        fields.setdefault("max_attempts", str(self.max_attempts))
        fields["routed_at"] = repr(time.time())
        return track

    def _release(self, track: Track) -> None:
        """``track``'s request ended (answered, expired, or not sent): its capacity is freed
        and its entries remembered as an ended request's."""
        if self._routed.get(track.frame_id) is track:
            del self._routed[track.frame_id]
        self._reader.ended.add(track.frame_id, track.entries)
        proc = self._procs.get(track.processor_id)
        if proc is not None:
            proc.outstanding.discard(track.frame_id)
            proc.breaker.settled(track.frame_id)
        self._notify()

    async def _fields(
        self, item: Routable, quality: int, trace: str | None
    ) -> dict[str, bytes | str]:
        """``item``'s stream fields; ``trace`` (the send span's) replaces its trace context."""
        if isinstance(item, Mapping):
            entry = entry_fields(item)
            if trace is not None:
                entry["trace_context"] = trace
            return entry
        if isinstance(item, Frame):
            if item.width * item.height <= INLINE_ENCODE_PIXELS:
                return frame_entry(item, quality=quality, trace_context=trace)
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: frame_entry(item, quality=quality, trace_context=trace)
            )
        raise TypeError(f"cannot route a {type(item).__name__}: give a Frame or an entry dict")

    async def _dispatch(
        self,
        items: Sequence[Routable],
        capability: str,
        *,
        wait: float | None,
        want_futures: bool,
        quality: int,
    ) -> list[Track]:
        """Route ``items`` as capacity allows (see :meth:`_route`). While OpenTelemetry
        tracing is on, each item's routing is a span, ``send <capability>``, child of the
        trace context it carries (else of the current one), whose traceparent goes on the
        wire in its place: the processor's span is its child."""
        self._require()
        spans = send_spans(items, capability)
        try:
            entries = [
                await self._fields(item, quality, None if spans is None else traceparent_of(span))
                for item, span in zip(items, spans or itertools.repeat(None), strict=False)
            ]
            tracks = await self._route(entries, capability, wait=wait, want_futures=want_futures)
        except BaseException as exc:
            for span in spans or ():
                end_span(span, exc)
            raise
        for span, track in zip(spans or (), tracks, strict=False):
            end_span(
                span,
                attributes={
                    "framepipe.frame_id": track.frame_id,
                    "framepipe.processor_id": track.processor_id,
                },
            )
        return tracks

    async def _route(
        self,
        entries: list[dict[str, bytes | str]],
        capability: str,
        *,
        wait: float | None,
        want_futures: bool,
    ) -> list[Track]:
        """Route ``entries`` as capacity allows; every reservation is either sent or released.
        Routes that have to wait for capacity queue per capability: a free slot goes to the
        first in line, never to a route that came later."""
        if len(entries) == 1:
            frame_id = text(entries[0]["frame_id"])
            clash = [frame_id] if frame_id in self._routed else []
        else:
            counts = collections.Counter(text(e["frame_id"]) for e in entries)
            clash = sorted(i for i, n in counts.items() if n > 1 or i in self._routed)
        if clash:
            raise ValueError(f"frame ids must be unique among the frames in flight: {clash}")
        limit = self.route_timeout if wait is None else wait
        deadline = time.monotonic() + limit
        queue = collections.deque(range(len(entries)))
        done: list[Track | None] = [None] * len(entries)
        refreshed = False
        ticket: int | None = None  # this route's place in the capability's line, once waiting
        try:
            while queue:
                batch: list[tuple[int, Registration, Track]] = []
                while queue:
                    try:
                        proc = self._mirror.choose(capability)
                    except (NoProcessorError, CircuitOpenError) as exc:
                        if batch:
                            break  # send the reserved ones first; the next round raises
                        if isinstance(exc, NoProcessorError) and not refreshed:
                            refreshed = True  # one may have registered since the last read
                            await self.refresh()
                            continue
                        raise
                    line = self._lines.get(capability)
                    if proc is None or (line and line[0] != ticket):
                        break  # no free slot, or one that the route first in line gets
                    index = queue.popleft()
                    batch.append(
                        (index, proc, self._reserve(proc, entries[index], capability, want_futures))
                    )
                if batch:
                    await self._send_batch(batch, entries, queue, done)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoCapacityError(
                        capability,
                        sorted(
                            p.id
                            for p in self._procs.values()
                            if p.live and capability in p.capabilities
                        ),
                        limit,
                    )
                if ticket is None:
                    ticket = next(self._tickets)
                    self._lines.setdefault(capability, collections.deque()).append(ticket)
                await self._wait_change(min(remaining, 0.25))
                self._require()
        finally:
            if ticket is not None:
                line = self._lines[capability]
                line.remove(ticket)
                if not line:
                    del self._lines[capability]
                self._notify()  # the next in line may take a slot now
        return [t for t in done if t is not None]

    async def _send_batch(
        self,
        batch: list[tuple[int, Registration, Track]],
        entries: list[dict[str, bytes | str]],
        queue: collections.deque[int],
        done: list[Track | None],
    ) -> None:
        """Send reserved entries; refused ones (not ready any more) go back to ``queue``."""
        try:
            results = await self._send([(p, entries[i]) for i, p, _ in batch])
        except BaseException:
            for _, _, track in batch:
                self._release(track)
            raise
        error: BaseException | None = None
        for (index, proc, track), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                self._release(track)
                error = error or result
            elif result is None:  # no longer ready: choose again
                self._release(track)
                proc.routable = False
                queue.append(index)
            else:
                self._learned(track, proc.id, text(result))
                done[index] = track
        if error is not None:
            if isinstance(error, REDIS_DOWN):
                raise self._down(error) from error
            raise error

    def _learned(self, track: Track, processor_id: str, entry_id: str) -> None:
        """``track``'s request is entry ``entry_id`` of ``processor_id``'s stream (known once
        the ``XADD`` replied). A request that ended meanwhile (its result can be read before
        the reply of the ``XADD`` that sent it) gets it remembered as an ended request's."""
        track.message_id = entry_id
        track.entries.append((processor_id, entry_id))
        if self._routed.get(track.frame_id) is not track:
            self._reader.ended.add(track.frame_id, [(processor_id, entry_id)])

    async def _send(self, items: list[tuple[Registration, dict[str, bytes | str]]]) -> list[Any]:
        """XADD each entry to its processor's stream (Lua by SHA, only while ready), written
        at once on the registry's route connection: concurrent routes pipeline by themselves.
        Results: message id, None (not ready) or an exception."""
        wire = self._routes
        if wire is None:
            self._require()
            raise ProcessorRegistryError("the registry is not started")
        calls = []
        for proc, fields in items:
            args: list[bytes | str] = [proc.hash_key, proc.stream]
            for pair in fields.items():
                args += pair
            calls.append(args)
        try:
            return await wire.run_many(ROUTE, calls, keys=2)
        except Exception as exc:
            return [exc] * len(items)

    async def route(
        self, item: Routable, capability: str, *, wait: float | None = None, quality: int = 85
    ) -> str:
        """Send one frame to the least loaded live processor offering ``capability``; returns
        the stream message id. The result goes to the processor's result stream (and releases
        the capacity here). Waits up to ``wait`` (default ``route_timeout``) for free capacity.
        Raises NoProcessorError, CircuitOpenError, NoCapacityError, RegistryConnectionError."""
        return (
            await self._dispatch([item], capability, wait=wait, want_futures=False, quality=quality)
        )[0].message_id

    async def route_many(
        self,
        items: Sequence[Routable],
        capability: str,
        *,
        wait: float | None = None,
        quality: int = 85,
    ) -> list[str]:
        """:meth:`route` for a batch, written in pipelines; message ids in the items' order.
        Frames are sent as capacity frees up; ``wait`` bounds each wait for capacity."""
        tracks = await self._dispatch(
            items, capability, wait=wait, want_futures=False, quality=quality
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
        processor by its circuit breaker."""
        track = (
            await self._dispatch([item], capability, wait=wait, want_futures=True, quality=quality)
        )[0]
        assert track.future is not None
        limit = self.result_timeout if timeout is None else timeout
        track.timeout = limit
        future = track.future
        # on time, _expire fails the future with ResultTimeoutError (no task cancellation)
        timer = asyncio.get_running_loop().call_later(limit, self._expire, track, limit)
        try:
            return await future
        finally:
            timer.cancel()
            if not track.future.done():  # cancelled caller: forget the frame's future
                track.future.cancel()

    def _expire(self, track: Track, timeout: float) -> None:
        if self._routed.get(track.frame_id) is not track:
            return  # its result came (or the registry stopped) meanwhile
        self._release(track)
        proc = self._procs.get(track.processor_id)
        if proc is not None:
            proc.breaker.failed(f"no result within {timeout:g}s")
        if track.future is not None and not track.future.done():
            track.future.set_exception(
                ResultTimeoutError(
                    frame_id=track.frame_id,
                    capability=track.capability,
                    processor_id=track.processor_id,
                    timeout=timeout,
                )
            )
