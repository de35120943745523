"""The live pipeline: one supervised source, stages, an optional segmenter, sinks.

Guarantees:

* One persistent capture session at a time, supervised: its death is noticed at once, a stall
  (no frame for ``stall_timeout``) counts as a failure, restarts back off exponentially, and
  after ``max_restarts`` restarts that all failed in a row, the next failure leaves the source
  ``failed`` (the pipeline ends); ``None`` restarts forever. With
  ``after_restarts="keep_trying"`` the source is ``retrying`` instead: ``source.retrying``
  once, then an attempt every ``retry_delay`` seconds (the backoff's cap by default) with the
  reason and the next attempt's time in :meth:`health`, until frames flow again
  (``source.recovered``); the pipeline never ends for it.
* The pipeline's :attr:`~StreamPipeline.state` is its capture's (its supervisor's) while the
  capture runs, so the two never disagree: ``starting`` again after a restart until the first
  frame, ``backoff``, ``retrying`` ... (:attr:`~StreamPipeline.source_down` says whether the
  source is down after a failure).
* A recording's end (a finite source's session returning) ends the pipeline; a looped
  recording played one pass per session (``source.loops``) starts its next pass at once.
* Frames flow through bounded queues. The first stage's policy decides what a slow pipeline
  does to the capture: ``block`` makes it wait (files: no frame lost; the wait is not a stall),
  ``drop_oldest`` drops the oldest queued frame (live cameras: the newest frame matters).
* Stages before a segmenter keep the source's frame order (``ordered``), whatever their worker
  counts. A processor that raises is counted and reported (``processor.error``) and the frame is
  dropped; the pipeline goes on. A processor's own events (``self.emit(...)``, from any
  thread) reach the pipeline's listeners on the loop, in order, tagged with the pipeline and
  source.
* A bug that kills one of the pipeline's tasks fails the pipeline loudly (``pipeline.failed``,
  logged with the traceback); so does a task of the pipeline cancelled by anything but the
  pipeline's own stop or failure. Nothing waits forever on a dead task.
* ``performance()`` compares the rate at which frames are taken in with the source's nominal
  rate over the last ``performance_window`` seconds (paced sources), says why it is low, and
  never counts the capture's wait for a slow pipeline as frames.
* ``stop()`` stops the capture, lets the queued frames drain (bounded by ``drain_timeout``),
  closes open segments, and tears the stages and sinks down together (see
  :mod:`framepipe.stream.shutdown`): to their end after a run that ended on its own or a
  complete drain; each within ``teardown_timeout`` (10 s by default, never 0) and past it
  abandoned with a warning when the drain was cut short or the run failed, so ``stop()``
  returns within ``drain_timeout`` + ``teardown_timeout`` and a bit. A drain cut short still
  completes the segments it cut (the open one with ``reason="stopped"``) after the sinks'
  ``segment_closed``, and logs the captured frames it abandoned.
* Once torn down the run is over: :attr:`running` is False and every :meth:`wait` returns,
  whoever stopped it.

One concept, a live pipeline's run (capture, stages, segmenters, sinks, listeners and stop),
whose tasks share its queues and its failure handling. How a run is wired (its queues in flow
order, a hop per stage and sink) is in :mod:`framepipe.stream.wiring`; its parts with a state
of their own beside it: the run's tasks and its end (:mod:`framepipe.stream.run_tasks`), the
capture's frames into the first queue (:mod:`framepipe.stream.intake`), the segments from the
segmenter to their completion (:mod:`framepipe.stream.segment_flow`), the listeners
(:mod:`framepipe.stream.pipeline_events`) and the log of failed frames
(:mod:`framepipe.stream.processor_errors`); its decisions kept apart from its state: the
capture's supervisor (:mod:`framepipe.stream.capture_supervision`), the checks of its settings
(:mod:`framepipe.stream.pipeline_settings`), its sinks as stages
(:mod:`framepipe.stream.sink_stages`), its state (:mod:`framepipe.stream.pipeline_state`), its
performance and health report (:mod:`framepipe.stream.pipeline_health`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Sequence
from typing import Any, Literal

from framepipe.backoff import Backoff
from framepipe.errors import ProcessorError, StreamError
from framepipe.frames import Frame
from framepipe.health import HealthState
from framepipe.logs import get_logger
from framepipe.sources.base import Source
from framepipe.stream.capture_supervision import FAILURE_EVENTS, capture_supervisor, keepalive
from framepipe.stream.collector import leaving
from framepipe.stream.hop import Hop
from framepipe.stream.intake import Intake
from framepipe.stream.performance import Performance, failed_frames
from framepipe.stream.pipeline_events import EventCallback, PipelineEvents
from framepipe.stream.pipeline_health import health_report, pipeline_performance
from framepipe.stream.pipeline_settings import check_settings
from framepipe.stream.pipeline_state import pipeline_state, retried_at_cap, source_is_down
from framepipe.stream.processor_errors import ERROR_LOG_EVERY, ProcessorErrorLog
from framepipe.stream.queue import FrameQueue
from framepipe.stream.run_tasks import RunTasks
from framepipe.stream.segment import Segment, Segmenter
from framepipe.stream.segment_flow import SegmentFlow
from framepipe.stream.shutdown import Cut, abandoned_frames, tear_down
from framepipe.stream.sink_stages import segment_taken, sink_stages
from framepipe.stream.sinks import Sink
from framepipe.stream.stage import END, Stage, StageStats
from framepipe.stream.wiring import Wiring, wire
from framepipe.supervise import Supervisor, SupervisorContext

__all__ = ["ERROR_LOG_EVERY", "EventCallback", "StreamPipeline"]


class StreamPipeline:
    """``source -> stages -> segmenter -> sinks`` for one source (a station, a camera)."""

    def __init__(
        self,
        name: str,
        source: Source,
        stages: Sequence[Stage] = (),
        segmenter: Segmenter | None = None,
        sinks: Sequence[Sink | Stage] = (),
        *,
        stall_timeout: float | None = 10.0,
        start_timeout: float | None = None,
        backoff: Backoff | None = None,
        max_restarts: int | None = 5,
        healthy_after: float = 30.0,
        restart_on_end: bool | None = None,
        after_restarts: Literal["fail", "keep_trying"] = "fail",
        retry_delay: float | None = None,
        drain_timeout: float = 5.0,
        teardown_timeout: float = 10.0,
        performance_window: float = 5.0,
        on_event: EventCallback | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.stages = list(stages)
        self.segmenter = segmenter
        self.sinks = sink_stages(sinks)
        check_settings(
            name,
            max_restarts=max_restarts,
            after_restarts=after_restarts,
            stall_timeout=stall_timeout,
            start_timeout=start_timeout,
            healthy_after=healthy_after,
            retry_delay=retry_delay,
            teardown_timeout=teardown_timeout,
            performance_window=performance_window,
            names=[s.label for s in [*self.stages, *self.sinks]],
        )
        self.stall_timeout = stall_timeout
        self.start_timeout = start_timeout
        self.backoff = backoff or Backoff(2.0, 2.0, 60.0, 0.1)
        self.max_restarts = max_restarts
        self.healthy_after = healthy_after
        self.restart_on_end = source.live if restart_on_end is None else restart_on_end
        self.after_restarts = after_restarts
        self.retry_delay = retry_delay
        self.drain_timeout = drain_timeout
        self.teardown_timeout = teardown_timeout
        """The bound of each stage's teardown after a drain cut short or a failure (see
        :mod:`framepipe.stream.shutdown`); unbounded otherwise."""
        self.log = get_logger(name)
        self._events = PipelineEvents(
            name, source.source_id, self.log, [on_event] if on_event else []
        )
        source.emit = lambda kind, **data: self._events.emit(f"source.{kind}", **data)
        self._phase = HealthState.STOPPED
        """The run's own part of :attr:`state`: stopped, starting (setting up), running (its
        capture supervised: the state is the capture's) or failed."""
        self.last_error: str | None = None
        self.started_at: float | None = None
        self._intake = Intake(performance_window)
        self.frames_out = 0
        self._segments = SegmentFlow(self._events.emit, self.log)
        self.stats: list[StageStats] = []
        self.supervisor: Supervisor | None = None
        self._hops: list[Hop] = []
        self._wiring: Wiring | None = None  # the current or last run's queues and hops
        self._run: RunTasks | None = None  # the current or last run's
        self._error_log = ProcessorErrorLog(self.log)
        self._run_counts = (0, 0)  # frames queued in and out before this run

    # -- events ---------------------------------------------------------------------------------

    def on_event(self, callback: EventCallback) -> None:
        """Call ``callback(type, data)`` for each of this pipeline's events."""
        self._events.add(callback)

    # -- counts ---------------------------------------------------------------------------------

    @property
    def frames_captured(self) -> int:
        """Frames captured, over all runs."""
        return self._intake.frames

    @property
    def latest_frame(self) -> Frame | None:
        """The last frame captured (for previews; the pipeline keeps no other reference)."""
        return self._intake.latest

    @property
    def segments_completed(self) -> int:
        """Segments completed, over all runs."""
        return self._segments.completed

    @property
    def segment_latencies(self) -> collections.deque[float]:
        """The latencies (s) of the last 256 segments completed."""
        return self._segments.latencies

    @property
    def open_segment(self) -> Segment | None:
        """The segment open now, if any."""
        return self._segments.open

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between start() and the end of the run."""
        return self._run is not None and not self._run.over

    @property
    def state(self) -> HealthState:
        """The pipeline's state (the rule: :mod:`framepipe.stream.pipeline_state`): its
        capture's once launched, ``running`` while its queued frames drain after the capture
        stopped; otherwise the run's own: ``stopped`` (not started, or torn down),
        ``starting`` (its stages are being set up) or ``failed`` (a setup, a task or a stage
        failed, or the capture gave up: a failure stands until the next start)."""
        return pipeline_state(self._phase, self.supervisor, self.running)

    @property
    def source_down(self) -> bool:
        """True while the run's capture is down after a failure: backing off, stalled, retried
        at the backoff's cap, or started again and without a frame yet. Not at a first start
        (nor after a looped recording's pass), not once failed (see :attr:`state`)."""
        return source_is_down(self._phase, self.supervisor)

    async def start(self) -> None:
        """Set the processors up, start the hops and the supervised capture; returns at once.
        A last run that is over but not yet torn down (a failed run nobody waited for, or
        whose teardown is under way) is torn down first: a run never shares its stages."""
        last = self._run
        if last is not None and last.over:
            await last.tear_down(functools.partial(self._tear_down, last, self.drain_timeout))
        if self.running:
            raise StreamError(f"pipeline {self.name!r} is already running")
        run = self._run = RunTasks(self.log, self._fail)
        self._phase = HealthState.STARTING
        self.started_at = time.time()
        self.last_error = None
        self._events.attach(asyncio.get_running_loop())
        self._run_counts = (self._intake.queued, self.frames_out)
        wiring = self._build()
        try:
            for hop in self._hops:
                await hop.setup()
        except Exception as exc:
            self._phase = HealthState.FAILED
            self.last_error = f"setup failed: {type(exc).__name__}: {exc}"
            run.done.set()
            self._events.emit("pipeline.failed", error=self.last_error)
            raise
        for hop in self._hops:
            run.spawn(hop.run(), f"{self.name}:{hop.name}")
        if self.segmenter is not None:
            assert wiring.segments is not None
            run.spawn(
                self._segments.run(wiring.segments, wiring.sinks.put), f"{self.name}:segmenter"
            )
        run.spawn(self._collect(run, wiring.out), f"{self.name}:collector")
        session = functools.partial(self._capture, wiring.first)
        self.supervisor = capture_supervisor(self, session, self._on_supervisor_event)
        await self.supervisor.start()
        self._phase = HealthState.RUNNING
        run.spawn(self._end_of_capture(wiring.first), f"{self.name}:capture-end")
        self._events.emit("pipeline.started", source=self.source.describe())

    def _fail(self, error: str) -> None:
        run = self._run
        if run is None or run.over:
            return
        self._phase = HealthState.FAILED
        self.last_error = error
        self._events.emit("pipeline.failed", error=error)
        run.abort(self.supervisor.stop() if self.supervisor is not None else None)

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop the capture, drain the queued frames (at most ``drain_timeout`` seconds, 0: do
        not wait), close the open segments (those a cut drain leaves too), and tear the stages
        down: to the end after a complete drain, each within ``teardown_timeout`` seconds
        after a cut one (see :mod:`framepipe.stream.shutdown`)."""
        run = self._run
        if run is None:
            return
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        self._segments.stopping = True
        if self.supervisor is not None:
            await self.supervisor.stop()
        if not run.over:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.done.wait(), timeout)
        await run.tear_down(functools.partial(self._tear_down, run, timeout))

    async def wait(self) -> None:
        """Wait until the pipeline ends (finite source drained, failure, or stop) and is torn
        down: its capture has ended too (a capture process is gone), so a pipeline started
        again never overlaps the last one's capture of the same camera."""
        run = self._run
        assert run is not None, "pipeline not started"
        await run.done.wait()
        await run.tear_down(functools.partial(self._tear_down, run, self.drain_timeout))

    async def _tear_down(self, run: RunTasks, drain: float) -> None:
        """Tear ``run`` down (once: see :class:`~framepipe.stream.run_tasks.RunTasks`);
        ``drain``: the first caller's drain timeout, for the log."""
        # Decided before anything is cancelled: only a drained run has no call left running.
        within = None if run.drained else self.teardown_timeout
        await run.end()
        self._segments.stop_timer()
        failed = self.state is HealthState.FAILED
        cut: Cut = []
        if not failed:  # a failed run's segments are not completed: its failure stands
            cut = self._segments.cut()
        queued0, out0 = self._run_counts
        hops, self._hops = self._hops, []
        await tear_down(
            hops,
            cut,
            within=within,
            abandoned=abandoned_frames(
                self._intake.queued - queued0, self.frames_out - out0, self.stats
            ),
            drain=None if failed else drain,
            complete=self._segments.complete,
            log=self.log,
        )
        self._error_log.flush()
        self._phase = HealthState.FAILED if failed else HealthState.STOPPED
        self._events.emit("pipeline.stopped", state=self.state.value)

    async def run(self) -> None:
        """Start and wait for the end (Ctrl-C/cancel stops it gracefully)."""
        await self.start()
        try:
            await self.wait()
        finally:
            if self.running:
                await self.stop()

    async def __aenter__(self) -> StreamPipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- building -------------------------------------------------------------------------------

    def _build(self) -> Wiring:
        """Queues in flow order: stages, the segmenter, sinks, the collector (see
        :mod:`framepipe.stream.wiring`)."""
        wiring = self._wiring = wire(
            self.stages,
            self.sinks,
            segmented=self.segmenter is not None,
            source_id=self.source.source_id,
            window=self._intake.rate.window,
            events=self._events.from_processor,
            sink_control=self._segments.sink_control,
            on_error=self._on_processor_error,
            on_crash=self._on_stage_crash,
            log=self.log,
        )
        self._hops, self.stats = wiring.hops, wiring.stats
        self._segments.new_run(self.segmenter, segment_taken(self.sinks))
        self._error_log = ProcessorErrorLog(self.log)  # a new run logs its first errors
        return wiring

    # -- capture --------------------------------------------------------------------------------

    async def _capture(self, first: FrameQueue, ctx: SupervisorContext) -> None:
        """One session of the supervised capture into the run's ``first`` queue (see
        :mod:`framepipe.stream.intake`)."""
        await self._intake.capture(
            ctx,
            self.source,
            first,
            keepalive=keepalive(self.stall_timeout),
            failed=lambda: failed_frames(self.stats[: len(self.stages)]),
        )

    async def _end_of_capture(self, first: FrameQueue) -> None:
        assert self.supervisor is not None
        await self.supervisor.wait()
        health = self.supervisor.health
        if health.state is HealthState.FAILED:
            self._phase = HealthState.FAILED
            self.last_error = health.last_error
        self._segments.ended()  # the reason is decided as the capture ends
        await first.put(END)

    def _on_supervisor_event(self, kind: str, data: dict[str, Any]) -> None:
        # a capture winding down after a failure: the failure's reason stands
        ended = self._run is not None and self._run.over
        if not ended and kind in FAILURE_EVENTS:
            self.last_error = data.get("error") or self.last_error
        self._events.emit(f"source.{kind}", **{k: v for k, v in data.items() if k != "name"})

    def _on_stage_crash(self, stage: str, errors: int, error: ProcessorError) -> None:
        message = (
            f"stage {stage!r} crashed: {errors} frames failed in a row, the last with: {error}"
        )
        self.log.error("%s", message)
        self._events.emit("stage.crashed", stage=stage, errors=errors, error=message)
        self._fail(message)

    def _on_processor_error(self, error: ProcessorError) -> None:
        """Every failed frame is a ``processor.error`` event and the last error (unless the
        pipeline failed); what the log says of it: :mod:`framepipe.stream.processor_errors`."""
        if self.state is not HealthState.FAILED:  # the failure's reason stays the last error
            self.last_error = str(error)
        self._error_log.failed(error)
        self._events.emit("processor.error", stage=error.stage, seq=error.seq, error=str(error))

    # -- the end of the line ------------------------------------------------------------------

    async def _collect(self, run: RunTasks, queue: FrameQueue) -> None:
        """Count the frames out (see :mod:`framepipe.stream.collector`) until the run drained."""
        async for _frame in leaving(queue, self._segments.complete):
            self.frames_out += 1
        run.drained_out()

    # -- health ---------------------------------------------------------------------------------

    def performance(self) -> Performance:
        """How well the pipeline keeps up with its source, and why not (the rule:
        :mod:`framepipe.stream.performance`). Stopped: 1; failed, or a source down and retried
        at the backoff's cap: 0."""
        return pipeline_performance(
            state=self.state,
            last_error=self.last_error,
            retried_at_cap=retried_at_cap(self._phase, self.supervisor),
            capture=self.supervisor,
            source=self.source,
            stages=self.stages,
            sinks=self.sinks,
            stats=self.stats,
            intake=self._intake,
        )

    def performance_score(self) -> float:
        """0-1, see :meth:`performance`."""
        return self.performance().score

    def health(self) -> dict[str, Any]:
        """State, performance score (and its reading), uptime, last error, source, frames
        captured and the capture's frames per second over the measuring window, per-stage
        status (see :mod:`framepipe.stream.pipeline_health`)."""
        return health_report(
            name=self.name,
            state=self.state,
            performance=self.performance(),
            started_at=self.started_at,
            last_error=self.last_error,
            capture=self.supervisor,
            source=self.source,
            intake=self._intake,
            frames_out=self.frames_out,
            capture_dropped=self._wiring.first.dropped if self._wiring is not None else 0,
            segments=self._segments,
            stats=self.stats,
        )
