"""``OrchestratorManager``: the original system's synchronous management API over the async
orchestrator.

The manager runs the :class:`~doorbell.orchestrator.PipelineOrchestrator` on an event loop in
a thread of its own, so plain synchronous code (a web app, a GPIO callback, the legacy API)
calls ``start()``, ``stop()``, ``get_health_status()`` and ``trigger_doorbell()`` from any
thread. Guarantees:

* ``start()`` returns once the known faces are loaded and the pipeline's models are set up and
  its camera is being opened (a camera that does not open is then retried and recovered in the
  background, visible in the health); ``stop()`` drains and returns once everything stopped; both
  are idempotent.
* Health (:meth:`OrchestratorManager.get_health_status`) maps framepipe's states onto the original
  system's :class:`SystemState`: a pipeline that failed and will be recovered (also during the
  cooldown before the last recovery) is ``DEGRADED``; ``ERROR`` only once recovery gave up
  (``max_restart_attempts`` recoveries, ``restart_cooldown_seconds`` apart, or auto-recovery off),
  with ``last_error`` saying why, and it stays ``ERROR`` until a manual reset
  (``manager.restart_attempts = 0``, which starts recovery again) or ``restart()``.
* The performance score compares the frames the pipeline processes with the camera's nominal
  rate (:meth:`~doorbell.orchestrator.PipelineOrchestrator.performance`);
  ``performance_reason`` says why it is low. Below ``performance_threshold`` the state is
  ``DEGRADED`` (the pipeline's own score: the machine's load lowers the score, not the state).
  Every ``health_check_interval`` seconds the manager also samples the machine's
  CPU and memory use; above ``cpu_threshold`` / ``memory_threshold`` percent the score drops
  below 1 in proportion. Either emits ``performance_warning`` (once per crossing).
* Every ``metrics_collection_interval`` seconds the pipeline's metrics are collected into
  :attr:`OrchestratorManager.metrics_history`, logged and emitted as ``metrics.collected``.
* Between ``start()`` and ``stop()`` framepipe's log lines also go to ``log_file`` (default
  ``<data_dir>/logs/doorbell.log``, the original system's), recoveries included.
* Callbacks registered with :meth:`register_event_callback` get the event's data dict (the
  original system's one-argument form), on the orchestrator's thread; one that raises is logged
  and ignored.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from doorbell.config import DoorbellConfig, load_config
from doorbell.health import HealthStatus, SystemState, decide_state, resource_score
from doorbell.loop_thread import run_on, running_loop, start_loop_thread
from doorbell.orchestrator import PipelineOrchestrator
from doorbell.pipeline import PIPELINE
from doorbell.resources import ResourceSampler, over_thresholds
from framepipe.app import SystemState as AppState
from framepipe.config import Settings
from framepipe.logs import FORMAT, get_logger

__all__ = ["HealthStatus", "OrchestratorManager", "ResourceSampler", "SystemState"]

T = TypeVar("T")


class OrchestratorManager:
    """The original system's management interface; see the module docstring."""

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        settings: Settings | None = None,
        orchestrator_class: type[PipelineOrchestrator] = PipelineOrchestrator,
    ) -> None:
        self.config: DoorbellConfig = load_config(config)
        self.orchestrator = orchestrator_class(self.config, settings=settings)
        self.log = get_logger("doorbell.manager")
        self.max_restart_attempts = self.config.max_restart_attempts
        self.resources = ResourceSampler()
        self.cpu_percent: float | None = None
        self.memory_percent: float | None = None
        self._resource_warning = False
        self._performance_warning = False
        self._gave_up: str | None = None
        self._log_handler: logging.Handler | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._recovery: concurrent.futures.Future[None] | None = None
        self.metrics_history: collections.deque[dict[str, Any]] = collections.deque(maxlen=1440)
        """What each ``metrics_collection_interval`` collected, oldest first (the last 1440)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        self._legacy: Any = None
        app = self.orchestrator.app
        app.on("system_error", self._on_system_error)
        app.on("pipeline.recovered", self._on_recovered)

    # -- the loop thread --------------------------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            return self._loop
        loop, self._thread = start_loop_thread("doorbell-orchestrator")
        self._loop = loop
        return loop

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the orchestrator's loop and wait for its result
        (:func:`~doorbell.loop_thread.run_on`)."""
        return run_on(self._ensure_loop(), coro, timeout)

    def _call(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the loop's thread when the loop runs (reads consistent state)."""
        loop = self._loop
        if loop is None or not loop.is_running() or running_loop() is loop:
            return fn()

        async def call() -> T:
            return fn()

        return self._run(call(), timeout=10.0)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self.orchestrator.app.state not in (AppState.STOPPED,)

    def start(self) -> bool:
        """Start the system (see the module docstring); True once started (also when it
        already ran). Errors in loading models raise; a camera that does not open does not."""
        with self._lock:
            if self.is_running:
                return True
            self._gave_up = None
            self.open_log()
            try:
                self._run(self._start())
            except BaseException:
                self.close_log()
                raise
            return True

    async def _start(self) -> None:
        await self.orchestrator.start()
        self.start_monitoring()

    def start_monitoring(self) -> None:
        """Start the health checks and the metrics collection on the running event loop (what
        ``start()`` does once the orchestrator runs; :mod:`doorbell.web` calls it when
        ``framepipe serve`` runs the App on its own loop). Idempotent."""
        if self._monitor is not None:
            return
        self._monitor = asyncio.create_task(self._monitor_loop(), name="doorbell-monitor")
        self._metrics_task = asyncio.create_task(self._metrics_loop(), name="doorbell-metrics")

    async def stop_monitoring(self) -> None:
        """Cancel what :meth:`start_monitoring` started and a manual recovery in progress."""
        recovery, self._recovery = self._recovery, None
        if recovery is not None:  # a manual recovery must not start the pipeline again
            recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wrap_future(recovery)
        for task in (self._monitor, self._metrics_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._monitor = self._metrics_task = None

    def open_log(self) -> None:
        """Send framepipe's log lines to ``log_file`` too (INFO and up)."""
        path = self.config.log_file
        if path is None or self._log_handler is not None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FORMAT, defaults={"component": "-"}))
        handler.setLevel(logging.INFO)
        logger = logging.getLogger("framepipe")
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        self._log_handler = handler

    def close_log(self) -> None:
        handler, self._log_handler = self._log_handler, None
        if handler is not None:
            logging.getLogger("framepipe").removeHandler(handler)
            handler.close()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop gracefully (queued frames drain, an open visit closes) and end the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or not thread.is_alive():
                return
            try:
                self._run(self._stop(), timeout=timeout)
            except concurrent.futures.TimeoutError:
                self.log.exception(
                    "stop did not finish within %gs; the loop is stopped anyway", timeout
                )
            finally:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout)
                self._loop = self._thread = None
                self.close_log()

    async def _stop(self) -> None:
        await self.stop_monitoring()
        await self.orchestrator.stop()

    def restart(self) -> bool:
        """Stop, reset the restart counter and start again (manual recovery after ERROR)."""
        self.stop()
        self.restart_attempts = 0
        return self.start()

    def __enter__(self) -> OrchestratorManager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- recovery ---------------------------------------------------------------------------

    @property
    def restart_attempts(self) -> int:
        """Recoveries of the pipeline since the start (or the last reset)."""
        return sum(self.orchestrator.app.restart_attempts.values())

    @restart_attempts.setter
    def restart_attempts(self, value: int) -> None:
        """Set the counter; 0 is the original system's manual reset: when recovery had given
        up (``ERROR``) and the system runs, recovery starts again at once, with
        ``max_restart_attempts`` more recoveries after it."""
        app = self.orchestrator.app
        app.restart_attempts = {PIPELINE: value} if value else {}
        if value:
            return
        gave_up, self._gave_up = self._gave_up, None
        loop = self._loop
        if gave_up is None or loop is None or not loop.is_running() or not self.is_running:
            return
        self.log.warning(
            "restart counter reset by hand: recovery of the failed pipeline starts again "
            "(it had given up: %s)",
            gave_up,
        )
        self._recovery = asyncio.run_coroutine_threadsafe(self._recover_again(), loop)

    async def _recover_again(self) -> None:
        """Start the pipeline that recovery gave up on again (framepipe's pause and resume:
        resume watches it, so a new failure is recovered again)."""
        app = self.orchestrator.app
        if app.state in (AppState.STOPPING, AppState.STOPPED):
            return
        app.last_error = None
        await app.pause(PIPELINE)
        await app.resume(PIPELINE)
        pipeline = self.orchestrator.pipeline
        self.log.info(
            "manual recovery: pipeline %r started again (%s)",
            PIPELINE,
            pipeline.state.value if pipeline else "-",
        )

    def _on_system_error(self, _event: str, data: dict[str, Any]) -> None:
        self._gave_up = str(data.get("error"))

    def _on_recovered(self, _event: str, _data: dict[str, Any]) -> None:
        self._gave_up = None

    # -- events -----------------------------------------------------------------------------

    def register_event_callback(
        self, event: str, callback: Callable[[dict[str, Any]], Any]
    ) -> Callable[[], None]:
        """Call ``callback(data)`` on ``event``: ``visitor.known``, ``visitor.unknown``,
        ``doorbell.pressed``, ``system_error``, ``performance_warning``,
        ``known_face.rejected``, ``notification.failed``, framepipe's ``segment.completed``,
        ``source.*``, ``pipeline.*``, ``processor.error``, or ``*`` for all. Returns a
        function that unregisters it."""
        return self.orchestrator.app.on(event, lambda _event, data: callback(data))

    # -- health -----------------------------------------------------------------------------

    def get_health_status(self) -> HealthStatus:
        """State, performance score, uptime, last error, pipeline status; see the module
        docstring for how the state is decided."""
        return self._call(self._health)

    def _health(self) -> HealthStatus:
        orch = self.orchestrator
        app = orch.app.health()
        pipeline = app.pipeline_status.get(PIPELINE, {})
        perf = orch.performance()
        score, reason = self._score(perf)
        state = decide_state(
            app.state,
            pipeline_failed=pipeline.get("state") == "failed",
            gave_up=self._gave_up is not None,
            auto_recovery=self.config.auto_recovery_enabled,
            score=perf["score"],
            threshold=self.config.performance_threshold,
        )
        last_error = app.last_error or pipeline.get("last_error")
        return HealthStatus(
            state=state,
            performance_score=score,
            performance_reason=reason,
            uptime=app.uptime,
            last_error=self._gave_up or last_error,
            pipeline_status=app.pipeline_status,
            restart_attempts=self.restart_attempts,
            max_restart_attempts=self.max_restart_attempts,
            cpu_percent=self.cpu_percent,
            memory_percent=self.memory_percent,
            known_faces=orch.known.names,
            issues=list(orch.issues),
        )

    def _score(self, perf: dict[str, Any]) -> tuple[float, str | None]:
        """The pipeline's score, lowered in proportion to CPU or memory use over its
        threshold, and why it is below 1."""
        return resource_score(
            perf,
            [
                ("CPU", self.cpu_percent, self.config.cpu_threshold),
                ("memory", self.memory_percent, self.config.memory_threshold),
            ],
        )

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval)
            try:
                self._check_resources()
                self._check_performance()
            except Exception:
                self.log.exception("health check failed")

    def _check_performance(self) -> None:
        """``performance_warning`` once when the pipeline's own score falls below
        ``performance_threshold`` (again after it recovered)."""
        perf = self.orchestrator.performance()
        if perf["score"] < self.config.performance_threshold:
            if not self._performance_warning:
                self._performance_warning = True
                self.log.warning("performance warning: score %s: %s", perf["score"], perf["reason"])
                self.orchestrator.app.emit(
                    "performance_warning",
                    {"pipeline": PIPELINE, "score": perf["score"], "reason": perf["reason"]},
                )
        else:
            self._performance_warning = False

    async def _metrics_loop(self) -> None:
        """The original system's metrics collection, every ``metrics_collection_interval``."""
        while True:
            await asyncio.sleep(self.config.metrics_collection_interval)
            try:
                self._collect_metrics()
            except Exception:
                self.log.exception("metrics collection failed")

    def _collect_metrics(self) -> dict[str, Any]:
        metrics = self.orchestrator.get_pipeline_metrics()
        metrics["collected_at"] = time.time()
        self.metrics_history.append(metrics)
        perf = metrics["performance"]
        self.log.info(
            "metrics: %s, %s frames captured, %s visits, %.1f events/min, "
            "%s/%s frames/s (score %s), backlog %s",
            metrics["pipeline_status"],
            metrics["frames_captured"],
            metrics["visits"],
            metrics["events_per_minute"],
            perf["processed_fps"],
            perf["nominal_fps"],
            perf["score"],
            metrics["queue_status"]["total_backlog"],
        )
        self.orchestrator.app.emit("metrics.collected", metrics)
        return metrics

    def _check_resources(self) -> None:
        self.cpu_percent = self.resources.cpu_percent()
        self.memory_percent = self.resources.memory_percent()
        over = over_thresholds(
            self.cpu_percent,
            self.memory_percent,
            self.config.cpu_threshold,
            self.config.memory_threshold,
        )
        if over and not self._resource_warning:
            self._resource_warning = True
            health = self._health()
            self.log.warning("performance warning: %s", "; ".join(over))
            self.orchestrator.app.emit(
                "performance_warning",
                {
                    "score": health.performance_score,
                    "reason": "; ".join(over),
                    "cpu_percent": self.cpu_percent,
                    "memory_percent": self.memory_percent,
                },
            )
        elif not over:
            self._resource_warning = False

    # -- the doorbell -----------------------------------------------------------------------

    def trigger_doorbell(self, channel: int | None = None) -> dict[str, Any]:
        """Press the doorbell: recognise whoever is in the camera's latest frame (see
        :meth:`PipelineOrchestrator.trigger`); ``{"success": False, "error": ...}`` when the
        system does not run or the camera has not delivered a frame."""
        if not self.is_running:
            return {"success": False, "channel": channel, "error": "the system is not running"}
        return self._run(self.orchestrator.trigger(channel), timeout=60.0)

    def get_legacy_interface(self) -> Any:
        """The :class:`~doorbell.legacy.LegacyAdapter` over this manager (one per manager)."""
        if self._legacy is None:
            from doorbell.legacy import LegacyAdapter

            self._legacy = LegacyAdapter(self)
        return self._legacy

    def reload_known_faces(self) -> list[str]:
        """Encode the known-faces folder again; returns the known names."""
        return self.orchestrator.reload_known_faces().names
