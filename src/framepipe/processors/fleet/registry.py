"""Registrations: each processor's record in Redis, as its processor writes it and as a router
mirrors it.

A processor's record is its hash (``<ns>:proc:<id>``: capabilities, capacity, ``state``,
heartbeat and counters, pid and host) and its id in the set ``<ns>:processors``. The processor
writes it (:func:`register`, :func:`heartbeat`, :func:`set_state`, :func:`deregister`); a
router reads every record each poll into :class:`Registrations`, its mirror, where each
processor is a :class:`Registration` carrying the router's own bookkeeping (frames it has out
there, the circuit breaker).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from framepipe.errors import CircuitOpenError, NoProcessorError
from framepipe.logs import ComponentLogger
from framepipe.processors.fleet.breaker import CircuitBreaker, CircuitPolicy, CircuitState
from framepipe.processors.fleet.field_values import (
    BadEntryError,
    as_int,
    as_period,
    read_json,
    text,
)
from framepipe.processors.fleet.identity import pid_namespace
from framepipe.processors.fleet.keys import GROUP, Keys, ProcessorState
from framepipe.processors.fleet.outages import unavailable
from framepipe.processors.fleet.shown import loggable
from framepipe.redis.connection import ResponseError
from framepipe.redis.scripts import CLEANUP_LUA, HEARTBEAT_LUA

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis.asyncio import Redis

__all__ = [
    "ProcessorInfo",
    "Registration",
    "Registrations",
    "deregister",
    "heartbeat",
    "pending_deliveries",
    "register",
    "set_state",
]


# -- the processor's side -----------------------------------------------------------------------


async def register(
    redis: Redis,
    keys: Keys,
    processor_id: str,
    *,
    capabilities: Sequence[str],
    capacity: int,
    stream: str,
    result_stream: str,
    in_flight: int,
    processed: int,
    failed: int,
    health_interval: float | None = None,
    instance: str = "",
) -> None:
    """Create the processor's stream and consumer group (kept when they exist), then write its
    record (state ``ready``, this process's pid, pid namespace and host, the client's
    ``instance`` token) and set membership in one transaction."""
    try:
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    record: dict[Any, Any] = {
        "id": processor_id,
        "capabilities": json.dumps(list(capabilities)),
        "capacity": capacity,
        "result_stream": result_stream,
        "stream": stream,
        "group": GROUP,
        "state": ProcessorState.READY,
        "last_heartbeat": repr(time.time()),
        "in_flight": in_flight,
        "processed": processed,
        "failed": failed,
        "registered_at": repr(time.time()),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "pidns": pid_namespace(),
    }
    if health_interval is not None:
        record["health_interval"] = repr(float(health_interval))
    if instance:
        record["instance"] = instance
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(keys.proc(processor_id), mapping=record)
        pipe.sadd(keys.processors, processor_id)
        await pipe.execute()


async def heartbeat(
    redis: Redis, keys: Keys, processor_id: str, instance: str, *values: Any
) -> int:
    """Write ``values`` (field, value, ...) with the heartbeat of the client ``instance``: 1;
    0 when the processor is unknown or was deregistered meanwhile (it should register again);
    -1, writing nothing, when another client instance holds the record (another process took
    the id over while this one was cut off from Redis)."""
    return int(
        await redis.eval(
            HEARTBEAT_LUA,
            2,
            keys.proc(processor_id),
            keys.processors,
            processor_id,
            instance,
            *values,
        )
    )


async def set_state(redis: Redis, keys: Keys, processor_id: str, state: str) -> None:
    """Set the processor's ``state`` (a :class:`ProcessorState`)."""
    await redis.hset(keys.proc(processor_id), "state", state)


async def deregister(redis: Redis, keys: Keys, processor_id: str, stream: str, *states: str) -> int:
    """Remove the processor (hash, stream, set membership) when its state is one of
    ``states`` and its stream holds nothing: 1; 0 when entries are left; -1 when its state
    changed meanwhile."""
    return int(
        await redis.eval(
            CLEANUP_LUA, 3, keys.proc(processor_id), stream, keys.processors, processor_id, *states
        )
    )


