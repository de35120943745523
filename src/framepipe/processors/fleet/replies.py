"""The reply reader: results coming back to a registry, matched to the frames it routed.

One blocking ``XREAD`` loop on the registry's own connection reads its reply stream
(``<ns>:replies:<registry id>``); each result of a request in flight updates the processor's
circuit breaker, frees the capacity its frame held and resolves the awaiting call (and is
traced as the frame's ``result`` span: :mod:`~framepipe.processors.fleet.spans`). A result
resolves only the request that produced it: the frame in flight under its ``frame_id`` whose
``reply_token`` it echoes (:func:`~framepipe.processors.fleet.result_entries.answers`); a result
without a token (an older processor's) resolves the frame in flight under its ``frame_id``
unless it answered an entry of an earlier request of that frame id that ended
(:class:`Ended`, the record of those).
A result nobody waits for any more (a duplicate of a re-routed frame, one whose wait expired,
the late result of an earlier request of a frame id sent again) is dropped, logged at debug
level and counted (:attr:`ReplyReader.dropped`); it does not count for the circuit breaker
either: each request counts there once, by how it ended, and the end of a request whose
result came late was counted already (its timeout, a failure).
A reaper's announcement that it moved the entry of a request to another processor
(:class:`~framepipe.processors.fleet.result_entries.Moved`, read before any result of the new entry)
adds the new entry to that request's entries: the request in flight under the frame id when
the token is its own, else an ended one (:class:`Ended`).
An entry whose handling fails is logged and left (:meth:`ReplyReader.take`): the reader never
stops before the registry closes, and a result it matched to a request still reaches its call.
Entries read are trimmed by the health watch (:meth:`ReplyReader.trim`), not one by one.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Container, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from framepipe.processors.fleet.field_values import text
from framepipe.processors.fleet.outages import REDIS_ERRORS, denied, kind, outage, unavailable
from framepipe.processors.fleet.result_entries import Moved, ProcessorResult
from framepipe.processors.fleet.shown import loggable
from framepipe.processors.fleet.spans import received
from framepipe.redis.streams import stream_entries

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from framepipe.backoff import Backoff
    from framepipe.logs import ComponentLogger
    from framepipe.processors.fleet.inflight import InFlight, Track
    from framepipe.processors.fleet.registry import Registration
    from framepipe.redis.wire import Wire

__all__ = [
    "ENDED_FRAMES",
    "ENDED_PER_FRAME",
    "ENDED_TTL",
    "Ended",
    "RepliedRegistry",
    "ReplyReader",
]

ENDED_FRAMES = 10_000
"""How many frame ids :class:`Ended` remembers ended requests of (the latest ones)."""
ENDED_TTL = 600.0
"""How long (seconds) :class:`Ended` remembers a frame id's ended requests."""
ENDED_PER_FRAME = 16
"""The most entries :class:`Ended` keeps for one frame id (the latest ones)."""


class Ended:
    """The entries of the requests that ended (answered, or their wait expired), per frame
    id, as ``(processor_id, entry_id)``: a result without a reply token that answered one of
    them is the late result (or a duplicate) of an ended request, never the result of a newer
    request of the frame id. Bounded: the latest ``frames`` frame ids, each for ``ttl``
    seconds after a request of it last ended, at most :data:`ENDED_PER_FRAME` entries each."""

    def __init__(self, frames: int = ENDED_FRAMES, ttl: float = ENDED_TTL) -> None:
        self.frames = frames
        self.ttl = ttl
        self._by_frame: collections.OrderedDict[str, tuple[float, list[tuple[str, str]]]] = (
            collections.OrderedDict()
        )  # frame id -> (when it is forgotten, its entries); in the order they are forgotten

    def add(self, frame_id: str, entries: Iterable[tuple[str, str]]) -> None:
        """Remember ``entries`` (``(processor_id, entry_id)``; those without an entry id are
        skipped) as entries of an ended request of ``frame_id``."""
        known = [e for e in entries if e[1]]
        if not known:
            return
        now = time.monotonic()
        by_frame = self._by_frame
        _, kept = by_frame.pop(frame_id, (0.0, []))
        for entry in known:
            if entry not in kept:
                kept.append(entry)
        by_frame[frame_id] = (now + self.ttl, kept[-ENDED_PER_FRAME:])
        while by_frame and (len(by_frame) > self.frames or next(iter(by_frame.values()))[0] <= now):
            by_frame.popitem(last=False)

    def of(self, frame_id: str) -> Container[tuple[str, str]]:
        """The entries of ``frame_id``'s ended requests (none once forgotten)."""
        got = self._by_frame.get(frame_id)
        if got is None:
            return ()
        if got[0] <= time.monotonic():
            del self._by_frame[frame_id]
            return ()
        return got[1]


class RepliedRegistry(Protocol):
    """What the reply reader uses of its registry
    (:class:`~framepipe.processors.fleet.routing.ProcessorRegistry`): its settings, its reply
    connection, its mirror of the processors and its frames in flight."""

    @property
    def reply_stream(self) -> str: ...
    @property
    def redis_url(self) -> str: ...
    @property
    def backoff(self) -> Backoff: ...
    @property
    def log(self) -> ComponentLogger: ...
    @property
    def _closed(self) -> bool: ...
    @property
    def _replies(self) -> Wire | None: ...
    @property
    def _inflight(self) -> InFlight: ...
    @property
    def _procs(self) -> Mapping[str, Registration]: ...
    @property
    def _routed(self) -> Mapping[str, Track]: ...
    def _require(self) -> Redis: ...


