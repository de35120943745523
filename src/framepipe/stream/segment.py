"""Segments: a live stream grouped into episodes (orders, visits).

A :class:`Segmenter` reads a key that a stage put on each frame (``frame.meta[key]``, e.g. an
order id read from a QR tag, or a face id) or, without a key, treats every frame that reaches it
as activity (put a motion gate before it). A segment opens at the first keyed frame, takes the
frames that follow (untagged ones too, while it is open), and closes when:

* no keyed frame came for ``timeout`` seconds (``reason="timeout"``);
* a frame with a different key arrives (``"key_changed"``; the new key opens a new segment);
* it lasted ``max_duration`` seconds (``"max_duration"``);
* the stream ends (``"end"``), or the pipeline is stopped (``"stopped"``).

Time is the wall clock by default (``clock="wall"``: live cameras; a timer closes a segment
even when no frame comes; the timeout counts from when the last keyed frame reached the
segmenter, so a pipeline running behind its camera does not split a segment). Frames that come
also count the time between their captures: a segment closes (``"timeout"``) at a frame
captured ``timeout`` seconds after its last keyed frame, so after a backlog (frames held back by
a slow sink, then delivered in a burst) a segment takes the frames of its timeout, as live, not
every frame until the next key. That time between two frames is their ``ts_ms`` difference,
but at most their arrivals' difference or twice the recent interval between captures, and
never negative. Its timeout and ``max_duration`` are measured on the monotonic clock: a system
clock set back or forward (NTP's first sync on a box that booted without the time) neither
holds a segment open for the size of the step nor closes it early. With
``clock="stream"`` it is the frames' own ``pts`` (recorded video
processed faster or slower than real time): a segment times out when a frame arrives ``timeout``
stream-seconds after its last keyed frame, or at the end of the stream. Stream time that steps
back (a capture restarted with its ``pts`` from 0 again, a timestamp that wrapped) counts as
no time passing: the segmenter's stream time never goes back, so an open segment still times
out (and ``max_duration`` still counts) after such a step.

The segmenter sees each source's frames in order. A closed segment flows on as a marker behind
its frames, so sinks finish its frames before ``segment.completed`` is emitted; the event carries
the segment id, source, key, first/last frame time, frame count, stored keys and the latency:
the time from the segment's last frame to the event.

Segment ids are unique per source for the pipeline's run, so stored frames never mix (the rule
is :class:`SegmentIds`): a key's first segment has the key as its id, whatever it looks like
(``ORDER_1``, ``10.0.0.1``, ``v1.2``); a key seen again after its segment closed opens a new
segment with id ``<key>.2`` (``.3`` ...). An id whose frames an earlier run left in a sink
(a frame store: the service restarted, the pipeline started again) counts as issued too: the
pipeline asks its sinks once per id before issuing it (see
:class:`~framepipe.stream.segment_flow.SegmentFlow`). Only an id already issued is never issued
again: a repeat takes the smallest ``<key>.<n>`` (n >= 2) not issued yet, and so does a key
whose own id another key's repeat already took (``A``, ``A`` again, then a tag ``A.2``: ``A``,
``A.2``, ``A.2.2``). So when no key is another key's ``<key>.<n>`` (order ids without a
``.``, addresses that are not one another's repeat ids) a key's ids are always ``<key>``,
``<key>.2``, ``<key>.3`` ... To keep ids unique for the whole run, the segmenter remembers
every id it issued (one set entry per keyed segment). Without a key, the id is
``<source_id>-<ms>``: the first frame's ``ts_ms``, raised to one past the previous id's when
the clock did not move on.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from framepipe.frames import Frame

__all__ = ["Segment", "SegmentIds", "SegmentMarker", "Segmenter", "SegmenterState"]

KeyFn = Callable[[Frame], "str | None"]


@dataclass
class Segment:
    """One episode of one source."""

    id: str
    source_id: str
    key: str | None
    first_ts_ms: int
    last_ts_ms: int
    last_key_ts_ms: int
    opened_at: float
    first_t: float = 0.0
    """The first frame's time on the segment's clock: its ``pts`` (stream clock), or when it
    reached the segmenter on the monotonic clock (wall clock; ``max_duration`` counts from it,
    as the timeout counts from the last keyed frame's arrival)."""
    last_key_t: float = 0.0
    last_key_at: float = 0.0
    """Wall time the last keyed frame reached the segmenter."""
    last_key_mono: float = 0.0
    """When the last keyed frame reached the segmenter, on the monotonic clock (the wall
    clock's timeout counts from it)."""
    captured_since_key: float = 0.0
    """Seconds of capture time from the last keyed frame to the latest frame (wall clock; see
    the module docstring)."""
    frames: int = 0
    closed_at: float | None = None
    reason: str | None = None
    completed_at: float | None = None
    stored: list[str] = field(default_factory=list)
    not_stored: int = 0
    """Frames of it a frame store failed to write (the object store refused them)."""
    spooled: list[str] = field(default_factory=list)
    """Keys of its frames a frame store kept locally while the object store refused them;
    each is uploaded under that key once the store is back (``frames.uploaded``)."""
    selected: list[str] = field(default_factory=list)
    not_selected: int = 0
    """Best frames a frame store failed to copy to ``selected`` (the object store refused)."""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_s(self) -> float | None:
        """Seconds from the last frame to completion (or close)."""
        end = self.completed_at or self.closed_at
        return None if end is None else end - self.last_ts_ms / 1000.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``segment.completed`` event's data)."""
        return {
            "segment_id": self.id,
            "source_id": self.source_id,
            "key": self.key,
            "first_ts_ms": self.first_ts_ms,
            "last_ts_ms": self.last_ts_ms,
            "frames": self.frames,
            "reason": self.reason,
            "latency_s": None if self.latency_s is None else round(self.latency_s, 4),
            "stored": list(self.stored),
            "not_stored": self.not_stored,
            "spooled": list(self.spooled),
            "selected": list(self.selected),
            "not_selected": self.not_selected,
            "meta": dict(self.meta),
        }


@dataclass
class SegmentMarker:
    """Control item: ``segment`` closed; flows behind its frames through the sinks."""

    segment: Segment
    control: bool = True


class Segmenter:
    """Groups one source's frames into segments (see the module docstring)."""

    def __init__(
        self,
        key: str | KeyFn | None = None,
        *,
        timeout: float = 10.0,
        max_duration: float | None = None,
        include_untagged: bool = True,
        clock: Literal["wall", "stream"] = "wall",
        label: str = "segment",
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)):  # NaN compares false: never expired
            raise ValueError(f"segment timeout must be a finite number > 0, got {timeout}")
        if max_duration is not None and not (max_duration > 0 and math.isfinite(max_duration)):
            raise ValueError(
                f"segment max_duration must be a finite number > 0 or None, got {max_duration}"
            )
        if clock not in ("wall", "stream"):
            raise ValueError(f"segment clock must be 'wall' or 'stream', got {clock!r}")
        self.clock = clock
        self.label = label
        """What a segment is called in logs: ``Order ORDER_1 completed: ...``."""
        self.key = key
        self.timeout = timeout
        self.max_duration = max_duration
        self.include_untagged = include_untagged
        self._key_fn: KeyFn
        if key is None:
            self._key_fn = lambda frame: ""
        elif isinstance(key, str):
            name = key
            self._key_fn = lambda frame: _as_key(frame.meta.get(name))
        else:
            fn = key
            self._key_fn = lambda frame: _as_key(fn(frame))

    def state(self) -> SegmenterState:
        """Fresh per-source state (one per stream pipeline)."""
        return SegmenterState(self)


