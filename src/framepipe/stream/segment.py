"""Segments: a live stream grouped into episodes (orders, visits).

A :class:`Segmenter` reads a key that a stage put on each frame (``frame.meta[key]``, e.g. an
order id read from a QR tag, or a face id) or, without a key, treats every frame that reaches it
as activity (put a motion gate before it). A segment opens at the first keyed frame, takes the
frames that follow (untagged ones too, while it is open), and closes when:

* no keyed frame came for ``timeout`` seconds (``reason="timeout"``);
* a frame with a different key arrives (``"key_changed"``; the new key opens a new segment);
* it lasted ``max_duration`` seconds (``"max_duration"``);
* the stream ends (``"end"``).

Time is the wall clock by default (``clock="wall"``: live cameras; a timer closes a segment
even when no frame comes; the timeout counts from when the last keyed frame reached the
segmenter, so a pipeline running behind its camera does not split a segment). With
``clock="stream"`` it is the frames' own ``pts`` (recorded video
processed faster or slower than real time): a segment times out when a frame arrives ``timeout``
stream-seconds after its last keyed frame, or at the end of the stream.

The segmenter sees each source's frames in order. A closed segment flows on as a marker behind
its frames, so sinks finish its frames before ``segment.completed`` is emitted; the event carries
the segment id, source, key, first/last frame time, frame count, stored keys and the latency:
the time from the segment's last frame to the event.

Segment ids are unique per source for the pipeline's run, so stored frames never mix: a key's
first segment has the key as its id (``ORDER_1``), a key seen again after its segment closed
opens a new segment with id ``<key>.2`` (``.3`` ...). A key that itself ends in ``.<digits>``
always gets its count (``A.2`` -> ``A.2.1``, ``A.2.2`` ...), so it cannot take the id of
another key's repeat. To keep that true for the whole run, the segmenter remembers how often it
saw each distinct key (one dict entry per key). Without a key, the id is
``<source_id>-<ms>``: the first frame's ``ts_ms``, raised to one past the previous id's when
the clock did not move on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from framepipe.frames import Frame

__all__ = ["Segment", "SegmentMarker", "Segmenter", "segment_id"]

KeyFn = Callable[[Frame], "str | None"]

_NUMBERED = re.compile(r".*\.[0-9]+", re.DOTALL)
"""A key that looks like a repeat's id (``<key>.<count>``): it always gets its own count."""


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
    last_key_t: float = 0.0
    last_key_at: float = 0.0
    """Wall time the last keyed frame reached the segmenter (the timeout counts from it)."""
    frames: int = 0
    closed_at: float | None = None
    reason: str | None = None
    completed_at: float | None = None
    stored: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)
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
            "selected": list(self.selected),
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
        if timeout <= 0:
            raise ValueError(f"segment timeout must be > 0, got {timeout}")
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

    def state(self) -> _SegmenterState:
        """Fresh per-source state (one per stream pipeline)."""
        return _SegmenterState(self)


def _as_key(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def segment_id(key: str, count: int) -> str:
    """The id of the ``count``-th segment (from 1) of ``key``: ``key`` itself for the first,
    ``<key>.<count>`` after it, and always ``<key>.<count>`` for a key ending in ``.<digits>``.

    Distinct ``(key, count)`` pairs give distinct ids: an id without a ``.<digits>`` end is a
    first segment's key, any other splits at its last ``.`` into the key and the count."""
    if count == 1 and not _NUMBERED.fullmatch(key):
        return key
    return f"{key}.{count}"


class _SegmenterState:
    def __init__(self, config: Segmenter) -> None:
        self.config = config
        self.current: Segment | None = None
        self._seen: dict[str, int] = {}  # segments opened per key, for the whole run
        self._last_ms: int | None = None  # the number in the last key-less id

    def _new_id(self, key: str | None, frame: Frame) -> str:
        if not key:
            ms = frame.ts_ms if self._last_ms is None else max(frame.ts_ms, self._last_ms + 1)
            self._last_ms = ms
            return f"{frame.source_id}-{ms}"
        count = self._seen.get(key, 0) + 1
        self._seen[key] = count
        return segment_id(key, count)

    def _time(self, frame: Frame) -> float:
        if self.config.clock == "stream" and frame.pts is not None:
            return float(frame.pts)
        return frame.ts_ms / 1000.0

    def feed(self, frame: Frame) -> tuple[list[Segment], Segment | None]:
        """Route one frame: (segments closed by it, the segment it joins or None)."""
        closed: list[Segment] = []
        key = self.config._key_fn(frame)
        t = self._time(frame)
        cur = self.current
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
        if key is not None:
            if cur is not None and cur.key != (key or None):
                closed.append(self._close("key_changed"))
                cur = None
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
        elif cur is None or not self.config.include_untagged:
            return closed, None
        cur.frames += 1
        cur.last_ts_ms = frame.ts_ms
        frame.segment_id = cur.id
        return closed, cur

    def deadline(self) -> float | None:
        """Wall-clock time at which the open segment times out, or None (also with the
        stream clock, where only frames move time on)."""
        cur = self.current
        if cur is None or self.config.clock == "stream":
            return None
        # From when the key was last seen here, not captured: a pipeline running late must not
        # split a segment whose keyed frames are still on their way.
        deadline = max(cur.last_key_ts_ms / 1000.0, cur.last_key_at) + self.config.timeout
        if self.config.max_duration is not None:
            deadline = min(deadline, cur.first_ts_ms / 1000.0 + self.config.max_duration)
        return deadline

    def expire(self, now: float) -> Segment | None:
        """Close the open segment if its deadline passed."""
        deadline = self.deadline()
        if deadline is None or now < deadline:
            return None
        cur = self.current
        assert cur is not None
        over = (
            self.config.max_duration is not None
            and now >= cur.first_ts_ms / 1000.0 + self.config.max_duration
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
