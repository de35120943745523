"""A live pipeline's intake: its capture's frames put into the first stage's queue, counted, and
timed for the performance score. :class:`Intake` runs inside each capture session of a
:class:`~framepipe.stream.pipeline.StreamPipeline` (the session its supervisor launches).

Guarantees:

* Each frame captured tells the supervisor the source is alive, counts (:attr:`Intake.frames`,
  over all sessions), ticks the capture rate and becomes :attr:`Intake.latest` before it is
  queued; :attr:`Intake.queued` counts those that entered the first queue (not one a session
  ended under while it waited for room).
* The first queue's policy decides what a slow pipeline does to the capture: ``block`` makes
  it wait for room, telling the supervisor every ``keepalive`` seconds that it waits (waiting
  for the pipeline is not a stall of the source); ``drop_oldest`` drops the oldest queued frame.
* A session's start (its ``started()``) records where it began (:attr:`Intake.session`): the
  time, the frames captured and failed before it, which the performance score measures from.
* The source's frame iterator is closed when the session ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable

from framepipe.frames import Frame
from framepipe.sources.base import Source
from framepipe.stream.performance import RateWindow, Session
from framepipe.stream.queue import FrameQueue
from framepipe.supervise import SupervisorContext

__all__ = ["Intake"]


class Intake:
    """The capture side of one pipeline, its capture rate measured over ``window`` seconds."""

    def __init__(self, window: float) -> None:
        self.frames = 0
        """Frames captured, over all runs."""
        self.queued = 0
        """Of those, the frames that entered the first queue: a frame whose capture session
        ended (a stop, a restart) while it waited for room there never enters the pipeline."""
        self.rate = RateWindow(window)
        """The capture's frames per second over the window."""
        self.session: Session | None = None
        """Where the current capture session started (None before the first)."""
        self.latest: Frame | None = None
        """The last frame captured (the intake keeps no other reference)."""

    async def capture(
        self,
        ctx: SupervisorContext,
        source: Source,
        first: FrameQueue,
        *,
        keepalive: float,
        failed: Callable[[], int],
    ) -> None:
        """One capture session of ``source`` into ``first``; ``failed()`` counts the frames
        failed in the stages so far."""

        def started(pid: int | None) -> None:
            self.session = Session(time.monotonic(), self.frames, failed())
            ctx.started(pid)

        async with contextlib.aclosing(source.frames(started=started)) as frames:
            await self._pump(ctx, frames, first, keepalive)

    async def _pump(
        self,
        ctx: SupervisorContext,
        frames: AsyncGenerator[Frame, None],
        first: FrameQueue,
        keepalive: float,
    ) -> None:
        async for frame in frames:
            ctx.alive()
            self.frames += 1
            self.rate.tick()
            self.latest = frame
            if len(first) < first.maxsize or first.overflow != "block":
                await first.put(frame)
                self.queued += 1
                continue
            # Backpressure: waiting for the pipeline is not a stall of the source.
            put = asyncio.ensure_future(first.put(frame))
            try:
                while not put.done():
                    await asyncio.wait({put}, timeout=keepalive)
                    ctx.waiting()
            finally:
                if put.done() and not put.cancelled():
                    self.queued += 1
                put.cancel()
