"""The decode thread's side of a :class:`~framepipe.sources.VideoSource` session: its
hand-off to the event loop and its pacing.

* :class:`Channel` bounds the frames in flight (the thread waits for room, checking the stop
  flag) and never makes a control item (opened, error, end) wait, so the end of a session
  always arrives; it wakes the event loop only when the consumer waits for an item.
* :class:`Pacer` sleeps the thread so frames leave at their pts, and raises :class:`Stopped`
  at once when the session is stopped while it sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from framepipe.pixels import Image, JpegPicture, YuvPlanes

__all__ = ["Channel", "Decoded", "Kind", "Pacer", "Stopped"]


class Stopped(Exception):
    """The consumer closed the session; unwinds the decode thread."""


@dataclass(slots=True)
class Decoded:
    picture: Image | YuvPlanes | JpegPicture
    pts: float | None
    ts_ms: int
    meta: dict[str, Any] = field(default_factory=dict)


Kind = Literal["opened", "frame", "error", "end"]


class Channel:
    """Hands items from the decode thread to the event loop.

    Frames are bounded by a semaphore (the thread waits for room, checking the stop flag);
    control items (opened, error, end) never wait, so the end of a session always arrives.
    Items wait in a deque; the event loop is woken (a ``call_soon_threadsafe``, a write to its
    self-pipe) only when the consumer is waiting for one, so a decoder that runs ahead of its
    consumer costs no wake-up per frame.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self.loop = loop
        self.items: deque[tuple[Kind, Any]] = deque()
        self.lock = threading.Lock()
        self.waiting = False  # the consumer waits on ``ready`` (guarded by ``lock``)
        self.ready = asyncio.Event()
        self.room = threading.Semaphore(capacity)
        self.stopped = threading.Event()

    def put_frame(self, item: Decoded) -> bool:
        """Queue a frame (waits for room); False once the consumer has stopped."""
        while not self.room.acquire(timeout=0.25):
            if self.stopped.is_set():
                return False
        if self.stopped.is_set():
            return False
        return self.post("frame", item)

    def post(self, kind: Kind, payload: Any = None) -> bool:
        """Queue a control item without waiting; False if the event loop is gone."""
        with self.lock:
            self.items.append((kind, payload))
            wake, self.waiting = self.waiting, False
        if not wake:
            return True
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stopped.set()
            return False
        return True

    async def get(self) -> tuple[Kind, Any]:
        while True:
            self.ready.clear()
            with self.lock:
                if self.items:
                    kind, payload = self.items.popleft()
                    break
                self.waiting = True
            await self.ready.wait()
        if kind == "frame":
            self.room.release()
        return kind, payload

    def stop(self) -> None:
        self.stopped.set()
        self.room.release()  # wake a thread waiting for room


class Pacer:
    """Sleeps the decode thread so frames leave at their pts relative to the session start.

    A frame whose pts is more than ``max_gap`` seconds after the previous frame's is a
    discontinuity (a recording resumed, a broadcast's timestamp jump), not a wait: it leaves
    at once and the pace goes on from it, so a file with an hour-long jump does not stall for
    an hour (and, supervised, restart at every stall). A frame far behind its time (a slow
    consumer) re-anchors the pace likewise instead of bursting."""

    def __init__(self, stopped: threading.Event, *, max_gap: float = 1.0) -> None:
        self.stopped = stopped
        self.max_gap = max_gap
        self.anchor: tuple[float, float] | None = None  # (monotonic, pts)
        self.last_pts: float | None = None

    def wait_until(self, pts: float) -> None:
        now = time.monotonic()
        previous, self.last_pts = self.last_pts, pts
        if self.anchor is None or (previous is not None and pts - previous > self.max_gap):
            self.anchor = (now, pts)
            return
        delay = self.anchor[0] + (pts - self.anchor[1]) - now
        if delay < -1.0:  # far behind (slow consumer): re-anchor instead of bursting
            self.anchor = (now, pts)
        elif delay > 0 and self.stopped.wait(delay):
            raise Stopped
