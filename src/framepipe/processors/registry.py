"""``ProcessorRegistry``: the orchestrator's side of remote processors, and its router.

Processors (:class:`~framepipe.processors.client.ProcessorClient` subclasses, in any process on
any machine) register themselves on Redis; a registry reads the registrations, routes frames to
them and collects their results. Several registries may share a namespace: each has its own
reply stream and keeps its own count of the frames it has in flight per processor.

Routing (:meth:`ProcessorRegistry.route`, :meth:`~ProcessorRegistry.route_many`,
:meth:`~ProcessorRegistry.call`):

* Among the ``ready`` processors offering the capability, whose circuit breaker lets frames
  through and that have free capacity (``capacity`` minus the frames this registry routed to
  them and has no result for yet), the least loaded one gets the frame, by one atomic Lua
  ``XADD`` to its dedicated stream that only succeeds while it is ``ready`` (the script runs
  by its SHA). Routes go out at once on the registry's own connection to Redis, so concurrent
  ones are pipelined; ``route_many`` writes its batch in one go.
* No live processor offers the capability: :class:`~framepipe.errors.NoProcessorError` at once,
  naming the capability and those on offer. Every processor offering it has its breaker open:
  :class:`~framepipe.errors.CircuitOpenError` at once. All busy: the route **waits** for free
  capacity, up to ``route_timeout`` (or the ``wait`` argument), then
  :class:`~framepipe.errors.NoCapacityError`.
* Redis unreachable at start: :class:`~framepipe.errors.RegistryConnectionError` naming the URL
  after ``connect_retries`` retries; during a route: the same error at once (the caller
  decides); the background tasks reconnect with backoff by themselves.

Health (a background task every ``poll_interval``):

* A processor whose heartbeat has not changed for ``heartbeat_timeout`` seconds (measured on this
  registry's clock, so machine clocks need not agree) is marked ``dead`` and deregistered; every
  entry left in its stream (pending in its consumer group or not yet delivered) is re-routed to
  another live processor with the entry's capability (regardless of free capacity: it has
  waited already), then acknowledged and deleted there; no frame is lost as long as a processor
  with the capability lives (entries wait in the dead stream until one does). A frame that has
  been on ``max_attempts`` processors that died gets an error result (``error_kind`` ``lost``)
  instead of killing more. The stream of a processor that stopped gracefully with entries left
  is handled the same way.
* Circuit breaker per processor: after ``circuit_failures`` consecutive failed results (the
  processor raised, returned a bad result, or gave no result within the timeout; malformed
  input does not count) it is ``open`` and gets no frame for ``circuit_reset`` seconds, then
  ``half_open``: one trial frame; success closes it, failure opens it again.
* Results arrive on the registry's reply stream (read by one blocking ``XREAD`` loop on a
  connection of its own; the health watch trims the entries read, ``MAXLEN ~ 10000`` bounds
  it meanwhile) and resolve the awaiting :meth:`call` (and
  :class:`~framepipe.processors.remote.RemoteProcessor`) by ``frame_id``; a result that does not
  come within ``result_timeout`` (or the call's timeout) fails the call with
  :class:`~framepipe.errors.ResultTimeoutError`.

A background task that dies of a bug fails the registry loudly: it is logged, every waiting
call fails with the error, and later calls raise it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import redis.asyncio as aioredis  # the client module gave the fix-it message if missing
from redis.exceptions import ResponseError

from framepipe.backoff import Backoff
from framepipe.errors import (
    CircuitOpenError,
    NoCapacityError,
    NoProcessorError,
    ProcessorRegistryError,
    RegistryConnectionError,
    RemoteProcessingError,
    ResultTimeoutError,
)
from framepipe.frames import Frame
from framepipe.logs import get_logger
from framepipe.processors.client import (
    CLEANUP_LUA,
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
    GROUP,
    MARK_DEAD_LUA,
    REDIS_DOWN,
    ROUTE,
    Keys,
    ProcessorState,
    Wire,
    connect,
    new_traceparent,
    parse_traceparent,
    ping_with_retries,
    stream_entries,
)
from framepipe.redis import safe_url

__all__ = [
    "CircuitState",
    "ProcessorInfo",
    "ProcessorRegistry",
    "ProcessorResult",
    "Routable",
    "frame_entry",
]

Routable = Frame | Mapping[str, Any] | Mapping[bytes, Any]
"""What can be routed: a :class:`Frame` (sent as JPEG), or a frame entry as a dict of fields."""

INLINE_ENCODE_PIXELS = 256 * 256
"""Frames up to this many pixels are JPEG-encoded on the event loop (at most about 0.2 ms
here; the hand-off to a thread costs more than that); larger ones in the default executor."""

REAPER = "framepipe-reaper"
"""The consumer name the registry claims a dead processor's entries under."""