def _as_key(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


class SegmentIds:
    """The ids of one source's keyed segments in a pipeline's run: :meth:`issue` gives each new
    segment of a key an id no segment of the run had.

    The rule: ``key`` itself when no segment had it yet (a key's first segment, whatever the
    key looks like); otherwise ``<key>.<n>`` for the smallest ``n >= 2`` whose id was not
    issued yet. So a key's ids are ``<key>``, ``<key>.2``, ``<key>.3`` ... in the order its
    segments open, unless another key took one of them first (a tag ``A.2`` read before the
    second ``A``: that ``A`` gets ``A.3``). Every id issued is remembered (one entry each).

    An id an earlier run used (its frames are in the store) is marked so by
    :meth:`checked` before it would be issued (:meth:`unchecked` names the id to ask about):
    it then counts as issued, and the rule goes on to the next."""

    def __init__(self) -> None:
        self._issued: set[str] = set()
        self._next: dict[str, int] = {}  # per key: no n below it is free for <key>.<n>
        self._checked: set[str] = set()  # ids an earlier run's use was asked about

    def _candidate(self, key: str) -> str:
        """The id :meth:`issue` gives ``key`` now."""
        if key not in self._issued:
            return key
        n = self._next.get(key, 2)
        while f"{key}.{n}" in self._issued:  # the issued ids only grow: n never goes back
            n += 1
        self._next[key] = n
        return f"{key}.{n}"

    def issue(self, key: str) -> str:
        """A new id for a segment of ``key``, remembered as issued."""
        segment_id = self._candidate(key)
        self._issued.add(segment_id)
        return segment_id

    def unchecked(self, key: str) -> str | None:
        """The id :meth:`issue` would give ``key`` now, when whether an earlier run used it
        was not asked yet (else None)."""
        segment_id = self._candidate(key)
        return None if segment_id in self._checked else segment_id

    def checked(self, segment_id: str, *, taken: bool) -> None:
        """``segment_id`` was asked about: ``taken`` (an earlier run used it) makes it count
        as issued; either way it is not asked about again."""
        self._checked.add(segment_id)
        if taken:
            self._issued.add(segment_id)

    def __contains__(self, segment_id: object) -> bool:
        """True when ``segment_id`` was issued in this run."""
        return segment_id in self._issued


class SegmenterState:
    """One run's segmentation: the open segment and the ids issued (a :class:`Segmenter` is
    the configuration, shared by runs; :meth:`Segmenter.state` makes one of these per run)."""

    def __init__(self, config: Segmenter) -> None:
        self.config = config
        self.current: Segment | None = None
        self._ids = SegmentIds()  # the keyed segments' ids, for the whole run
        self._last_ms: int | None = None  # the number in the last key-less id
        self._last_t: float | None = None  # the last stream time (clock="stream")
        self._shift = 0.0  # added to pts so that stream time never goes back
        self._prev: tuple[int, float] | None = None  # the last frame's ts_ms and arrival
        self._intervals: collections.deque[float] = collections.deque(maxlen=9)
        self._routing: tuple[Frame, str | None, float] | None = None  # close_before -> join

    @property
    def ids(self) -> SegmentIds:
        """The keyed segments' ids of this run."""
        return self._ids

    def key_of(self, frame: Frame) -> str | None:
        """The key ``frame`` carries for this segmenter (None: none; ``""``: any frame, for a
        segmenter without a key)."""
        return self.config._key_fn(frame)

    def _new_id(self, key: str | None, frame: Frame) -> str:
        if not key:
            ms = frame.ts_ms if self._last_ms is None else max(frame.ts_ms, self._last_ms + 1)
            self._last_ms = ms
            return f"{frame.source_id}-{ms}"
        return self._ids.issue(key)

    def _time(self, frame: Frame) -> float:
        if self.config.clock != "stream" or frame.pts is None:
            return time.monotonic()  # when it reached the segmenter: see first_t
        t = float(frame.pts) + self._shift
        if self._last_t is not None and t < self._last_t:
            self._shift += self._last_t - t
            t = self._last_t
        self._last_t = t
        return t

    def _captured(self, frame: Frame, arrived: float) -> float:
        """Seconds of capture time from the previous frame to ``frame`` (wall clock): their
        ``ts_ms`` difference, at most their arrivals' difference or twice the recent interval
        (a step of the system clock counts as one interval), never negative."""
        prev, self._prev = self._prev, (frame.ts_ms, arrived)
        if prev is None:
            return 0.0
        gap = max(0.0, (frame.ts_ms - prev[0]) / 1000.0)
        usual = sorted(self._intervals)[len(self._intervals) // 2] if self._intervals else 1.0
        step = min(gap, max(arrived - prev[1], 2.0 * usual))
        self._intervals.append(step)
        return step

    def feed(self, frame: Frame) -> tuple[list[Segment], Segment | None]:
        """Route one frame: (segments closed by it, the segment it joins or None)."""
        closed = self.close_before(frame)
        return closed, self.join(frame)

    def close_before(self, frame: Frame) -> list[Segment]:
        """The first half of :meth:`feed`: close the segments ``frame`` closes (a timeout, the
        ``max_duration``, another key) and return them; :meth:`join` routes ``frame`` next.
        In between, :attr:`current` is the segment ``frame`` joins (None: it opens one, or
        takes none), and :attr:`ids` tells the id a segment it opens would get."""
        closed: list[Segment] = []
        key = self.config._key_fn(frame)
        t = self._time(frame)
        cur = self.current
        if self.config.clock == "wall":
            step = self._captured(frame, t)
            if cur is not None:
                cur.captured_since_key += step
                if cur.captured_since_key >= self.config.timeout - 1e-9:
                    closed.append(self._close("timeout"))
                    cur = None
        if (
            cur is not None
            and self.config.max_duration is not None
            and (t - cur.first_t) >= self.config.max_duration
        ):
            closed.append(self._close("max_duration"))
            cur = None
        if (
            cur is not None
            and self.config.clock == "stream"
            and (t - cur.last_key_t) >= self.config.timeout
        ):
            closed.append(self._close("timeout"))
            cur = None
        if key is not None and cur is not None and cur.key != (key or None):
            closed.append(self._close("key_changed"))
        self._routing = (frame, key, t)
        return closed

    def join(self, frame: Frame) -> Segment | None:
        """The second half of :meth:`feed`, after :meth:`close_before` of the same ``frame``:
        the segment it joins (opened by it when it carries a key and none is open), or
        None."""
        routing, self._routing = self._routing, None
        assert routing is not None, "close_before(frame) comes first"
        routed, key, t = routing
        assert routed is frame, "join() takes the frame close_before() took"
        cur = self.current
        if key is not None:
            if cur is None:
                cur = Segment(
                    id=self._new_id(key, frame),
                    source_id=frame.source_id,
                    key=key or None,
                    first_ts_ms=frame.ts_ms,
                    last_ts_ms=frame.ts_ms,
                    last_key_ts_ms=frame.ts_ms,
                    opened_at=time.time(),
                    first_t=t,
                )
                self.current = cur
            cur.last_key_ts_ms = frame.ts_ms
            cur.last_key_t = t
            cur.last_key_at = time.time()
            cur.last_key_mono = time.monotonic()
            cur.captured_since_key = 0.0
        elif cur is None or not self.config.include_untagged:
            return None
        cur.frames += 1
        cur.last_ts_ms = frame.ts_ms
        frame.segment_id = cur.id
        return cur

    def deadline(self) -> float | None:
        """The :func:`time.monotonic` time at which the open segment times out, or None (also
        with the stream clock, where only frames move time on). Monotonic, so a wall clock
        set back or forward (NTP's first sync on a box that booted without the time) neither
        holds a segment open nor closes it early."""
        cur = self.current
        if cur is None or self.config.clock == "stream":
            return None
        # From when the key was last seen here, not captured: a pipeline running late must not
        # split a segment whose keyed frames are still on their way.
        deadline = cur.last_key_mono + self.config.timeout
        if self.config.max_duration is not None:
            deadline = min(deadline, cur.first_t + self.config.max_duration)
        return deadline

    def expire(self, now: float) -> Segment | None:
        """Close the open segment if its deadline passed; ``now`` is :func:`time.monotonic`."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        cur = self.current
        assert cur is not None
        over = (
            self.config.max_duration is not None and now >= cur.first_t + self.config.max_duration
        )
        return self._close("max_duration" if over else "timeout")

    def close_all(self, reason: str = "end") -> list[Segment]:
        """Close the open segment (end of stream)."""
        return [self._close(reason)] if self.current is not None else []

    def _close(self, reason: str) -> Segment:
        cur = self.current
        assert cur is not None
        cur.closed_at = time.time()
        cur.reason = reason
        self.current = None
        return cur