async def pending_deliveries(redis: Redis, stream: str, *, batch: int = 200) -> dict[bytes, int]:
    """Every entry pending in the group of ``stream``, by id, with its ``times_delivered``
    (``XPENDING``, ``batch`` entries a call). ``NOGROUP`` when the stream or group is missing."""
    out: dict[bytes, int] = {}
    low = "-"
    while rows := await redis.xpending_range(stream, GROUP, low, "+", batch):
        for row in rows:
            raw = row["message_id"]
            mid = raw if isinstance(raw, bytes) else str(raw).encode()
            out[mid] = int(row["times_delivered"])
        low = "(" + text(mid)
    return out


# -- the router's mirror ------------------------------------------------------------------------


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
    expired: int = 0
    """Frames it skipped past their deadline, at its last heartbeat
    (:mod:`~framepipe.processors.fleet.deadlines`)."""

    @property
    def free(self) -> int:
        """Capacity left for this registry's frames."""
        return max(0, self.capacity - self.outstanding)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "processor_id": self.processor_id,
            "capabilities": list(self.capabilities),
            "capacity": self.capacity,
            "state": self.state,
            "circuit": self.circuit,
            "outstanding": self.outstanding,
            "in_flight": self.in_flight,
            "processed": self.processed,
            "failed": self.failed,
            "expired": self.expired,
            "consecutive_failures": self.consecutive_failures,
            "last_heartbeat": self.last_heartbeat,
            "result_stream": self.result_stream,
            "stream": self.stream,
            "pid": self.pid,
            "host": self.host,
        }


@dataclass
class Registration:
    """One processor in the mirror: its record as last read, and the router's bookkeeping."""

    id: str
    keys: Keys
    breaker: CircuitBreaker
    capabilities: frozenset[str] = frozenset()
    capability_order: tuple[str, ...] = ()
    capacity: int = 1
    state: str = ProcessorState.READY
    routable: bool = True
    """False after the route script refused a frame (not ready), until the record is read
    again."""
    result_stream: str = ""
    stream: str = ""
    in_flight: int = 0
    processed: int = 0
    failed: int = 0
    expired: int = 0
    pid: int | None = None
    host: str = ""
    health_interval: float = 0.0
    """Its heartbeat period as it registered it (0: not said)."""
    hb_value: bytes | None = None
    hb_seen_at: float = 0.0
    """When (this router's monotonic clock) ``hb_value`` last changed."""
    outstanding: set[str] = field(default_factory=set)
    """Frame ids routed to it by this router and not answered yet."""
    last_routed: float = 0.0
    hash_key: str = ""

    def __post_init__(self) -> None:
        self.hash_key = self.keys.proc(self.id)

    def update(self, h: Mapping[bytes, bytes], now: float) -> None:
        """Take the record ``h`` as read at ``now`` (monotonic)."""
        try:
            caps = read_json(h.get(b"capabilities") or b"[]", "capabilities")
        except BadEntryError:
            caps = []  # (a record without capabilities: nothing is routed to it)
        self.capability_order = tuple(str(c) for c in caps) if isinstance(caps, list) else ()
        self.capabilities = frozenset(self.capability_order)
        self.capacity = max(1, as_int(h.get(b"capacity"), 1))
        self.state = text(h.get(b"state")) or ProcessorState.READY
        self.routable = True
        self.result_stream = text(h.get(b"result_stream"))
        # The protocol names a processor's stream by its id: a record naming another key
        # (another processor's stream) would have the reaper move and delete that one.
        self.stream = self.keys.frames(self.id)
        self.in_flight = as_int(h.get(b"in_flight"), 0)
        self.processed = as_int(h.get(b"processed"), 0)
        self.failed = as_int(h.get(b"failed"), 0)
        self.expired = as_int(h.get(b"expired"), 0)
        self.pid = as_int(h.get(b"pid"), 0) or None
        self.host = text(h.get(b"host"))
        self.health_interval = as_period(h.get(b"health_interval"), 0.0)
        hb = h.get(b"last_heartbeat")
        if hb != self.hb_value:
            self.hb_value = hb
            self.hb_seen_at = now

    def silence_limit(self, heartbeat_timeout: float) -> float:
        """How long it may stay silent before it is declared dead: the registry's
        ``heartbeat_timeout``, or three of its own heartbeat periods when that is longer."""
        return max(heartbeat_timeout, 3.0 * self.health_interval)

    @property
    def live(self) -> bool:
        """Ready, and not refused a frame since it was last read."""
        return self.state == ProcessorState.READY and self.routable

    @property
    def free(self) -> int:
        """Capacity left for this router's frames (negative when re-routed frames overfill
        it)."""
        return self.capacity - len(self.outstanding)

    def info(self, state: str | None = None) -> ProcessorInfo:
        """A snapshot; ``state`` overrides the record's (for a departed processor)."""
        hb = None
        with contextlib.suppress(TypeError, ValueError):
            hb = float(self.hb_value) if self.hb_value else None
        return ProcessorInfo(
            processor_id=self.id,
            capabilities=self.capability_order,
            capacity=self.capacity,
            state=state or self.state,
            circuit=self.breaker.state,
            outstanding=len(self.outstanding),
            in_flight=self.in_flight,
            processed=self.processed,
            failed=self.failed,
            consecutive_failures=self.breaker.failures,
            last_heartbeat=hb,
            result_stream=self.result_stream,
            stream=self.stream,
            pid=self.pid,
            host=self.host,
            expired=self.expired,
        )