class CircuitState:
    """States of a processor's circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def frame_entry(frame: Frame, *, quality: int = 85,
                trace_context: str | None = None) -> dict[str, bytes | str]:
    """The stream fields of ``frame``: JPEG ``image_data``, ``width``, ``height``, ``format``,
    ``camera_id`` (the source id), ISO ``timestamp``, ``metadata`` (seq, ts_ms, pts,
    segment_id and the frame's ``meta``, as JSON) and ``trace_context`` (given, or the frame's
    ``meta["trace_context"]``, or a new one). ``frame_id`` is ``<source>:<seq>:<random>``."""
    trace = (trace_context or parse_traceparent(frame.meta.get("trace_context"))
             or new_traceparent())
    meta = {"seq": frame.seq, "ts_ms": frame.ts_ms, "pts": frame.pts,
            "segment_id": frame.segment_id, "meta": frame.meta}
    stamp = datetime.fromtimestamp(frame.ts_ms / 1000.0, tz=UTC).isoformat(timespec="milliseconds")
    return {"frame_id": f"{frame.source_id}:{frame.seq}:{secrets.token_hex(4)}",
            "camera_id": frame.source_id, "timestamp": stamp,
            "image_data": frame.to_jpeg(quality), "width": str(frame.width),
            "height": str(frame.height), "format": "jpeg",
            "metadata": json.dumps(meta, default=repr), "trace_context": trace}


def _entry_fields(item: Mapping[Any, Any]) -> dict[str, bytes | str]:
    """A user's entry dict as stream fields; fills ``frame_id`` and ``trace_context``."""
    out: dict[str, bytes | str] = {}
    for key, value in item.items():
        name = key if type(key) is str else _text(key)
        kind = type(value)
        if kind is bytes or kind is str:
            out[name] = value
        elif value is None:
            continue
        elif isinstance(value, bytes | str):
            out[name] = value
        elif isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, int | float):
            out[name] = str(value)
        elif isinstance(value, dict | list | tuple):
            out[name] = json.dumps(value)
        else:
            raise TypeError(f"entry field {name!r}: cannot send a {type(value).__name__}")
    if not out.get("frame_id"):
        out["frame_id"] = uuid.uuid4().hex
    if not out.get("trace_context"):
        out["trace_context"] = new_traceparent()
    out.setdefault("format", "jpeg")
    return out


@dataclass(frozen=True)
class ProcessorResult:
    """One processor's result for one frame, as read from the reply stream."""

    frame_id: str
    processor_id: str
    ok: bool
    data: dict[str, Any] | None
    """What ``process_frame`` returned (None: it returned None, or the frame failed)."""
    error: str | None
    error_kind: str | None
    """``processor``, ``output``, ``input`` or ``lost`` (see RemoteProcessingError)."""
    trace_context: str
    camera_id: str = ""
    capability: str = ""
    duration_ms: float = 0.0
    entry_id: str = ""

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> ProcessorResult:
        """Parse a result entry (raises ValueError when it is not one)."""
        if b"frame_id" not in fields or b"status" not in fields:
            raise ValueError(f"not a result entry: fields {sorted(fields)}")
        get = fields.get
        raw = get(b"result")
        error = get(b"error")
        kind = get(b"error_kind")
        return cls(frame_id=fields[b"frame_id"].decode("utf-8", "replace"),
                   processor_id=get(b"processor_id", b"").decode("utf-8", "replace"),
                   ok=fields[b"status"] == b"ok",
                   data=json.loads(raw.decode("utf-8")) if raw else None,
                   error=error.decode("utf-8", "replace") if error else None,
                   error_kind=kind.decode("utf-8", "replace") if kind else None,
                   trace_context=get(b"trace_context", b"").decode("utf-8", "replace"),
                   camera_id=get(b"camera_id", b"").decode("utf-8", "replace"),
                   capability=get(b"capability", b"").decode("utf-8", "replace"),
                   duration_ms=float(get(b"duration_ms") or 0.0),
                   entry_id=get(b"entry_id", b"").decode("utf-8", "replace"))

    def check(self) -> ProcessorResult:
        """This result; :class:`RemoteProcessingError` when it reports an error."""
        if not self.ok:
            raise RemoteProcessingError(self.error or "error", frame_id=self.frame_id,
                                        processor_id=self.processor_id,
                                        kind=self.error_kind or "processor")
        return self


