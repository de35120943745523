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
  system's :class:`SystemState`: a pipeline that failed and will be recovered is ``DEGRADED``; once
  recovery gave up (``max_restart_attempts`` recoveries, ``restart_cooldown_seconds`` apart) or
  auto-recovery is off, the state is ``ERROR`` with ``last_error`` saying why.
* Every ``health_check_interval`` seconds the manager samples the machine's CPU and memory use;
  above ``cpu_threshold`` / ``memory_threshold`` percent it emits ``performance_warning`` (once
  per crossing) and the performance score drops below 1 in proportion.
* Callbacks registered with :meth:`register_event_callback` get the event's data dict (the
  original system's one-argument form), on the orchestrator's thread; one that raises is logged
  and ignored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from doorbell.config import DoorbellConfig, load_config
from doorbell.orchestrator import PIPELINE, PipelineOrchestrator
from framepipe.app import SystemState as AppState
from framepipe.config import Settings
from framepipe.logs import get_logger

__all__ = ["HealthStatus", "OrchestratorManager", "ResourceSampler", "SystemState"]

T = TypeVar("T")


class SystemState(StrEnum):
    """The original system's states."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    ERROR = "error"
    STOPPING = "stopping"


_STATES = {
    AppState.STOPPED: SystemState.STOPPED,
    AppState.STARTING: SystemState.STARTING,
    AppState.RUNNING: SystemState.RUNNING,
    AppState.DEGRADED: SystemState.DEGRADED,
    AppState.FAILED: SystemState.ERROR,
    AppState.STOPPING: SystemState.STOPPING,
}


@dataclass
class HealthStatus:
    """What :meth:`OrchestratorManager.get_health_status` returns."""

    state: SystemState
    performance_score: float
    uptime: float
    last_error: str | None
    pipeline_status: dict[str, Any]
    restart_attempts: int = 0
    max_restart_attempts: int = 0
    cpu_percent: float | None = None
    memory_percent: float | None = None
    known_faces: list[str] = field(default_factory=list)
    issues: list[str] = field(default_factory=list)
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["state"] = self.state.value
        return data


class ResourceSampler:
    """The machine's CPU use (percent of all cores, since the previous sample) and memory use
    (percent of RAM not available), from ``/proc``; None where ``/proc`` is missing."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    def cpu_percent(self) -> float | None:
        """CPU busy share since the previous call, 0-100."""
        now = self._cpu_times()
        last, self._last = self._last, now
        if now is None or last is None or now[0] == last[0]:
            return None
        total, idle = now[0] - last[0], now[1] - last[1]
        return round(100.0 * (total - idle) / total, 1)

    @staticmethod
    def memory_percent() -> float | None:
        """Memory in use (total less available), 0-100."""
        try:
            info: dict[str, int] = {}
            with open("/proc/meminfo", encoding="ascii") as meminfo:
                for line in meminfo:
                    name, value = line.split(":", 1)
                    info[name] = int(value.split()[0])
            total, available = info["MemTotal"], info["MemAvailable"]
        except (OSError, ValueError, KeyError):
            return None
        return round(100.0 * (total - available) / total, 1)


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
        self._gave_up: str | None = None
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
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="doorbell-orchestrator", daemon=True)
        self._thread.start()
        ready.wait()
        self._loop = loop
        return loop

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the orchestrator's loop and wait for its result."""
        loop = self._ensure_loop()
        if _running_loop() is loop:
            coro.close()
            raise RuntimeError(
                "a blocking OrchestratorManager call from inside an event "
                "callback would deadlock; schedule it instead"
            )
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _call(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the loop's thread when the loop runs (reads consistent state)."""
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
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
            self._run(self._start())
            return True

    async def _start(self) -> None:
        await self.orchestrator.start()
        self._monitor = asyncio.create_task(self._monitor_loop(), name="doorbell-monitor")

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

    async def _stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
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
        self.orchestrator.app.restart_attempts = {PIPELINE: value} if value else {}
        if not value:
            self._gave_up = None

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
        state = _STATES.get(app.state)
        pipeline = app.pipeline_status.get(PIPELINE, {})
        failed = pipeline.get("state") == "failed"
        if self._gave_up is not None and app.state not in (AppState.STOPPED, AppState.STOPPING):
            state = SystemState.ERROR
        elif app.state in (AppState.FAILED, AppState.DEGRADED) or failed:
            recovering = (
                self.config.auto_recovery_enabled
                and self._gave_up is None
                and self.restart_attempts < self.max_restart_attempts
            )
            state = SystemState.DEGRADED if recovering or not failed else SystemState.ERROR
        score = app.performance_score
        for used, threshold in (
            (self.cpu_percent, self.config.cpu_threshold),
            (self.memory_percent, self.config.memory_threshold),
        ):
            if used is not None and used > threshold:
                score = min(score, round(threshold / used, 3) if used else 0.0)
        last_error = app.last_error or pipeline.get("last_error")
        return HealthStatus(
            state=state or SystemState.ERROR,
            performance_score=score,
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

    async def _monitor_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_check_interval)
            try:
                self._check_resources()
            except Exception:
                self.log.exception("health check failed")

    def _check_resources(self) -> None:
        self.cpu_percent = self.resources.cpu_percent()
        self.memory_percent = self.resources.memory_percent()
        over = []
        if self.cpu_percent is not None and self.cpu_percent > self.config.cpu_threshold:
            over.append(f"CPU {self.cpu_percent}% > {self.config.cpu_threshold}%")
        if self.memory_percent is not None and self.memory_percent > self.config.memory_threshold:
            over.append(f"memory {self.memory_percent}% > {self.config.memory_threshold}%")
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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
