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

This module holds the pipelines' lifecycle (start, stop, add, remove, pause, resume and the
recovery of a failed pipeline); the callbacks of its events are :mod:`framepipe.app_events`,
the starts under way :mod:`framepipe.app_starts`, the forgetting of recoveries
:mod:`framepipe.app_recovery`, its health, performance warnings and the files it writes for
other processes :mod:`framepipe.app_reporting`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from framepipe.app_events import Callback, Callbacks
from framepipe.app_health import AppHealth, SystemState
from framepipe.app_recovery import RecoveredPipeline, Recoveries
from framepipe.app_reporting import SnapshotWriter, app_health, performance_warnings
from framepipe.app_starts import Starts
from framepipe.config import Settings, load_settings
from framepipe.errors import StreamError
from framepipe.health import HealthState
from framepipe.logs import get_logger
from framepipe.snapshots import (
    check_app_name,
    preview_dir,
    preview_file_name,
    preview_path,
    read_snapshots,
    snapshot_path,
)
from framepipe.stream.pipeline import StreamPipeline
from framepipe.telemetry import event_sink_metrics, metrics_registry, render

__all__ = [
    "App",
    "AppHealth",
    "Callback",
    "SystemState",
    "preview_dir",
    "preview_file_name",
    "preview_path",
    "read_snapshots",
]


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
        self.state = SystemState.STOPPED
        self.last_error: str | None = None
        self.started_at: float | None = None
        self.log = get_logger(f"app.{name}")
        self._callbacks = Callbacks(self.log)
        self._recoveries = Recoveries(
            self.log,
            self.emit,
            self._kept,
            lambda: self.max_restart_attempts,
        )
        self._reports = SnapshotWriter(self.log)
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.paused: set[str] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._warned: set[str] = set()
        self._stopping = False
        self._starts = Starts()
        """Pipeline starts under way: stop() waits for them all, remove() and pause() for
        those of their pipeline."""
        self._turns: tuple[asyncio.Lock, asyncio.AbstractEventLoop] | None = None
        self.registry = metrics_registry(lambda: list(self.pipelines.values()))
        self.mqtt: Any = None
        """The :class:`~framepipe.mqtt.MqttEventSink` of setting ``mqtt_url`` while running."""

    @property
    def restart_attempts(self) -> dict[str, int]:
        """Each pipeline's recoveries in a row (forgotten once it ran healthy). Setting it
        (``app.restart_attempts = {}``, a manual reset) replaces the counts the recoveries
        read, in one place."""
        return self._recoveries.attempts

    @restart_attempts.setter
    def restart_attempts(self, counts: dict[str, int]) -> None:
        self._recoveries.attempts = dict(counts)

    # -- events ---------------------------------------------------------------------------------

    def on(self, event: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event, data)`` (sync or async) on ``event`` (``"*"`` for all):
        ``segment.completed``, ``segment.started``, ``source.started|died|stalled|restarting|
        failed``, ``processor.error``, ``pipeline.started|stopped|failed|recovered|healthy|
        paused|resumed|removed``, ``system_error``, ``performance_warning``. Returns a function
        that unregisters it (see :mod:`framepipe.app_events`)."""
        return self._callbacks.on(event, callback)

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Deliver an event to its callbacks; a raising callback is logged, never propagated."""
        self._callbacks.emit(event, data)
        if event == "source.started":
            name = data.get("pipeline")
            self._recoveries.watch(self.pipelines.get(name) if name is not None else None)
            if data.get("attempt", 0):
                self.emit("source.restarted", data)

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
        self._reports.forget(name)
        await self._starts.of(name)  # a start under way ends first, then the stop
        await pipeline.stop()
        self.emit("pipeline.removed", {"pipeline": name})

    async def pause(self, name: str) -> None:
        """Stop one pipeline and keep it (state ``stopped``, not recovered) until
        :meth:`resume`; the others keep running. A start of it under way ends first, then it
        stops."""
        pipeline = self.pipelines[name]
        self.paused.add(name)
        self._recoveries.unwatch(name)
        watcher = self._watchers.pop(name, None)
        if watcher is not None:
            watcher.cancel()
        await self._starts.of(name)  # a start under way ends first, then the stop
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
        self._recoveries.reset(name)

    async def _start_one(self, pipeline: StreamPipeline) -> None:
        """Start a pipeline and watch it; one that fails to start (a model that does not load)
        is failed and goes through recovery like one that failed later. The start goes on to
        its end if the caller is cancelled (:meth:`stop` waits for it, then stops it)."""
        await asyncio.shield(self._starts.launch(self._start_and_watch(pipeline), pipeline.name))

    async def _start_and_watch(self, pipeline: StreamPipeline) -> None:
        await self._start_pipeline(pipeline, "pipeline %r failed to start")
        # else the stop(), remove() or pause() under way stops it
        if self._kept(pipeline):
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

    def _kept(self, pipeline: RecoveredPipeline) -> bool:
        """The app is not stopping, the pipeline is still this app's and not paused."""
        mine = self.pipelines.get(pipeline.name) is pipeline
        return mine and not self._stopping and pipeline.name not in self.paused

    async def _watch(self, pipeline: StreamPipeline) -> None:
        """Wait for a pipeline's end; recover it if it failed."""
        while True:
            await pipeline.wait()
            if self._stopping or pipeline.state is not HealthState.FAILED:
                return
            self._recoveries.unwatch(pipeline.name)
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
            if not await asyncio.shield(self._starts.launch(start, pipeline.name)):
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
        self._recoveries.unwatch_all()
        await self._starts.all()
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
        return app_health(
            self.name,
            self.state,
            self.pipelines,
            self.paused,
            event_sink_metrics(self.registry).sinks,
            performance_threshold=self.performance_threshold,
            last_error=self.last_error,
            started_at=self.started_at,
        )

    def metrics_text(self) -> str:
        """Prometheus text exposition of every pipeline's metrics."""
        return render(self.registry)

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                for name, score in performance_warnings(
                    self.pipelines, self.performance_threshold, self._warned
                ):
                    self.emit("performance_warning", {"pipeline": name, "score": score})
                self._write_snapshot()
            except Exception:
                self.log.exception("health monitor pass failed")

    @property
    def snapshot_path(self) -> Path:
        """Where this app's health snapshot is written."""
        return snapshot_path(self.settings, self.name)

    def _write_snapshot(self) -> None:
        folder = preview_dir(self.settings, self.name)
        self._reports.write(self.snapshot_path, self.health(), folder, self.pipelines)


_RUNNING = frozenset((SystemState.STARTING, SystemState.RUNNING, SystemState.DEGRADED))
"""App states in which a pipeline added or resumed starts at once."""
