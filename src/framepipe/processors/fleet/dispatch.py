"""A registry's routes as they go out: items made entries, each sent to a processor as its
capacity allows.

:class:`Dispatcher` turns the items of one route (``route``, ``route_many``, ``call``) into
stream entries (an OpenTelemetry span ``send <capability>`` each while tracing is on), reserves
a slot of a chosen processor for each (:class:`~framepipe.processors.fleet.inflight.InFlight`),
sends the reserved ones in one pipelined batch and waits in line for capacity
(:class:`~framepipe.processors.fleet.waiting.Waiting`) for the rest. Its guarantees:

* Every reservation is either sent or released: an entry refused (its processor no longer
  ``ready``) is chosen for again, an error releases the whole batch.
* A free slot goes to the route first in line for the capability, never to one that came
  later.
* Frame ids are unique among the frames in flight: a route that would send one twice raises
  :class:`ValueError` naming them, before anything is sent.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from framepipe.errors import (
    CircuitOpenError,
    NoCapacityError,
    NoProcessorError,
    RegistryConnectionError,
)
from framepipe.processors.fleet.field_values import text
from framepipe.processors.fleet.frame_entries import Routable
from framepipe.processors.fleet.inflight import InFlight, Track
from framepipe.processors.fleet.outages import unavailable
from framepipe.processors.fleet.registry import Registration, Registrations
from framepipe.processors.fleet.sending import stream_fields
from framepipe.processors.fleet.spans import send_spans
from framepipe.processors.fleet.waiting import Waiting
from framepipe.tracing import end_span, traceparent_of

__all__ = ["Dispatcher"]

Entry = dict[str, bytes | str]
Send = Callable[[list[tuple[Registration, Entry]]], Awaitable[list[Any]]]


class Dispatcher:
    """The routes of one registry, choosing among ``mirror``'s processors, holding their
    capacity in ``inflight`` and queueing in ``waiting``. ``require()`` raises when the
    registry cannot route (not started, failed), ``refresh()`` reads the registrations again,
    ``send(items)`` writes reserved entries (a message id, None: not ready, or an exception
    for each), ``down(error)`` is the error for Redis away."""

    def __init__(
        self,
        mirror: Registrations,
        waiting: Waiting,
        inflight: InFlight,
        *,
        require: Callable[[], object],
        refresh: Callable[[], Awaitable[object]],
        send: Send,
        down: Callable[[BaseException], RegistryConnectionError],
    ) -> None:
        self._mirror = mirror
        self._waiting = waiting
        self._inflight = inflight
        self._require = require
        self._refresh = refresh
        self._send = send
        self._down = down

    async def dispatch(
        self,
        items: Sequence[Routable],
        capability: str,
        *,
        wait: float,
        want_futures: bool,
        quality: int,
        result_wait: float,
        ttl: float | None,
        reply_to: str,
        max_attempts: int,
    ) -> list[Track]:
        """Route ``items`` as capacity allows (see :meth:`route`), each a request waiting
        ``result_wait`` seconds for its result, its frame's deadline ``ttl`` seconds after its
        entry is written (None: none). While OpenTelemetry
        tracing is on, each item's routing is a span, ``send <capability>``, child of the
        trace context it carries (else of the current one), whose traceparent goes on the
        wire in its place: the processor's span is its child."""
        self._require()
        spans = send_spans(items, capability)
        try:
            entries = [
                await stream_fields(item, quality, None if spans is None else traceparent_of(span))
                for item, span in zip(items, spans or itertools.repeat(None), strict=False)
            ]
            tracks = await self.route(
                entries,
                capability,
                wait=wait,
                want_futures=want_futures,
                result_wait=result_wait,
                ttl=ttl,
                reply_to=reply_to,
                max_attempts=max_attempts,
            )
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

    async def route(
        self,
        entries: list[Entry],
        capability: str,
        *,
        wait: float,
        want_futures: bool,
        result_wait: float,
        ttl: float | None,
        reply_to: str,
        max_attempts: int,
    ) -> list[Track]:
        """Route ``entries`` as capacity allows, waiting up to ``wait`` seconds for it; every
        reservation is either sent or released. Routes that have to wait for capacity queue
        per capability: a free slot goes to the first in line, never to a route that came
        later."""
        if len(entries) == 1:
            frame_id = text(entries[0]["frame_id"])
            clash = [frame_id] if frame_id in self._inflight.tracks else []
        else:
            counts = collections.Counter(text(e["frame_id"]) for e in entries)
            clash = sorted(i for i, n in counts.items() if n > 1 or i in self._inflight.tracks)
        if clash:
            raise ValueError(f"frame ids must be unique among the frames in flight: {clash}")
        deadline = time.monotonic() + wait
        queue = collections.deque(range(len(entries)))
        done: list[Track | None] = [None] * len(entries)
        refreshed = False
        ticket: int | None = None  # this route's place in the line for capacity, once waiting
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
                            await self._refresh()
                            continue
                        raise
                    if proc is None or not self._waiting.turn(capability, ticket):
                        break  # no free slot, or one that the route first in line gets
                    index = queue.popleft()
                    track = self._inflight.reserve(
                        proc,
                        entries[index],
                        capability,
                        want_futures,
                        reply_to=reply_to,
                        timeout=result_wait,
                        max_attempts=max_attempts,
                        ttl=ttl,
                    )
                    batch.append((index, proc, track))
                if batch:
                    await self._send_batch(batch, entries, queue, done)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise NoCapacityError(
                        capability,
                        sorted(
                            p.id
                            for p in self._mirror.procs.values()
                            if p.live and capability in p.capabilities
                        ),
                        wait,
                    )
                if ticket is None:
                    ticket = self._waiting.join(capability)
                await self._waiting.wait_change(min(remaining, 0.25))
                self._require()
        finally:
            if ticket is not None:
                self._waiting.leave(capability, ticket)  # the next in line may take a slot
        return [t for t in done if t is not None]

    async def _send_batch(
        self,
        batch: list[tuple[int, Registration, Track]],
        entries: list[Entry],
        queue: collections.deque[int],
        done: list[Track | None],
    ) -> None:
        """Send reserved entries; refused ones (not ready any more) go back to ``queue``."""
        try:
            results = await self._send([(p, entries[i]) for i, p, _ in batch])
        except BaseException:
            for _, _, track in batch:
                self._inflight.release(track)
            raise
        error: BaseException | None = None
        for (index, proc, track), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                self._inflight.release(track)
                error = error or result
            elif result is None:  # no longer ready: choose again
                self._inflight.release(track)
                proc.routable = False
                queue.append(index)
            else:
                self._inflight.learned(track, proc.id, text(result))
                done[index] = track
        if error is not None:
            if unavailable(error):
                raise self._down(error) from error
            raise error