@dataclass(frozen=True)
class ProcessorInfo:
    """A registered processor as this registry sees it."""

    processor_id: str
    capabilities: tuple[str, ...]
    capacity: int
    state: str
    """``ready``, ``draining``, ``stopped``, ``dead`` (or ``deregistered``: gone)."""
    circuit: str
    outstanding: int
    """Frames this registry routed to it without a result yet."""
    in_flight: int
    """Frames in ``process_frame`` at its last heartbeat."""
    processed: int
    failed: int
    consecutive_failures: int
    last_heartbeat: float | None
    result_stream: str
    stream: str
    pid: int | None
    host: str

    @property
    def free(self) -> int:
        """Capacity left for this registry's frames."""
        return max(0, self.capacity - self.outstanding)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"processor_id": self.processor_id, "capabilities": list(self.capabilities),
                "capacity": self.capacity, "state": self.state, "circuit": self.circuit,
                "outstanding": self.outstanding, "in_flight": self.in_flight,
                "processed": self.processed, "failed": self.failed,
                "consecutive_failures": self.consecutive_failures,
                "last_heartbeat": self.last_heartbeat, "result_stream": self.result_stream,
                "stream": self.stream, "pid": self.pid, "host": self.host}


@dataclass
class _Proc:
    id: str
    keys: Keys
    capabilities: frozenset[str] = frozenset()
    capability_order: tuple[str, ...] = ()
    capacity: int = 1
    state: str = ProcessorState.READY
    routable: bool = True
    result_stream: str = ""
    stream: str = ""
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    pid: int | None = None
    host: str = ""
    hb_value: bytes | None = None
    hb_seen_at: float = 0.0
    outstanding: set[str] = field(default_factory=set)
    failures: int = 0
    circuit: str = CircuitState.CLOSED
    opened_at: float = 0.0
    trial: str | None = None
    last_routed: float = 0.0
    hash_key: str = ""

    def __post_init__(self) -> None:
        self.hash_key = self.keys.proc(self.id)

    def update(self, h: Mapping[bytes, bytes], now: float) -> None:
        try:
            caps = json.loads(h.get(b"capabilities") or b"[]")
        except ValueError:
            caps = []
        self.capability_order = tuple(str(c) for c in caps) if isinstance(caps, list) else ()
        self.capabilities = frozenset(self.capability_order)
        self.capacity = max(1, _int(h.get(b"capacity"), 1))
        self.state = _text(h.get(b"state")) or ProcessorState.READY
        self.routable = True  # a refused route made it False until Redis was read again
        self.result_stream = _text(h.get(b"result_stream"))
        self.stream = _text(h.get(b"stream")) or self.keys.frames(self.id)
        self.in_flight = _int(h.get(b"in_flight"), 0)
        self.processed = _int(h.get(b"processed"), 0)
        self.failed = _int(h.get(b"failed"), 0)
        self.pid = _int(h.get(b"pid"), 0) or None
        self.host = _text(h.get(b"host"))
        hb = h.get(b"last_heartbeat")
        if hb != self.hb_value:
            self.hb_value = hb
            self.hb_seen_at = now

    @property
    def live(self) -> bool:
        return self.state == ProcessorState.READY and self.routable

    @property
    def free(self) -> int:
        return self.capacity - len(self.outstanding)

    def info(self, state: str | None = None) -> ProcessorInfo:
        hb = None
        with contextlib.suppress(TypeError, ValueError):
            hb = float(self.hb_value) if self.hb_value else None
        return ProcessorInfo(
            processor_id=self.id, capabilities=self.capability_order, capacity=self.capacity,
            state=state or self.state, circuit=self.circuit, outstanding=len(self.outstanding),
            in_flight=self.in_flight, processed=self.processed, failed=self.failed,
            consecutive_failures=self.failures, last_heartbeat=hb,
            result_stream=self.result_stream, stream=self.stream, pid=self.pid, host=self.host)