class Registrations:
    """The mirror: every registered processor as last read, and the last 100 that left.
    Circuit breakers get ``policy``, ``log`` and ``on_open`` (see :class:`CircuitBreaker`)."""

    def __init__(
        self, keys: Keys, policy: CircuitPolicy, log: ComponentLogger, on_open: Callable[[], None]
    ) -> None:
        self.keys = keys
        self.policy = policy
        self.log = log
        self.on_open = on_open
        self.procs: dict[str, Registration] = {}
        """The registered processors by id (the same dict for the mirror's lifetime)."""
        self.departed: collections.OrderedDict[str, ProcessorInfo] = collections.OrderedDict()
        self._skipped: set[str] = set()  # keys skipped as unreadable, warned about once

    async def read(self, redis: Redis) -> tuple[list[str], list[dict[bytes, bytes]]]:
        """Every record that can be read: the ids (sorted) and their hashes, in one pipeline.

        A key Redis refuses to read as what it should be (``<ns>:processors`` not a set, a
        ``<ns>:proc:<id>`` not a hash: ``WRONGTYPE``) is skipped, with one warning naming it
        until it reads again; the other records are read as usual. Redis away or refusing for
        a while (:func:`~framepipe.processors.fleet.outages.unavailable`) still raises."""
        try:
            members = await redis.smembers(self.keys.processors)
        except ResponseError as exc:
            if unavailable(exc):
                raise
            self._unreadable(self.keys.processors, exc)
            return [], []
        self._readable(self.keys.processors)
        ids = sorted(text(i) for i in members)
        async with redis.pipeline(transaction=False) as pipe:
            for pid in ids:
                pipe.hgetall(self.keys.proc(pid))
            replies = await pipe.execute(raise_on_error=False)
        good_ids: list[str] = []
        hashes: list[dict[bytes, bytes]] = []
        for pid, reply in zip(ids, replies, strict=True):
            key = self.keys.proc(pid)
            if isinstance(reply, BaseException):
                if unavailable(reply):
                    raise reply
                self._unreadable(key, reply)
                continue
            self._readable(key)
            good_ids.append(pid)
            hashes.append(reply)
        return good_ids, hashes

    def _unreadable(self, key: str, exc: BaseException) -> None:
        if key not in self._skipped:
            self._skipped.add(key)
            self.log.warning(
                "registration %s skipped: Redis cannot read it (%s: %s)",
                loggable(key),
                type(exc).__name__,
                loggable(str(exc)),
            )

    def _readable(self, key: str) -> None:
        if key in self._skipped:
            self._skipped.discard(key)
            self.log.info("registration %s readable again", loggable(key))

    def update(self, ids: list[str], hashes: list[dict[bytes, bytes]], now: float) -> None:
        """Take the records read at ``now``; processors no longer registered depart."""
        seen = set()
        for pid, h in zip(ids, hashes, strict=True):
            if not h:
                continue
            proc = self.procs.get(pid)
            if proc is None:
                breaker = CircuitBreaker(pid, self.policy, self.log, self.on_open)
                proc = self.procs[pid] = Registration(pid, self.keys, breaker, hb_seen_at=now)
                self.departed.pop(pid, None)
            proc.update(h, now)
            seen.add(pid)
        for pid in set(self.procs) - seen:
            self.depart(self.procs[pid])

    def depart(self, proc: Registration) -> None:
        """Forget ``proc``; keep its last snapshot (state ``dead`` or ``deregistered``)."""
        gone = proc.state if proc.state == ProcessorState.DEAD else "deregistered"
        self.procs.pop(proc.id, None)
        self.departed[proc.id] = proc.info(gone)
        while len(self.departed) > 100:
            self.departed.popitem(last=False)

    def infos(self, now: float, *, include_departed: bool) -> list[ProcessorInfo]:
        """Snapshots sorted by id, circuits as of ``now``."""
        for proc in self.procs.values():
            proc.breaker.current(now)
        infos = [p.info() for p in self.procs.values()]
        if include_departed:
            infos += [i for pid, i in self.departed.items() if pid not in self.procs]
        return sorted(infos, key=lambda i: i.processor_id)

    def choose(
        self, capability: str, *, exclude: Iterable[str] = (), ignore_capacity: bool = False
    ) -> Registration | None:
        """The processor for the next frame of ``capability``: the least loaded live one
        whose circuit admits a frame and (unless ``ignore_capacity``) has free capacity; None
        when all are busy. :class:`NoProcessorError` when no live processor offers it,
        :class:`CircuitOpenError` when every circuit of those that do is open."""
        excluded = set(exclude)
        live = [p for p in self.procs.values() if p.live]
        candidates = [p for p in live if capability in p.capabilities and p.id not in excluded]
        if not candidates:
            raise NoProcessorError(capability, sorted({c for p in live for c in p.capabilities}))
        now = time.monotonic()
        usable: list[Registration] = []
        all_open = True
        for proc in candidates:
            state = proc.breaker.current(now)
            if state == CircuitState.OPEN:
                continue
            all_open = False
            if not proc.breaker.admits(state):
                continue
            if proc.free <= 0 and not ignore_capacity:
                continue
            usable.append(proc)
        if not usable:
            if all_open:
                retry_in = min(p.breaker.reopens_in(now) for p in candidates)
                raise CircuitOpenError(
                    capability, sorted(p.id for p in candidates), max(0.0, retry_in)
                )
            return None
        return min(
            usable,
            key=lambda p: (
                p.free <= 0,
                len(p.outstanding) / p.capacity,
                len(p.outstanding),
                p.in_flight,
                p.last_routed,
            ),
        )

    def capabilities(self) -> dict[str, list[str]]:
        """Capability -> ids of the live processors offering it."""
        out: dict[str, list[str]] = {}
        for proc in sorted(self.procs.values(), key=lambda p: p.id):
            if proc.live:
                for cap in proc.capability_order:
                    out.setdefault(cap, []).append(proc.id)
        return out
