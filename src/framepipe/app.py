"""The orchestrator: several live pipelines (one per station or camera) run side by side.

Guarantees: each pipeline is isolated (a dead camera, a failing processor or a crashed task
in one never stops another); ``start()`` starts them concurrently and a pipeline added while
running starts at once; ``stop()`` stops them concurrently with a bounded drain, after the
starts under way, so that once it returns no pipeline runs (``start()`` and ``stop()`` take
turns in call order, each run whole). A pipeline whose source failed for good is restarted
after ``restart_cooldown`` seconds, at most ``max_restart_attempts`` times in a row
(auto-recovery), then reported with ``system_error``; once a recovered pipeline's capture has
run ``healthy_after`` seconds (the pipeline's own setting) without a failure, its recoveries
are forgotten (``pipeline.healthy``): transient faults far apart never use the budget up.
Every few seconds the app checks performance (``performance_warning`` below
``performance_threshold``) and writes a health snapshot that ``framepipe health`` /
``framepipe sources`` read from another terminal, and each pipeline's latest frame as a small
JPEG beside it (where, and how other processes read them:
:mod:`framepipe.snapshots`). The values an app reports (:class:`SystemState`,
:class:`AppHealth`) are defined in :mod:`framepipe.app_health`; this module exports them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple

from framepipe.app_health import AppHealth, SystemState
from framepipe.config import Settings, load_settings
from framepipe.errors import FramepipeError, StreamError
from framepipe.health import HealthState
from framepipe.liveness import this_host
from framepipe.logs import get_logger
from framepipe.snapshots import (
    PREVIEW_QUALITY,
    check_app_name,
    preview_dir,
    preview_file_name,
    preview_jpeg,
    preview_path,
    read_snapshots,
    snapshot_path,
)
from framepipe.stream.pipeline import StreamPipeline
from framepipe.supervise import Supervisor
from framepipe.telemetry import event_sink_metrics, metrics_registry, render
from framepipe.urls import safe_json

__all__ = [
    "App",
    "AppHealth",
    "SystemState",
    "preview_dir",
    "preview_file_name",
    "preview_path",
    "read_snapshots",
]

Callback = Callable[[str, dict[str, Any]], Any]


class App:
    """Holds stream pipelines and runs them with isolation, recovery, health and metrics."""

    def __init__(
        self,
        name: str = "framepipe",
        *,
        settings: Settings | None = None,
        auto_recovery: bool = True,
        max_restart_attempts: int = 3,
        restart_cooldown: float = 30.0,
        health_interval: float = 2.0,
        performance_threshold: float = 0.5,
    ) -> None:
        self.name = check_app_name(name)
        """The app's name, also that of its snapshot and previews (see
        :func:`~framepipe.snapshots.check_app_name`: a name with ``/``, NUL or malformed
        Unicode, or ``.``/``..``, is refused with a :class:`~framepipe.errors.ConfigError`)."""
        self.settings = settings or load_settings()
        self.auto_recovery = auto_recovery
        self.max_restart_attempts = max_restart_attempts
        self.restart_cooldown = restart_cooldown
        self.health_interval = health_interval
        self.performance_threshold = performance_threshold
        self.pipelines: dict[str, StreamPipeline] = {}
        self._previewed: dict[str, Any] = {}
        self.restart_attempts: dict[str, int] = {}
        """Each pipeline's recoveries in a row (forgotten once it ran healthy)."""
        self._healthy: dict[str, _HealthyWatch] = {}
        self.state = SystemState.STOPPED
        self.last_error: str | None = None
        self.started_at: float | None = None
        self.log = get_logger(f"app.{name}")
        self._callbacks: dict[str, list[Callback]] = {}
        self._callback_tasks: set[asyncio.Future[Any]] = set()
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.paused: set[str] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._stopping = False
        self._in_flight: dict[asyncio.Task[Any], str] = {}
        """Pipeline starts under way (start(), add(), resume(), a recovery), with the name of
        the pipeline each starts: stop() waits for them all, remove() and pause() for those of
        their pipeline."""
        self._turns: tuple[asyncio.Lock, asyncio.AbstractEventLoop] | None = None
        self.registry = metrics_registry(lambda: list(self.pipelines.values()))
        self.mqtt: Any = None
        """The :class:`~framepipe.mqtt.MqttEventSink` of setting ``mqtt_url`` while running."""

    # -- events ---------------------------------------------------------------------------------

    def on(self, event: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event, data)`` (sync or async) on ``event`` (``"*"`` for all):
        ``segment.completed``, ``segment.started``, ``source.started|died|stalled|restarting|
        failed``, ``processor.error``, ``pipeline.started|stopped|failed|recovered|healthy|
        paused|resumed|removed``, ``system_error``, ``performance_warning``. Returns a function
        that unregisters it."""
        self._callbacks.setdefault(event, []).append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks[event].remove(callback)

        return remove

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Deliver an event to its callbacks; a raising callback is logged, never propagated."""
        for callback in (*self._callbacks.get(event, ()), *self._callbacks.get("*", ())):
            try:
                result = callback(event, data)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._callback_tasks.add(task)  # the loop holds tasks only weakly
                    task.add_done_callback(self._callback_done)
            except Exception:
                self.log.exception("callback for %s raised; ignored", event)
        if event == "source.started":
            self._watch_health(data.get("pipeline"))
            if data.get("attempt", 0):
                self.emit("source.restarted", data)

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.log.error("async callback raised: %r", task.exception())

    # -- pipelines ------------------------------------------------------------------------------

    async def add(self, pipeline: StreamPipeline) -> StreamPipeline:
        """Add a pipeline; if the app runs, it starts now (its first frame follows within the
        source's open time)."""
        if pipeline.name in self.pipelines:
            raise StreamError(f"app {self.name!r} already has a pipeline {pipeline.name!r}")
        self.pipelines[pipeline.name] = pipeline
        pipeline.on_event(self.emit)
        if self.state in _RUNNING:
            await self._start_one(pipeline)
        return pipeline

    def add_pipeline(self, pipeline: StreamPipeline) -> StreamPipeline:
        """Add a pipeline before :meth:`start` (sync form of :meth:`add`); a name the app
        has, or an app not stopped, raises :class:`~framepipe.errors.StreamError`."""
        if self.state not in (SystemState.STOPPED,):
            raise StreamError(
                f"app {self.name!r} is {self.state.value}: add a pipeline to a running app "
                "with 'await app.add(pipeline)'"
            )
        if pipeline.name in self.pipelines:
            raise StreamError(f"app {self.name!r} already has a pipeline {pipeline.name!r}")
        self.pipelines[pipeline.name] = pipeline
        pipeline.on_event(self.emit)
        return pipeline

    async def remove(self, name: str) -> None:
        """Stop and remove one pipeline, then emit ``pipeline.removed`` (its last event: the
        MQTT sink clears its retained topics); the others keep running. Everything the app
        kept about it (paused, its recoveries, its performance warning, its last preview
        frame) is forgotten: a pipeline added later under the same name starts afresh. A start
        of it under way (:meth:`add`, :meth:`resume`, a recovery) ends first; then it stops,
        and nothing watches or recovers it."""
        pipeline = self.pipelines.pop(name)
        watcher = self._watchers.pop(name, None)
        if watcher is not None:
            watcher.cancel()
        self.paused.discard(name)
        self.reset_recovery(name)
        self._warned.discard(name)
        self._previewed.pop(name, None)
        await self._starts_of(name)  # a start under way ends first, then the stop
        await pipeline.stop()
        self.emit("pipeline.removed", {"pipeline": name})

    async def pause(self, name: str) -> None:
        """Stop one pipeline and keep it (state ``stopped``, not recovered) until
        :meth:`resume`; the others keep running. A start of it under way ends first, then it
        stops."""
        pipeline = self.pipelines[name]
        self.paused.add(name)
        self._unwatch_health(name)
        watcher = self._watchers.pop(name, None)
        if watcher is not None:
            watcher.cancel()
        await self._starts_of(name)  # a start under way ends first, then the stop
        await pipeline.stop()
        self.emit("pipeline.paused", {"pipeline": name})

    async def resume(self, name: str) -> None:
        """Start a paused pipeline again (its source restarts; counters go on), or one whose
        recovery gave up (failed and no longer watched: an operator fixed its camera), with
        its recoveries forgotten, so auto-recovery has ``max_restart_attempts`` again. A
        pipeline that runs, or is being recovered, is left as it is. While the app is not
        running (stopped, or stopping) nothing starts: the pause is forgotten and
        :meth:`start` starts the pipeline with the others."""
        pipeline = self.pipelines[name]
        if self._stopping or self.state not in _RUNNING:
            self.paused.discard(name)
            self.log.warning(
                "resume(%r) while the app is %s: not started now (start() starts it)",
                name,
                self.state.value,
            )
            return
        if name in self.paused:
            self.paused.discard(name)
        elif self._gave_up(name):
            self.reset_recovery(name)
        else:
            return
        await self._start_one(pipeline)
        self.emit("pipeline.resumed", {"pipeline": name})

    def _gave_up(self, name: str) -> bool:
        """The pipeline failed and nothing will start it again (recovery gave up, or is off)."""
        watcher = self._watchers.get(name)
        failed = self.pipelines[name].state is HealthState.FAILED
        return failed and (watcher is None or watcher.done())

    def reset_recovery(self, name: str | None = None) -> None:
        """Forget the recoveries counted for pipeline ``name`` (every pipeline when None), e.g.
        once an operator fixed its camera: auto-recovery has ``max_restart_attempts`` again."""
        for watched in list(self._healthy) if name is None else [name]:
            self._unwatch_health(watched)
        if name is None:
            self.restart_attempts.clear()
        else:
            self.restart_attempts.pop(name, None)

    def _watch_health(self, name: str | None) -> None:
        """A session of pipeline ``name``'s capture delivered its first frame: if the pipeline
        was recovered, its recoveries are forgotten once that run has gone on
        ``pipeline.healthy_after`` seconds without a failure (:meth:`_on_healthy`). A run is
        the capture's sessions until one fails: the next pass of a looped recording goes on
        with it, a session started after a failure begins a new one."""
        pipeline = self.pipelines.get(name) if name is not None else None
        capture = pipeline.supervisor if pipeline is not None else None
        if pipeline is None or capture is None or not self.restart_attempts.get(pipeline.name):
            return
        run = (capture, capture.health.restarts)
        watch = self._healthy.get(pipeline.name)
        if watch is not None and watch.run == run:
            return  # the run goes on
        self._unwatch_health(pipeline.name)
        timer = asyncio.get_running_loop().call_later(
            pipeline.healthy_after, self._on_healthy, pipeline, run
        )
        self._healthy[pipeline.name] = _HealthyWatch(run, timer)

    def _unwatch_health(self, name: str) -> None:
        watch = self._healthy.pop(name, None)
        if watch is not None:
            watch.timer.cancel()

    def _on_healthy(self, pipeline: StreamPipeline, run: tuple[Supervisor, int]) -> None:
        """``healthy_after`` seconds after the first frame of a recovered pipeline's run: if
        that run still goes on (the same capture, not restarted since, not down, the pipeline
        neither failed, stopped, paused nor removed), its recoveries are forgotten."""
        name = pipeline.name
        watch = self._healthy.get(name)
        if watch is not None and watch.run == run:
            del self._healthy[name]
        capture, restarts = run
        attempts = self.restart_attempts.get(name, 0)
        if (
            not attempts
            or self._stopping
            or not self._kept(pipeline)
            or pipeline.supervisor is not capture
            or capture.health.restarts != restarts
            or not pipeline.running
            or pipeline.source_down
            or pipeline.state is HealthState.FAILED
        ):
            return
        del self.restart_attempts[name]
        self.log.info(
            "[%s] ran %gs without a failure: its %d recover%s forgotten, %d left",
            name,
            pipeline.healthy_after,
            attempts,
            "y is" if attempts == 1 else "ies are",
            self.max_restart_attempts,
        )
        self.emit(
            "pipeline.healthy",
            {"pipeline": name, "recoveries": attempts, "healthy_after": pipeline.healthy_after},
        )

    async def _start_one(self, pipeline: StreamPipeline) -> None:
        """Start a pipeline and watch it; one that fails to start (a model that does not load)
        is failed and goes through recovery like one that failed later. The start goes on to
        its end if the caller is cancelled (:meth:`stop` waits for it, then stops it)."""
        await asyncio.shield(self._launch(self._start_and_watch(pipeline), pipeline.name))

    async def _start_and_watch(self, pipeline: StreamPipeline) -> None:
        await self._start_pipeline(pipeline, "pipeline %r failed to start")
        # else the stop(), remove() or pause() under way stops it
        if not self._stopping and self._kept(pipeline):
            self._watchers[pipeline.name] = asyncio.create_task(
                self._watch(pipeline), name=f"watch-{pipeline.name}"
            )

    async def _start_pipeline(self, pipeline: StreamPipeline, failure: str) -> bool:
        """``pipeline.start()``; False (logged with ``failure``) if it raised."""
        try:
            await pipeline.start()
        except Exception:
            self.log.exception(failure, pipeline.name)
            return False
        return True

    def _kept(self, pipeline: StreamPipeline) -> bool:
        """The pipeline is still this app's and not paused."""
        return self.pipelines.get(pipeline.name) is pipeline and pipeline.name not in self.paused

    def _launch(self, start: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run pipeline ``name``'s start as a task of its own, which :meth:`stop` (and
        :meth:`remove` and :meth:`pause` of that pipeline) wait for: a start is never cut
        half-way (its stages set up, its capture not yet supervised)."""
        task = asyncio.ensure_future(start)
        self._in_flight[task] = name
        task.add_done_callback(lambda done: self._in_flight.pop(done, None))
        return task

    async def _starts_of(self, name: str) -> None:
        """Return once no start of pipeline ``name`` is under way."""
        while starts := {t for t, n in self._in_flight.items() if n == name}:
            await asyncio.wait(starts)

    async def _watch(self, pipeline: StreamPipeline) -> None:
        """Wait for a pipeline's end; recover it if it failed."""
        while True:
            await pipeline.wait()
            if self._stopping or pipeline.state is not HealthState.FAILED:
                return
            self._unwatch_health(pipeline.name)
            attempts = self.restart_attempts.get(pipeline.name, 0)
            error = pipeline.last_error or "unknown error"
            if not self.auto_recovery or attempts >= self.max_restart_attempts:
                self._error(
                    pipeline.name,
                    f"pipeline {pipeline.name!r} failed: {error}"
                    + (f" (after {attempts} recoveries)" if attempts else ""),
                )
                return
            self.restart_attempts[pipeline.name] = attempts + 1
            self.log.warning(
                "[%s] recovering in %gs (recovery %d of %d): %s",
                pipeline.name,
                self.restart_cooldown,
                attempts + 1,
                self.max_restart_attempts,
                error,
            )
            await asyncio.sleep(self.restart_cooldown)
            if self._stopping:
                return
            start = self._start_pipeline(pipeline, "recovery of %r failed to start")
            if not await asyncio.shield(self._launch(start, pipeline.name)):
                continue  # failed again: the loop counts it as the next failure
            self.emit(
                "pipeline.recovered",
                {"pipeline": pipeline.name, "attempt": attempts + 1, "reason": error},
            )

    def _error(self, pipeline: str, message: str) -> None:
        self.last_error = message
        self.log.error("%s", message)
        self.emit("system_error", {"pipeline": pipeline, "error": message})

    # -- lifecycle ------------------------------------------------------------------------------

    def _lifecycle(self) -> asyncio.Lock:
        """The lock :meth:`start` and :meth:`stop` hold for their whole run, one per event
        loop (an app may be run by one ``asyncio.run`` after another)."""
        loop = asyncio.get_running_loop()
        if self._turns is None or self._turns[1] is not loop:
            self._turns = (asyncio.Lock(), loop)
        return self._turns[0]

    async def start(self) -> None:
        """Start every pipeline concurrently, then the health monitor.

        :meth:`start` and :meth:`stop` take turns, in the order they are called, each run
        whole: a ``stop()`` called while the app starts waits for the pipelines being
        started, then stops them all, so nothing this start started runs once that
        ``stop()`` returned; a ``start()`` called while the app stops starts it again once it
        stopped. A ``start()`` of an app that runs (another ``start()`` got there first)
        raises :class:`~framepipe.errors.StreamError` naming the app and its state."""
        async with self._lifecycle():
            if self.state is not SystemState.STOPPED:
                raise StreamError(
                    f"app {self.name!r} is already {self.state.value}: stop() it first"
                )
            if self.settings.mqtt_url and self.mqtt is None:
                from framepipe.mqtt import MqttEventSink

                self.mqtt = MqttEventSink(self.settings.mqtt_url).attach(self)
            self._stopping = False
            self.paused.clear()
            self.state = SystemState.STARTING
            self.started_at = time.time()
            await asyncio.gather(*(self._start_one(p) for p in self.pipelines.values()))
            self.state = SystemState.RUNNING
            self._monitor = asyncio.create_task(self._monitor_loop(), name=f"monitor-{self.name}")
            self.log.info("app started with %d pipeline(s)", len(self.pipelines))

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop every pipeline concurrently (each drains for at most ``timeout`` seconds).

        Pipeline starts under way (of :meth:`start`, :meth:`add`, :meth:`resume` or a
        recovery) are waited for first, whole (a model's setup is not cut short), then
        stopped with the others: once ``stop()`` returns, no pipeline the app started runs.
        A ``stop()`` while the app starts or stops waits for that to end (see :meth:`start`);
        one of a stopped app returns."""
        async with self._lifecycle():
            if self.state is not SystemState.STOPPED:
                await self._stop(drain=timeout)

    async def _stop(self, *, drain: float) -> None:
        self._stopping = True
        self.state = SystemState.STOPPING
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        watchers = list(self._watchers.values())
        for watcher in watchers:
            watcher.cancel()
        for name in list(self._healthy):
            self._unwatch_health(name)
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))
        await asyncio.gather(
            *(p.stop(drain_timeout=drain) for p in self.pipelines.values()),
            *watchers,
            return_exceptions=True,
        )
        self._watchers.clear()
        self.state = SystemState.STOPPED
        try:
            self._write_snapshot()
        except Exception:  # the snapshot is for other processes: never stops the stop
            self.log.exception("health snapshot not written")
        finally:
            if self.mqtt is not None:
                try:
                    await self.mqtt.aclose()  # publishes what is queued, then 'offline'
                finally:
                    self.mqtt = None
        self.log.info("app stopped")

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait(self) -> None:
        """Return once every pipeline ended for good (finished, or failed beyond recovery)."""
        while self._watchers and not all(w.done() for w in self._watchers.values()):
            await asyncio.wait(list(self._watchers.values()))

    async def run(self, until: asyncio.Event | None = None) -> None:
        """Start, run until ``until`` is set (or every pipeline ended), then stop."""
        await self.start()
        try:
            ended = asyncio.create_task(self.wait())
            waits: set[asyncio.Future[Any]] = {ended}
            if until is not None:
                waits.add(asyncio.ensure_future(until.wait()))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        finally:
            await self.stop()

    # -- health ---------------------------------------------------------------------------------

    def health(self) -> AppHealth:
        """State, performance score (mean of the pipelines'), uptime, last error and
        per-pipeline status. A running app is ``DEGRADED`` while a pipeline has failed, its
        source is down (:attr:`StreamPipeline.source_down`: backing off, stalled, retried at
        the backoff's cap, or restarted without a frame yet) or its score is below
        ``performance_threshold``, or an attached event sink cannot write (its events wait in
        its queue and are lost if the queue overflows); ``FAILED`` once every pipeline has
        failed. A pipeline's ``state`` is :attr:`StreamPipeline.state` (``stopped`` while
        paused); ``event_sinks`` holds each attached sink's counts."""
        statuses = {name: p.health() for name, p in self.pipelines.items()}
        for name in self.paused & statuses.keys():
            statuses[name]["state"] = "stopped"
        scores = [s["performance_score"] for n, s in statuses.items() if n not in self.paused]
        failed = [n for n, s in statuses.items() if s["state"] == HealthState.FAILED.value]
        down = [n for n, p in self.pipelines.items() if p.source_down and n not in self.paused]
        sinks = [
            {
                "sink": sink.kind,
                "target": sink.target,
                "written": sink.written,
                "dropped": sink.dropped,
                "pending": sink.pending,
                "failing_since": sink.failing_since,
            }
            for sink in event_sink_metrics(self.registry).sinks
        ]
        sink_failing = any(s["failing_since"] is not None for s in sinks)
        state = self.state
        if state is SystemState.RUNNING and failed:
            state = SystemState.FAILED if len(failed) == len(statuses) else SystemState.DEGRADED
        elif state is SystemState.RUNNING and (
            down or sink_failing or (scores and min(scores) < self.performance_threshold)
        ):
            state = SystemState.DEGRADED
        return AppHealth(
            name=self.name,
            state=state,
            performance_score=round(sum(scores) / len(scores), 3) if scores else 1.0,
            uptime=round(time.time() - self.started_at, 3) if self.started_at else 0.0,
            last_error=self.last_error,
            pid=os.getpid(),
            updated_at=time.time(),
            host=this_host(),
            pipeline_status=statuses,
            event_sinks=sinks,
        )

    def metrics_text(self) -> str:
        """Prometheus text exposition of every pipeline's metrics."""
        return render(self.registry)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                for name, pipeline in self.pipelines.items():
                    if pipeline.state is not HealthState.RUNNING:
                        continue
                    score = pipeline.performance_score()
                    if score < self.performance_threshold and name not in self._warned:
                        self._warned.add(name)
                        self.emit("performance_warning", {"pipeline": name, "score": score})
                    elif score >= self.performance_threshold:
                        self._warned.discard(name)
                self._write_snapshot()
            except Exception:
                self.log.exception("health monitor pass failed")

    @property
    def snapshot_path(self) -> Path:
        """Where this app's health snapshot is written."""
        return snapshot_path(self.settings, self.name)

    def _write_snapshot(self) -> None:
        path = self.snapshot_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(safe_json(self.health().to_dict()), default=str))
        os.replace(tmp, path)
        self._write_previews()

    def _write_previews(self) -> None:
        """The latest frame of each pipeline as a small JPEG beside the snapshot
        (:func:`preview_path`), for dashboards in other processes; one that cannot be written
        is logged and the others are written."""
        folder = preview_dir(self.settings, self.name)
        for name, pipeline in self.pipelines.items():
            try:
                self._write_preview(folder, name, pipeline)
            except OSError as exc:
                self.log.warning("preview of %r not written: %s", name, exc)

    def _write_preview(self, folder: Path, name: str, pipeline: StreamPipeline) -> None:
        frame = pipeline.latest_frame
        if frame is None or frame is self._previewed.get(name):
            return
        self._previewed[name] = frame
        captured, planes = frame.captured_jpeg, frame.planes
        if captured is not None and frame.width <= 640:
            data = captured  # a captured JPEG small enough is its own preview
        elif planes is not None and planes.width <= 640:
            data = planes.to_jpeg(PREVIEW_QUALITY)  # the decoder's planes: no BGR
        else:
            try:
                data = preview_jpeg(frame)
            except FramepipeError as exc:
                self.log.warning("preview of %r not written: %s", name, exc)
                return
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / preview_file_name(name)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


class _HealthyWatch(NamedTuple):
    """A recovered pipeline's run, watched until it has gone on ``healthy_after`` seconds:
    its capture's supervisor and that supervisor's restarts when the run began, and the timer
    of :meth:`App._on_healthy`."""

    run: tuple[Supervisor, int]
    timer: asyncio.TimerHandle


_RUNNING = frozenset((SystemState.STARTING, SystemState.RUNNING, SystemState.DEGRADED))
"""App states in which a pipeline added or resumed starts at once."""