def _int(value: bytes | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


@dataclass
class _Track:
    frame_id: str
    processor_id: str
    capability: str
    routed_at: float
    future: asyncio.Future[ProcessorResult] | None
    timeout: float
    message_id: str = ""




class ProcessorRegistry:
    """Registered processors on Redis, a router by capability and free capacity, and the
    health watch; see the module docstring for the guarantees.

    Use it as ``async with ProcessorRegistry(url) as registry:`` (or ``start()``/``stop()``).
    ``heartbeat_timeout`` must exceed the processors' ``health_interval`` a few times over.
    """

    def __init__(self, redis_url: str = DEFAULT_REDIS_URL,
                 namespace: str = DEFAULT_NAMESPACE, *, heartbeat_timeout: float = 15.0,
                 circuit_failures: int = 5, circuit_reset: float = 30.0,
                 route_timeout: float = 10.0, result_timeout: float = 30.0,
                 poll_interval: float | None = None, max_attempts: int = 3,
                 connect_retries: int = 3, backoff: Backoff | None = None,
                 registry_id: str | None = None) -> None:
        if heartbeat_timeout <= 0 or circuit_reset < 0 or result_timeout <= 0:
            raise ValueError("heartbeat_timeout and result_timeout must be positive, "
                             "circuit_reset not negative")
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
        self._redis: aioredis.Redis | None = None
        self._procs: dict[str, _Proc] = {}
        self._departed: collections.OrderedDict[str, ProcessorInfo] = collections.OrderedDict()
        self._routed: dict[str, _Track] = {}
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
        self._waiting_logged: set[str] = set()
        self._reply_read: bytes | str = ""  # the last reply entry read (trimmed by the watch)
        self._reply_trimmed: bytes | str = ""

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
            await ping_with_retries(redis, self.redis_url, retries=self.connect_retries,
                                    backoff=self.backoff, what="processor registry")
        except BaseException:
            await redis.aclose()
            raise
        self._redis = redis
        self._routes, self._replies = Wire(redis), Wire(redis)
        await self.refresh()
        for coro, name in ((self._reply_loop(), "replies"), (self._watch_loop(), "watch")):
            task = asyncio.create_task(coro, name=f"registry-{self.registry_id}:{name}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)
        self.log.info("Registry %s started on %s (namespace %r): %d processor(s)",
                      self.registry_id, safe_url(self.redis_url), self.namespace,
                      len(self._procs))

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
                track.future.set_exception(ProcessorRegistryError(
                    f"registry stopped before the result of frame {track.frame_id} arrived"))
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
        self.log.error("registry task %s died: %r; the registry is failed", task.get_name(), exc,
                       exc_info=exc)
        error = ProcessorRegistryError(f"registry task {task.get_name()} died: "
                                       f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        for track in list(self._routed.values()):
            if track.future is not None and not track.future.done():
                track.future.set_exception(error)
        self._notify()

    def _require(self) -> aioredis.Redis:
        if self._failed is not None:
            raise ProcessorRegistryError(f"the registry failed: {type(self._failed).__name__}: "
                                         f"{self._failed}") from self._failed
        if self._redis is None:
            raise ProcessorRegistryError("the registry is not started: use 'async with "
                                         "ProcessorRegistry(...)' or 'await registry.start()'")
        return self._redis

    def _down(self, exc: BaseException) -> RegistryConnectionError:
        return RegistryConnectionError(
            f"processor registry: lost Redis at {safe_url(self.redis_url)}: "
            f"{type(exc).__name__}: {exc}", url=safe_url(self.redis_url))

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
            ids, hashes = await asyncio.shield(self._read_registrations(redis))
        except REDIS_DOWN as exc:
            raise self._down(exc) from exc
        now = time.monotonic()
        seen = set()
        for pid, h in zip(ids, hashes, strict=True):
            if not h:
                continue
            proc = self._procs.get(pid)
            if proc is None:
                proc = self._procs[pid] = _Proc(pid, self.keys, hb_seen_at=now)
                self._departed.pop(pid, None)
            proc.update(h, now)
            seen.add(pid)
        for pid in set(self._procs) - seen:
            self._depart(self._procs[pid])
        self._notify()
        return self.processors(include_departed=False)

    async def _read_registrations(
            self, redis: aioredis.Redis) -> tuple[list[str], list[dict[bytes, bytes]]]:
        ids = sorted(_text(i) for i in await redis.smembers(self.keys.processors))
        async with redis.pipeline(transaction=False) as pipe:
            for pid in ids:
                pipe.hgetall(self.keys.proc(pid))
            hashes = await pipe.execute()
        return ids, hashes

    def _depart(self, proc: _Proc) -> None:
        gone = proc.state if proc.state == ProcessorState.DEAD else "deregistered"
        self._procs.pop(proc.id, None)
        self._departed[proc.id] = proc.info(gone)
        while len(self._departed) > 100:
            self._departed.popitem(last=False)

    def processors(self, *, include_departed: bool = True) -> list[ProcessorInfo]:
        """The processors as of the last refresh, with their state and circuit; with
        ``include_departed`` also the last 100 that left (state ``dead`` or ``deregistered``)."""
        now = time.monotonic()
        for proc in self._procs.values():
            self._circuit(proc, now)
        infos = [p.info() for p in self._procs.values()]
        if include_departed:
            infos += [i for pid, i in self._departed.items() if pid not in self._procs]
        return sorted(infos, key=lambda i: i.processor_id)

    def capabilities(self) -> dict[str, list[str]]:
        """Capability -> ids of the live processors offering it."""
        out: dict[str, list[str]] = {}
        for proc in sorted(self._procs.values(), key=lambda p: p.id):
            if proc.live:
                for cap in proc.capability_order:
                    out.setdefault(cap, []).append(proc.id)
        return out

    async def wait_for_processor(self, capability: str,
                                 timeout: float = 10.0) -> ProcessorInfo:  # noqa: ASYNC109
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

    # -- circuit breaker ----------------------------------------------------------------------

    def _circuit(self, proc: _Proc, now: float) -> str:
        if proc.circuit == CircuitState.OPEN and now - proc.opened_at >= self.circuit_reset:
            proc.circuit = CircuitState.HALF_OPEN
            proc.trial = None
            self.log.info("Processor %s: circuit half-open, one trial frame next", proc.id)
        return proc.circuit

    def _record(self, proc: _Proc, result: ProcessorResult) -> None:
        if result.ok:
            if proc.circuit != CircuitState.CLOSED:
                self.log.info("Processor %s: circuit closed (trial frame succeeded)", proc.id)
            proc.failures = 0
            proc.circuit = CircuitState.CLOSED
        elif result.error_kind != "input":
            self._failure(proc, result.error or "error")

    def _failure(self, proc: _Proc, reason: str) -> None:
        proc.failures += 1
        trial_failed = proc.circuit == CircuitState.HALF_OPEN
        if trial_failed or (proc.circuit == CircuitState.CLOSED
                            and proc.failures >= self.circuit_failures):
            proc.circuit = CircuitState.OPEN
            proc.opened_at = time.monotonic()
            proc.trial = None
            self.log.warning("Processor %s: circuit open after %d consecutive failure(s) (last: "
                             "%s); no frames for %.1fs", proc.id, proc.failures, reason,
                             self.circuit_reset)
            self._notify()

    # -- routing ------------------------------------------------------------------------------

    def _choose(self, capability: str, *, exclude: Iterable[str] = (),
                ignore_capacity: bool = False) -> _Proc | None:
        """The processor for the next frame; None when all are busy."""
        excluded = set(exclude)
        live = [p for p in self._procs.values() if p.live]
        candidates = [p for p in live if capability in p.capabilities and p.id not in excluded]
        if not candidates:
            raise NoProcessorError(capability, sorted({c for p in live for c in p.capabilities}))
        now = time.monotonic()
        usable: list[_Proc] = []
        all_open = True
        for proc in candidates:
            state = self._circuit(proc, now)
            if state == CircuitState.OPEN:
                continue
            all_open = False
            if state == CircuitState.HALF_OPEN and proc.trial is not None:
                continue
            if proc.free <= 0 and not ignore_capacity:
                continue
            usable.append(proc)
        if not usable:
            if all_open:
                retry_in = min(p.opened_at + self.circuit_reset - now for p in candidates)
                raise CircuitOpenError(capability, sorted(p.id for p in candidates),
                                       max(0.0, retry_in))
            return None
        return min(usable, key=lambda p: (p.free <= 0, len(p.outstanding) / p.capacity,
                                          len(p.outstanding), p.in_flight, p.last_routed))

    def _reserve(self, proc: _Proc, fields: dict[str, bytes | str], capability: str,
                 want_future: bool) -> _Track:
        frame_id = _text(fields["frame_id"])
        future = asyncio.get_running_loop().create_future() if want_future else None
        now = time.monotonic()
        track = _Track(frame_id, proc.id, capability, now, future, self.result_timeout)
        if proc.circuit == CircuitState.HALF_OPEN:
            proc.trial = frame_id
        proc.outstanding.add(frame_id)
        proc.last_routed = now
        self._routed[frame_id] = track
        fields["capability"] = capability
        fields["reply_to"] = self.reply_stream
        fields.setdefault("attempt", "1")
        fields["routed_at"] = repr(time.time())
        return track

    def _release(self, track: _Track) -> None:
        if self._routed.get(track.frame_id) is track:
            del self._routed[track.frame_id]
        proc = self._procs.get(track.processor_id)
        if proc is not None:
            proc.outstanding.discard(track.frame_id)
            if proc.trial == track.frame_id:
                proc.trial = None
        self._notify()

    async def _fields(self, item: Routable, quality: int) -> dict[str, bytes | str]:
        if isinstance(item, Frame):
            if item.width * item.height <= INLINE_ENCODE_PIXELS:
                return frame_entry(item, quality=quality)
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: frame_entry(item, quality=quality))
        if isinstance(item, Mapping):
            return _entry_fields(item)
        raise TypeError(f"cannot route a {type(item).__name__}: give a Frame or an entry dict")

    async def _dispatch(self, items: Sequence[Routable], capability: str, *,
                        wait: float | None, want_futures: bool, quality: int) -> list[_Track]:
        """Route ``items`` as capacity allows; every reservation is either sent or released.
        Routes that have to wait for capacity queue per capability: a free slot goes to the
        first in line, never to a route that came later."""
        self._require()
        entries = [_entry_fields(item) if isinstance(item, Mapping)
                   else await self._fields(item, quality) for item in items]
        if len(entries) == 1:
            frame_id = _text(entries[0]["frame_id"])
            clash = [frame_id] if frame_id in self._routed else []
        else:
            counts = collections.Counter(_text(e["frame_id"]) for e in entries)
            clash = sorted(i for i, n in counts.items() if n > 1 or i in self._routed)
        if clash:
            raise ValueError(f"frame ids must be unique among the frames in flight: {clash}")
        limit = self.route_timeout if wait is None else wait
        deadline = time.monotonic() + limit
        queue = collections.deque(range(len(entries)))
        done: list[_Track | None] = [None] * len(entries)
        refreshed = False
        ticket: int | None = None  # this route's place in the capability's line, once waiting
        try:
            while queue:
                batch: list[tuple[int, _Proc, _Track]] = []
                while queue:
                    try:
                        proc = self._choose(capability)
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
                    batch.append((index, proc, self._reserve(proc, entries[index], capability,
                                                             want_futures)))
                if batch:
                    await self._send_batch(batch, entries, queue, done)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoCapacityError(capability, sorted(
                        p.id for p in self._procs.values()
                        if p.live and capability in p.capabilities), limit)
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

    async def _send_batch(self, batch: list[tuple[int, _Proc, _Track]],
                          entries: list[dict[str, bytes | str]], queue: collections.deque[int],
                          done: list[_Track | None]) -> None:
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
                track.message_id = _text(result)
                done[index] = track
        if error is not None:
            if isinstance(error, REDIS_DOWN):
                raise self._down(error) from error
            raise error

    async def _send(self, items: list[tuple[_Proc, dict[str, bytes | str]]]) -> list[Any]:
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

    async def route(self, item: Routable, capability: str, *, wait: float | None = None,
                    quality: int = 85) -> str:
        """Send one frame to the least loaded live processor offering ``capability``; returns
        the stream message id. The result goes to the processor's result stream (and releases
        the capacity here). Waits up to ``wait`` (default ``route_timeout``) for free capacity.
        Raises NoProcessorError, CircuitOpenError, NoCapacityError, RegistryConnectionError."""
        return (await self._dispatch([item], capability, wait=wait, want_futures=False,
                                     quality=quality))[0].message_id

    async def route_many(self, items: Sequence[Routable], capability: str, *,
                         wait: float | None = None, quality: int = 85) -> list[str]:
        """:meth:`route` for a batch, written in pipelines; message ids in the items' order.
        Frames are sent as capacity frees up; ``wait`` bounds each wait for capacity."""
        tracks = await self._dispatch(items, capability, wait=wait, want_futures=False,
                                      quality=quality)
        return [t.message_id for t in tracks]

    async def call(self, item: Routable, capability: str, *,
                   timeout: float | None = None,  # noqa: ASYNC109 - a result timeout
                   wait: float | None = None, quality: int = 85) -> ProcessorResult:
        """Route one frame and wait for its result (``ok`` or not: see
        :meth:`ProcessorResult.check`). No result within ``timeout`` (default
        ``result_timeout``): :class:`ResultTimeoutError`, counted as a failure of the
        processor by its circuit breaker."""
        track = (await self._dispatch([item], capability, wait=wait, want_futures=True,
                                      quality=quality))[0]
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

    def _expire(self, track: _Track, timeout: float) -> None:
        if self._routed.get(track.frame_id) is not track:
            return  # its result came (or the registry stopped) meanwhile
        self._release(track)
        proc = self._procs.get(track.processor_id)
        if proc is not None:
            self._failure(proc, f"no result within {timeout:g}s")
        if track.future is not None and not track.future.done():
            track.future.set_exception(ResultTimeoutError(
                frame_id=track.frame_id, capability=track.capability,
                processor_id=track.processor_id, timeout=timeout))

    # -- results ------------------------------------------------------------------------------

    async def _reply_loop(self) -> None:
        wire = self._replies
        assert wire is not None
        last: bytes | str = "0-0"
        failures = 0
        while not self._closed:
            try:
                reply = await wire.execute("XREAD", "COUNT", 500, "BLOCK", 1000, "STREAMS",
                                           self.reply_stream, last, block=1.0)
            except REDIS_DOWN as exc:
                if self._closed:
                    return
                failures += 1
                if failures == 1:
                    self.log.warning("reply stream: Redis at %s unreachable (%s); retrying",
                                     safe_url(self.redis_url), exc)
                await asyncio.sleep(self.backoff.delay(failures))
                continue
            if failures:
                self.log.info("reply stream: Redis reachable again")
                failures = 0
            if reply:
                for mid, fields in stream_entries(reply):
                    last = self._reply_read = mid
                    if fields is not None:
                        self._on_reply(fields)

    def _on_reply(self, fields: Mapping[bytes, bytes]) -> None:
        try:
            result = ProcessorResult.from_fields(fields)
        except (ValueError, TypeError) as exc:
            self.log.warning("malformed entry on the reply stream ignored: %s", exc)
            return
        proc = self._procs.get(result.processor_id)
        if proc is not None:
            self._record(proc, result)
        track = self._routed.get(result.frame_id)
        if track is None:
            return  # a duplicate (re-routed frame), or one whose wait expired
        self._release(track)
        if track.future is not None and not track.future.done():
            track.future.set_result(result)

    # -- health watch -------------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        failures = 0
        while not self._closed:
            await asyncio.sleep(self.poll_interval)
            if self._closed:
                return
            try:
                await self._tick()
            except RegistryConnectionError as exc:
                failures += 1
                if failures == 1:
                    self.log.warning("health watch: %s; retrying", exc)
                continue
            except REDIS_DOWN as exc:
                failures += 1
                if failures == 1:
                    self.log.warning("health watch: Redis unreachable (%s); retrying", exc)
                continue
            if failures:
                self.log.info("health watch: Redis reachable again")
                failures = 0

    async def _tick(self) -> None:
        redis = self._require()
        await self.refresh()
        now = time.monotonic()
        for proc in list(self._procs.values()):
            silent = now - proc.hb_seen_at
            if (proc.state in (ProcessorState.READY, ProcessorState.DRAINING)
                    and silent > self.heartbeat_timeout):
                marked = await redis.eval(
                    MARK_DEAD_LUA, 2, self.keys.proc(proc.id), self.keys.processors, proc.id,
                    proc.hb_value or b"")
                if marked:
                    proc.state = ProcessorState.DEAD
                    self.log.warning("Processor %s silent for %.1fs (heartbeat_timeout %.1fs): "
                                     "deregistered as dead; re-routing its frames", proc.id,
                                     silent, self.heartbeat_timeout)
            if proc.state in (ProcessorState.DEAD, ProcessorState.STOPPED):
                await self._reap(proc)
        await self._trim_replies()
        for track in list(self._routed.values()):  # call() expires its own, on time
            if now - track.routed_at > track.timeout + self.poll_interval:
                self._expire(track, track.timeout)

    async def _trim_replies(self) -> None:
        """Remove the reply entries already read (once per tick rather than an XDEL per
        batch on the hot path); MAXLEN ~ 10,000 on every reply bounds it meanwhile."""
        read = self._reply_read
        if not read or read == self._reply_trimmed:
            return
        ms, _, seq = _text(read).partition("-")
        await self._require().xtrim(self.reply_stream, minid=f"{ms}-{int(seq or 0) + 1}")
        self._reply_trimmed = read

    async def _reap(self, proc: _Proc) -> None:
        """Re-route what is left in a dead or stopped processor's stream, then remove it."""
        redis = self._require()
        entries: dict[bytes, dict[bytes, bytes]] = {}
        delivered: set[bytes] = set()  # were in a processor's hands (it may have died of them)
        try:
            for row in await redis.xpending_range(proc.stream, GROUP, "-", "+", 10_000):
                consumer = row["consumer"]
                if (consumer.decode() if isinstance(consumer, bytes) else consumer) != REAPER:
                    mid = row["message_id"]
                    delivered.add(mid if isinstance(mid, bytes) else str(mid).encode())
            start: bytes | str = "0-0"
            while True:
                reply = await redis.xautoclaim(proc.stream, GROUP, REAPER, 0, start_id=start,
                                               count=200)
                start = reply[0]
                entries.update((mid, f) for mid, f in reply[1] if f is not None)
                if start in (b"0-0", "0-0"):
                    break
            while True:
                fresh = await redis.xreadgroup(GROUP, REAPER, {proc.stream: ">"}, count=200)
                got = [(mid, f) for _s, es in cast(list[Any], fresh or []) for mid, f in es
                       if f is not None]
                if not got:
                    break
                entries.update(got)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        if entries and not await self._reroute(proc, entries, delivered):
            return  # some wait for a live processor; try again at the next tick
        removed = await redis.eval(
            CLEANUP_LUA, 3, self.keys.proc(proc.id), proc.stream, self.keys.processors,
            proc.id, ProcessorState.DEAD, ProcessorState.STOPPED)
        if removed == 1:
            self.log.info("Processor %s removed (%s)", proc.id, proc.state)
            self._depart(proc)

    async def _reroute(self, dead: _Proc, entries: dict[bytes, dict[bytes, bytes]],
                       delivered: set[bytes]) -> bool:
        """Send ``entries`` of ``dead`` to other processors; True when none is left. Entries in
        ``delivered`` count one more attempt (a frame that kills its processors is given up
        after ``max_attempts``); entries it never took keep theirs."""
        redis = self._require()
        plan: list[tuple[bytes, _Proc, dict[str, bytes | str], _Track | None]] = []
        finished: list[bytes] = []
        left = 0
        for mid, raw in entries.items():
            fields: dict[str, bytes | str] = {_text(k): v for k, v in raw.items()}
            frame_id = _text(fields.get("frame_id"))
            capability = _text(fields.get("capability")) or next(
                iter(dead.capability_order), "")
            attempt = _int(raw.get(b"attempt"), 1) + (1 if mid in delivered else 0)
            if attempt > self.max_attempts:
                await self._give_up(dead, mid, raw, attempt - 1)
                finished.append(mid)
                continue
            try:
                target = self._choose(capability, exclude=[dead.id], ignore_capacity=True)
            except (NoProcessorError, CircuitOpenError):
                target = None
            if target is None:
                left += 1
                continue
            fields["attempt"] = str(attempt)
            fields["rerouted_from"] = dead.id
            track = self._routed.get(frame_id)
            if track is not None and track.processor_id == dead.id:
                dead.outstanding.discard(frame_id)
                target.outstanding.add(frame_id)
                track.processor_id = target.id
            else:
                track = None
            plan.append((mid, target, fields, track))
        if plan:
            results = await self._send([(t, f) for _, t, f, _ in plan])
            for (mid, target, fields, track), result in zip(plan, results, strict=True):
                if isinstance(result, BaseException) or result is None:
                    left += 1
                    if track is not None:  # back to the dead one; retried next tick
                        target.outstanding.discard(track.frame_id)
                        dead.outstanding.add(track.frame_id)
                        track.processor_id = dead.id
                    if isinstance(result, REDIS_DOWN):
                        raise result
                    continue
                finished.append(mid)
                self.log.info("Re-routed frame %s from %s to %s (attempt %s)",
                              _text(fields.get("frame_id")), dead.id, target.id,
                              _text(fields.get("attempt")))
        if finished:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xack(dead.stream, GROUP, *finished)
                pipe.xdel(dead.stream, *finished)
                await pipe.execute()
        if left:
            if dead.id not in self._waiting_logged:
                self._waiting_logged.add(dead.id)
                self.log.warning("%d frame(s) of %s wait for a live processor with their "
                                 "capability", left, dead.id)
        else:
            self._waiting_logged.discard(dead.id)
        return left == 0

    async def _give_up(self, dead: _Proc, mid: bytes, raw: Mapping[bytes, bytes],
                       attempts: int) -> None:
        frame_id = _text(raw.get(b"frame_id"))
        self.log.error("Frame %s was on %d processors that died (last: %s); giving up on it",
                       frame_id, attempts, dead.id)
        reply_to = raw.get(b"reply_to")
        if not reply_to:
            return
        payload = {"frame_id": raw.get(b"frame_id", b""), "camera_id": raw.get(b"camera_id", b""),
                   "processor_id": dead.id, "capability": raw.get(b"capability", b""),
                   "status": "error", "error_kind": "lost",
                   "error": f"the frame was on {attempts} processors that died (last: "
                            f"{dead.id}); given up",
                   "trace_context": raw.get(b"trace_context", b""), "entry_id": mid,
                   "duration_ms": "0", "processed_at": repr(time.time())}
        await self._require().xadd(_text(reply_to), payload,  # type: ignore[arg-type]
                                   maxlen=10_000, approximate=True)

