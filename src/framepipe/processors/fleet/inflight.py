"""A registry's requests in flight: each frame it routed and has no result for yet.

A request (:class:`Track`) is reserved on a processor before its entry is written (a slot of
the processor's capacity held for it, the half-open circuit's trial taken), learns its entry's
id once the write replied, and ends once (:meth:`InFlight.release`): answered, expired (no
result within its timeout: a failure for the processor's circuit breaker), not sent, or the
registry stopped. At its end its capacity is freed and the entries it was written as are
remembered as an ended request's
(:class:`~framepipe.processors.fleet.replies.Ended`), so that a result without a reply token
answering one of them is not taken for a newer request of the same frame id.

An expired request is a failure of its processor, unless Redis may have lost it: a request
routed before Redis restarted (:meth:`InFlight.redis_restarted`: its frame or its result may
be gone with Redis's data), or one that expires while the registry finds Redis away
(:attr:`InFlight.redis_away`: nothing can come through). Those fail their calls all the same,
and count for nothing in the processor's circuit breaker.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field

from framepipe.errors import ResultTimeoutError
from framepipe.processors.fleet.field_values import text
from framepipe.processors.fleet.registry import Registration
from framepipe.processors.fleet.result_entries import ProcessorResult, answers

__all__ = ["InFlight", "Track"]


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
    :func:`~framepipe.processors.fleet.result_entries.answers`)."""
    redis_life: int = 0
    """The :attr:`InFlight.redis_life` it was routed in."""
    entries: list[tuple[str, str]] = field(default_factory=list)
    """``(processor_id, entry id)`` of every entry this registry wrote for the request (its
    route, the reaper's moves), as they became known: remembered when it ends
    (:class:`~framepipe.processors.fleet.replies.Ended`)."""

    def answered_by(self, result: ProcessorResult, ended: Container[tuple[str, str]]) -> bool:
        """Whether ``result`` is this request's, not a late one of an earlier request of the
        same frame id (``ended``: the entries of those this registry knows of)."""
        return answers(result, self.reply_token, ended)


class InFlight:
    """The requests of one registry in flight, by frame id (:attr:`tracks`), and the
    capacity they hold on the processors of ``procs`` (the registry's mirror). ``remember``
    records the entries of a request that ended
    (:meth:`~framepipe.processors.fleet.replies.Ended.add`); ``changed`` is called whenever
    capacity was freed."""

    def __init__(
        self,
        procs: Mapping[str, Registration],
        remember: Callable[[str, Iterable[tuple[str, str]]], None],
        changed: Callable[[], None],
    ) -> None:
        self.procs = procs
        self.remember = remember
        self.changed = changed
        self.tracks: dict[str, Track] = {}
        """Frame id -> its request in flight."""
        self.redis_life = 0
        """The restarts of Redis seen since the registry started."""
        self.redis_away = False
        """True from the moment the registry finds Redis unreachable until it has checked,
        with Redis back, whether Redis restarted meanwhile."""

    def reserve(
        self,
        proc: Registration,
        fields: dict[str, bytes | str],
        capability: str,
        want_future: bool,
        *,
        reply_to: str,
        timeout: float,
        max_attempts: int,
        ttl: float | None = None,
    ) -> Track:
        """Hold a slot of ``proc`` for the entry ``fields`` (completed here with the
        request's routing fields: ``capability``, ``reply_to``, a new ``reply_token``, ...,
        and ``ttl_ms`` from ``ttl`` seconds when given: the frame's deadline,
        :mod:`~framepipe.processors.fleet.deadlines`)."""
        frame_id = text(fields["frame_id"])
        future = asyncio.get_running_loop().create_future() if want_future else None
        now = time.monotonic()
        token = secrets.token_hex(8)
        track = Track(
            frame_id,
            proc.id,
            capability,
            now,
            future,
            timeout,
            reply_token=token,
            redis_life=self.redis_life,
        )
        proc.breaker.sent(frame_id)
        proc.outstanding.add(frame_id)
        proc.last_routed = now
        self.tracks[frame_id] = track
        fields["capability"] = capability
        fields["reply_to"] = reply_to
        fields["reply_token"] = token
        fields.setdefault("attempt", "1")
        fields.setdefault("max_attempts", str(max_attempts))
        fields["routed_at"] = repr(time.time())
        if ttl is not None:
            fields["ttl_ms"] = str(max(1, round(ttl * 1000)))
        return track

    def release(self, track: Track) -> None:
        """``track``'s request ended (answered, expired, or not sent): its capacity is freed
        and its entries remembered as an ended request's."""
        if self.tracks.get(track.frame_id) is track:
            del self.tracks[track.frame_id]
        self.remember(track.frame_id, track.entries)
        proc = self.procs.get(track.processor_id)
        if proc is not None:
            proc.outstanding.discard(track.frame_id)
            proc.breaker.settled(track.frame_id)
        self.changed()

    def learned(self, track: Track, processor_id: str, entry_id: str) -> None:
        """``track``'s request is entry ``entry_id`` of ``processor_id``'s stream (known once
        the ``XADD`` replied). A request that ended meanwhile (its result can be read before
        the reply of the ``XADD`` that sent it) gets it remembered as an ended request's."""
        track.message_id = entry_id
        track.entries.append((processor_id, entry_id))
        if self.tracks.get(track.frame_id) is not track:
            self.remember(track.frame_id, [(processor_id, entry_id)])

    def redis_restarted(self) -> int:
        """Redis restarted (it may have lost its data): the requests in flight now are not
        counted against their processors when they expire. Returns how many there are."""
        self.redis_life += 1
        return len(self.tracks)

    def expire(self, track: Track, timeout: float) -> None:
        """End ``track``'s request for want of a result within ``timeout`` seconds (unless it
        ended already): a failure of its processor unless Redis may have lost it (see the
        module docstring); its call fails with :class:`ResultTimeoutError`."""
        if self.tracks.get(track.frame_id) is not track:
            return  # its result came (or the registry stopped) meanwhile
        self.release(track)
        proc = self.procs.get(track.processor_id)
        blameless = self.redis_away or track.redis_life != self.redis_life
        if proc is not None and not blameless:
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

    def fail(self, error: Callable[[Track], BaseException]) -> None:
        """Fail every call still waiting for a result with ``error(track)``."""
        for track in list(self.tracks.values()):
            if track.future is not None and not track.future.done():
                track.future.set_exception(error(track))
