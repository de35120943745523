"""The segments of a live pipeline's runs, from the segmenter to their completion: a
:class:`SegmentFlow` runs the segmenter's task of each run, follows each closed segment through
the sinks, and completes it.

Guarantees:

* The segmenter sees the frames in the order they reach it; each frame flows on after the
  segments it closed, as markers, so a sink has a segment's frames before its marker.
* With the wall clock, a segment times out on its deadline even when no frame comes: a timer,
  armed for the earliest deadline, puts a tick on the segmenter's queue (nothing polls). A
  run's timer ends with the run: the next run of the pipeline (a resume, a recovery) arms its
  own.
* ``segment.started`` is emitted when a frame opens a segment; every segment closed is
  followed until it completes: a segment is completed (``segment.completed``, counted, its
  latency kept, one log line) once its marker came out of the last sink, or when a stop cut
  its way short (:meth:`SegmentFlow.cut`, see :mod:`framepipe.stream.shutdown`). A sink's
  ``segment_closed`` runs in a thread of its own and is noted, so a stop never calls it twice.
* The end of the stream closes every open segment before it flows on: ``reason="end"`` when
  the stream ended by itself (a file played to its end, a source that failed for good),
  ``"stopped"`` when a stop ended it, so an order cut by a stop is told from a recording's
  end. Which is decided when the capture ends (:meth:`SegmentFlow.ended`), not when the end
  reaches the segmenter: a recording that ended before a stop came, its last frames still
  in the stages, says ``"end"``.
* With ``taken`` (the pipeline's sinks' :meth:`~framepipe.stream.sinks.Sink.segment_taken`),
  an id is asked about once, in a thread, before a frame could open a segment with it: an id
  an earlier run's frames hold in the store is not issued again (``ORDER_1`` of a restarted
  service is ``ORDER_1.2``, its frames apart). One question is in flight at a time, in a
  thread of its own. The frames wait for it only at a frame that opens a segment, and at
  most ``TAKEN_TIMEOUT`` seconds: an answer that does not come by then, or an error (the
  store away), lets the id be used, logged as a warning once until an answer comes again.
  While that question is still unanswered, the ids of the next segments are used without
  asking or waiting, so a store that does not answer holds the frames back once, not at
  every order, and keeps one thread. The id a key's next segment would get
  (``ORDER_1.2``) is asked about in the background while its segment is open, so a segment
  that reopens has its id checked already; one that reopens before that answer came waits
  for it as a new key's segment does (``TAKEN_TIMEOUT`` counts from when a frame first
  waits for an answer, not from when it was asked).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Awaitable, Callable
from logging import Logger, LoggerAdapter
from typing import Any

from framepipe.frames import Frame
from framepipe.stream.lanes import run_detached
from framepipe.stream.queue import FrameQueue
from framepipe.stream.segment import Segment, Segmenter, SegmenterState, SegmentMarker
from framepipe.stream.shutdown import Cut, cut_segments
from framepipe.stream.sinks import Sink
from framepipe.stream.stage import END

__all__ = ["SegmentFlow"]


@dataclasses.dataclass
class _Asking:
    """A question about ``segment_id`` of the run ``state``, waited for until ``deadline``
    (None until a frame waits for it: a question asked in the background)."""

    future: concurrent.futures.Future[bool]
    segment_id: str
    state: SegmenterState
    deadline: float | None


class _Tick:
    control = True


_TICK = _Tick()

Control = Callable[[Any], Awaitable[None]]
Taken = Callable[[Frame, str], bool]

TAKEN_TIMEOUT = 2.0
"""Seconds to wait for the sinks to say whether an earlier run used a segment id."""


class SegmentFlow:
    """The segments of one pipeline; counts over all its runs, the rest per run (see
    :meth:`new_run`). ``emit(kind, **data)`` announces them; ``log`` is the pipeline's."""

    def __init__(self, emit: Callable[..., None], log: Logger | LoggerAdapter[Any]) -> None:
        self._emit = emit
        self._log = log
        self.completed = 0
        """Segments completed, over all runs."""
        self.latencies: collections.deque[float] = collections.deque(maxlen=256)
        """The latencies (s) of the last 256 segments completed."""
        self.open: Segment | None = None
        """The segment open now, if any."""
        self._segmenter: Segmenter | None = None
        self._state: SegmenterState | None = None  # the segmenter's, for this run
        self._closing: dict[int, tuple[Segment, set[str]]] = {}
        """Segments closed but not completed yet (their markers are on their way through the
        sinks), by ``id()``, with the sinks whose ``segment_closed`` has been called for them."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._taken: Taken | None = None
        self._unsure = False  # the last question about an id went unanswered
        self._asking: _Asking | None = None  # the question about an id in flight
        self.stopping = False
        """Set by the pipeline's stop, before it stops the capture."""
        self._end_reason = "end"  # why this run's stream ended, once its capture ended

    def new_run(self, segmenter: Segmenter | None, taken: Taken | None = None) -> None:
        """A run begins, segmented by ``segmenter`` (None: no segmenter); ``taken(frame,
        segment_id)`` says whether an earlier run used an id (see the module docstring)."""
        self._segmenter = segmenter
        self._state = segmenter.state() if segmenter is not None else None
        self._closing = {}
        self._taken = taken
        self.stopping = False
        self._end_reason = "end"

    def ended(self) -> None:
        """This run's capture ended: by a stop (:attr:`stopping` set: its open segments close
        as ``"stopped"``) or by itself (``"end"``)."""
        self._end_reason = "stopped" if self.stopping else "end"

    async def _settle(self, state: SegmenterState, frame: Frame, taken: Taken) -> None:
        """Ask ``taken`` about the id ``frame``'s key would get next, until one is free
        (``frame`` has been through :meth:`~SegmenterState.close_before`). Only
        a frame that opens a segment waits, and for each question at most ``TAKEN_TIMEOUT``
        seconds from when a frame first waited for it; one past that is unanswered, and the
        id is used without waiting. A frame that joins its key's segment asks about the id of
        the key's next segment in the background, without waiting."""
        key = state.key_of(frame)
        if not key:
            return
        self._collect(state)
        opening = state.current is None  # close_before(frame) closed what it closes
        while (segment_id := state.ids.unchecked(key)) is not None:
            asking = self._asking
            if asking is None:
                asking = self._ask(state, frame, segment_id, taken)
                if not opening:
                    return
            elif not opening:
                return
            if asking.deadline is None:  # asked in the background: the wait starts now
                asking.deadline = time.monotonic() + TAKEN_TIMEOUT
            wait = asking.deadline - time.monotonic()
            if wait <= 0:  # the store has not answered: the frames wait no more
                self._unanswered(segment_id, TimeoutError())
                state.ids.checked(segment_id, taken=False)
                return
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(asking.future)), wait)
            except TimeoutError:
                continue
            except Exception:  # its error is taken by _collect
                pass
            self._collect(state)

    def _ask(self, state: SegmenterState, frame: Frame, segment_id: str, taken: Taken) -> _Asking:
        """Ask about ``segment_id`` in a thread of its own: one question at a time, so a store
        that does not answer keeps one thread waiting, not one per order."""
        future: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def ask() -> None:
            try:
                answer = taken(frame, segment_id)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(answer)

        self._asking = _Asking(future, segment_id, state, None)
        threading.Thread(target=ask, name="fp-segment-ids", daemon=True).start()
        return self._asking

    def _collect(self, state: SegmenterState) -> None:
        """Take the answer to the question asked, if it came (an error lets the id be used)."""
        asking = self._asking
        if asking is None or not asking.future.done():
            return
        self._asking = None
        error = asking.future.exception()
        if error is not None:  # the store away (or any failure): the id is used
            self._unanswered(asking.segment_id, error)
            asking.state.ids.checked(asking.segment_id, taken=False)
            return
        if self._unsure:
            self._log.info("segment ids are checked against the stored frames again")
            self._unsure = False
        asking.state.ids.checked(asking.segment_id, taken=asking.future.result())

    def _unanswered(self, segment_id: str, exc: BaseException) -> None:
        if self._unsure:
            return
        self._log.warning(
            "cannot tell whether an earlier run stored frames under segment id %s (%s); using "
            "it, so its frames may sit beside that run's",
            segment_id,
            f"no answer within {TAKEN_TIMEOUT:g}s"
            if isinstance(exc, TimeoutError)
            else f"{type(exc).__name__}: {exc}",
        )
        self._unsure = True

    async def run(self, queue: FrameQueue, out: Callable[[Any], Awaitable[None]]) -> None:
        """The segmenter's task: takes from ``queue``, puts frames and markers to ``out``
        until the end of the stream (put too)."""
        state = self._state
        assert state is not None

        def follow(closed: list[Segment]) -> None:
            for seg in closed:  # all of them before the first wait: a stop may cut it
                self._closing[id(seg)] = (seg, set())

        async def send(closed: list[Segment]) -> None:
            follow(closed)
            for seg in closed:
                await out(SegmentMarker(seg))

        while True:
            item = await queue.get()
            if item is END:
                await send(state.close_all(self._end_reason))
                self.open = None
                await out(END)
                return
            if item is _TICK:
                self._timer_at = None
                expired = state.expire(time.monotonic())
                if expired is not None:
                    self.open = None
                    await send([expired])
                self._arm(queue, state.deadline())
                continue
            if isinstance(item, Frame):
                closed = state.close_before(item)
                follow(closed)
                if self._taken is not None:  # else nothing to ask: no work per frame
                    await self._settle(state, item, self._taken)
                joined = state.join(item)
                await send(closed)
                if joined is not None and joined is not self.open:
                    self.open = joined
                    self._emit(
                        "segment.started",
                        segment_id=joined.id,
                        key=joined.key,
                        first_ts_ms=joined.first_ts_ms,
                    )
                elif joined is None and state.current is None:
                    self.open = None
                self._arm(queue, state.deadline())
            await out(item)

    def _arm(self, queue: FrameQueue, deadline: float | None) -> None:
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()), queue.put_control, _TICK
        )

    def sink_control(self, sink: Sink, name: str) -> Control:
        """What sink ``name`` does with a segment's marker: its ``segment_closed``, noted."""

        async def control(item: Any) -> None:
            if isinstance(item, SegmentMarker):
                closing = self._closing.get(id(item.segment))
                if closing is not None:  # a stop cutting the drain short must not call it again
                    closing[1].add(name)
                await run_detached(
                    sink.segment_closed,
                    item.segment,
                    what=f"sink {name!r}: segment_closed({item.segment.id})",
                    thread=f"fp-{name}-segment_closed",
                    log=self._log,
                )

        return control

    def complete(self, seg: Segment) -> None:
        """Count, log and emit ``segment.completed`` for ``seg``, whose sinks are done with it
        (or were cut short by a stop)."""
        self._closing.pop(id(seg), None)
        seg.completed_at = time.time()
        self.completed += 1
        if seg.latency_s is not None:
            self.latencies.append(seg.latency_s)
        data = seg.to_dict()
        label = self._segmenter.label if self._segmenter is not None else "segment"
        self._log.info(
            "%s %s completed: latency=%.1fs frames=%d%s",
            label[:1].upper() + label[1:],
            seg.id,
            seg.latency_s or 0.0,
            seg.frames,
            (f" (not stored={seg.not_stored})" if seg.not_stored else "")
            + (f" (kept locally={len(seg.spooled)})" if seg.spooled else ""),
        )
        self._emit("segment.completed", **data)

    def stop_timer(self) -> None:
        """The run's tasks ended: no tick comes any more, and none is waited for (the next
        run arms its own)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = None

    def cut(self) -> Cut:
        """A stop cut the run: the segments whose markers had not come out of the sinks, then
        the open one, closed now with ``reason="stopped"`` (to be completed after the sinks
        that had not had them)."""
        cut = cut_segments(self._closing, self._state)
        self.open = None
        return cut