class ReplyReader:
    """The reply stream of one registry (its collaborator: it settles the registry's frames
    in flight)."""

    def __init__(self, registry: RepliedRegistry) -> None:
        self.registry = registry
        self.read: bytes | str = ""
        """The id of the last reply entry read."""
        self.trimmed: bytes | str = ""
        """The id up to which the stream was trimmed."""
        self.dropped = 0
        """Results read that no request waited for (late, duplicate, or of an earlier request
        of the frame id)."""
        self.ended = Ended()
        """The entries of this registry's ended requests (see :class:`Ended`)."""

    async def run(self) -> None:
        """Read replies until the registry closes; Redis being away or refusing
        (:func:`~framepipe.processors.fleet.outages.unavailable`) is logged once and retried
        with the registry's backoff."""
        registry = self.registry
        wire = registry._replies
        assert wire is not None
        last: bytes | str = "0-0"
        failures = 0
        said = ""  # the kind of outage said since the last success
        while not registry._closed:
            try:
                reply = await wire.execute(
                    "XREAD",
                    "COUNT",
                    500,
                    "BLOCK",
                    1000,
                    "STREAMS",
                    registry.reply_stream,
                    last,
                    block=1.0,
                )
            except REDIS_ERRORS as exc:
                if registry._closed:
                    return
                if not unavailable(exc):
                    raise
                registry._inflight.redis_away = True  # until the health watch checked it
                failures += 1
                if failures == 1 or kind(exc) != said:
                    said = kind(exc)
                    (registry.log.error if denied(exc) else registry.log.warning)(
                        "reply stream: %s; retrying", outage(registry.redis_url, exc)
                    )
                await asyncio.sleep(registry.backoff.delay(failures))
                continue
            if failures:
                registry.log.info("reply stream: Redis reachable again")
                failures = 0
            if reply:
                for mid, fields in stream_entries(reply):
                    last = self.read = mid
                    if fields is not None:
                        self.take(mid, fields)

    def take(self, mid: bytes | str, fields: Mapping[bytes, bytes]) -> None:
        """Take reply entry ``mid``; one whose handling fails (anyone with access to Redis can
        write to the stream) is logged and left, never the end of the reader: every later
        call of the registry depends on it. A result matched to its request reaches its call
        even then (:meth:`on_reply`)."""
        try:
            self.on_reply(fields)
        except Exception:
            self.registry.log.exception(
                "reply entry %s: taking it failed (frame %s); going on with the next",
                loggable(mid),
                loggable(fields.get(b"frame_id")) or "?",
            )

    def on_reply(self, fields: Mapping[bytes, bytes]) -> None:
        """Take one reply entry."""
        registry = self.registry
        moved = Moved.from_fields(fields)
        if moved is not None:
            self.on_moved(moved)
            return
        try:
            result = ProcessorResult.from_fields(fields)
        except (ValueError, TypeError) as exc:
            registry.log.warning(
                "malformed entry on the reply stream ignored: %s", loggable(str(exc), 1000)
            )
            return
        track = registry._routed.get(result.frame_id)
        if track is None or not track.answered_by(result, self.ended.of(result.frame_id)):
            # a duplicate (re-routed frame), one whose wait expired, or an earlier request's
            self.dropped += 1
            registry.log.debug(
                "result of frame %s from %s (entry %s) dropped: no request waits for it",
                loggable(result.frame_id),
                loggable(result.processor_id),
                loggable(result.entry_id),
            )
            return
        try:
            proc = registry._procs.get(result.processor_id)
            if proc is not None:
                proc.breaker.record(result.ok, result.error_kind, result.error)
            track.entries.append((result.processor_id, result.entry_id))  # as ended's
            registry._inflight.release(track)
            received(result, track)
        finally:  # (the call has its result even when the bookkeeping failed)
            if track.future is not None and not track.future.done():
                track.future.set_result(result)

    def on_moved(self, moved: Moved) -> None:
        """Take a reaper's announcement: its new entry is one more entry of the request it
        moved, the one in flight when the token is its own, else one that ended."""
        if not moved.reply_token or not moved.entry_id:
            return  # (not an entry of a request with a token: nothing to tell apart)
        entry = (moved.processor_id, moved.entry_id)
        track = self.registry._routed.get(moved.frame_id)
        if track is not None and track.reply_token == moved.reply_token:
            if entry not in track.entries:
                track.entries.append(entry)
        else:
            self.ended.add(moved.frame_id, [entry])

    async def trim(self) -> None:
        """Remove the reply entries already read (once per health tick rather than an XDEL
        per batch on the hot path); MAXLEN ~ 10,000 on every reply bounds it meanwhile."""
        read = self.read
        if not read or read == self.trimmed:
            return
        ms, _, seq = text(read).partition("-")
        await self.registry._require().xtrim(
            self.registry.reply_stream, minid=f"{ms}-{int(seq or 0) + 1}"
        )
        self.trimmed = read
