"""Frames' deadlines: a frame whose sender stopped waiting for it is not run.

A router writes ``ttl_ms`` on the entries it sends (:meth:`ProcessorRegistry.call
<framepipe.processors.fleet.routing.ProcessorRegistry.call>`: the call's result timeout;
:meth:`~framepipe.processors.fleet.routing.ProcessorRegistry.route`: its ``max_age``, none by
default). The deadline of an entry is the Redis time of the frame's first ``XADD`` plus
``ttl_ms``: that time is the millisecond part of the entry id, or of ``first_entry`` on an
entry the reaper moved from a dead processor's stream (the move writes a new entry, whose id is
later). Both are Redis's clock, so the processor judges a frame against Redis's clock too
(:class:`RedisClock`, learned at every registration and heartbeat): hosts' clocks need not
agree.

A processor that reads or takes back entries past their deadline (:class:`Expiry`)
acknowledges and deletes them without running ``process_frame`` and without publishing a
result (their caller had its :class:`~framepipe.errors.ResultTimeoutError` already), counts
them (``expired`` in its health and its record) and logs them at most once per 10 s with the
count. An entry without ``ttl_ms`` (an older router, a route without ``max_age``) has no
deadline, nor has any while the processor has not learned Redis's clock yet.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, TypedDict

from framepipe.logs import ComponentLogger, Repeats
from framepipe.processors.fleet.field_values import as_int
from framepipe.processors.fleet.keys import GROUP
from framepipe.redis.streams import Fields

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "Expiry",
    "RedisClock",
    "RouteLimits",
    "check_max_age",
    "deadline_ms",
    "entry_ms",
    "route_limits",
]


class RouteLimits(TypedDict):
    """A routed frame's deadline and how long the router holds its capacity for a result."""

    result_wait: float
    ttl: float | None


def check_max_age(value: float | None, name: str) -> None:
    """:class:`ValueError` naming ``name`` unless ``value`` is positive seconds or None."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive seconds or None (no limit), not {value!r}")


def route_limits(
    max_age: float | None, route_max_age: float | None, result_timeout: float
) -> RouteLimits:
    """A routed frame's deadline (``max_age``, else the router's ``route_max_age``) and how
    long its capacity is held for its result: ``result_timeout``, or its deadline when that
    comes first (a processor skips it then, unanswered)."""
    check_max_age(max_age, "max_age")
    ttl = route_max_age if max_age is None else max_age
    wait = result_timeout if ttl is None else min(ttl, result_timeout)
    return {"result_wait": wait, "ttl": ttl}


def entry_ms(entry_id: bytes | str | None) -> int | None:
    """The Redis time (ms since the epoch) at which the stream entry ``entry_id``
    (``<ms>-<seq>``) was added; None for a value that is not an entry id."""
    if not entry_id:
        return None
    raw = entry_id.encode() if isinstance(entry_id, str) else entry_id
    ms, _, seq = raw.partition(b"-")
    return int(ms) if ms.isdigit() and (not seq or seq.isdigit()) else None


def deadline_ms(entry_id: bytes, fields: Mapping[bytes, bytes]) -> int | None:
    """The Redis time (ms) past which entry ``entry_id`` (``fields``) is of no use to its
    sender: the time of the frame's first entry (``first_entry``, else ``entry_id``) plus
    ``ttl_ms``. None: no deadline (no ``ttl_ms``, or one that is not a positive number)."""
    ttl = as_int(fields.get(b"ttl_ms"), 0)
    if ttl <= 0:
        return None
    first = entry_ms(fields.get(b"first_entry")) or entry_ms(entry_id)
    return None if first is None else first + ttl


class RedisClock:
    """Redis's clock as seen from this process: its offset from the local monotonic clock,
    measured by ``TIME`` (:meth:`sync`), so a step of the local wall clock changes nothing."""

    def __init__(self) -> None:
        self.offset_ms: float | None = None
        """Redis's time minus ``time.monotonic()``, in ms (None until :meth:`sync`)."""

    async def sync(self, redis: Redis) -> None:
        """Measure the offset again (one ``TIME``; taken at the middle of its round trip)."""
        before = time.monotonic()
        seconds, micros = await redis.time()
        after = time.monotonic()
        self.offset_ms = seconds * 1000.0 + micros / 1000.0 - (before + after) * 500.0

    def now_ms(self) -> float | None:
        """Redis's time now (ms since the epoch); None when never measured."""
        offset = self.offset_ms
        return None if offset is None else time.monotonic() * 1000.0 + offset


class Expiry:
    """The entries of ``stream`` past their deadline, judged on ``clock``: told apart
    (:meth:`split`), then acknowledged, deleted, counted and logged (:meth:`skip`)."""

    def __init__(self, stream: str, clock: RedisClock, log: ComponentLogger) -> None:
        self.stream = stream
        self.clock = clock
        self.log = log
        self.count = 0
        """Entries skipped past their deadline (never run)."""
        self._repeats = Repeats(10.0)
        self._unsaid = 0  # skipped since the last line logged

    def split(
        self, entries: Sequence[tuple[bytes, Fields | None]]
    ) -> tuple[list[tuple[bytes, Fields | None]], list[tuple[bytes, int]]]:
        """``entries`` as (those to go on with, (id, ms late) of those past their deadline);
        an entry without fields (deleted while pending) goes on."""
        now = self.clock.now_ms()
        if now is None:
            return list(entries), []
        fresh: list[tuple[bytes, Fields | None]] = []
        stale: list[tuple[bytes, int]] = []
        for mid, fields in entries:
            deadline = None if fields is None else deadline_ms(mid, fields)
            if deadline is not None and now > deadline:
                stale.append((mid, int(now - deadline)))
            else:
                fresh.append((mid, fields))
        return fresh, stale

    async def skip(self, redis: Redis, stale: Sequence[tuple[bytes, int]]) -> None:
        """Acknowledge and delete the ``stale`` entries (in one transaction), unrun; count
        and log them."""
        if not stale:
            return
        ids = [mid for mid, _ in stale]
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, GROUP, *ids)
            pipe.xdel(self.stream, *ids)
            await pipe.execute()
        self.count += len(ids)
        self._unsaid += len(ids)
        if self._repeats.admit("expired") is not None:
            self.log.warning(
                "Skipped %d frame(s) past their deadline (their senders had stopped waiting; "
                "the last up to %.1fs past it): acknowledged without processing them (%d in "
                "all)",
                self._unsaid,
                max(late for _, late in stale) / 1000.0,
                self.count,
            )
            self._unsaid = 0
