"""An app's count of each pipeline's recoveries in a row, and the forgetting of them once a
recovered pipeline has run healthy (:attr:`framepipe.app.App.restart_attempts`).

Guarantees: a pipeline's count is forgotten (``pipeline.healthy`` emitted) only when a run of
its capture that began after a recovery has gone on ``pipeline.healthy_after`` seconds and,
then, still goes on: the same capture, not restarted since, not down, the pipeline neither
failed, stopped, paused nor removed, the app not stopping. A run is the capture's sessions until
one fails: the next pass of a looped recording goes on with it, a session started after a
failure begins a new one. Forgetting a count (:meth:`Recoveries.reset`) or unwatching a
pipeline cancels its timer: no ``pipeline.healthy`` follows for the run watched then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from framepipe.health import HealthState
from framepipe.logs import ComponentLogger
from framepipe.supervise import Supervisor

__all__ = ["RecoveredPipeline", "Recoveries"]


class RecoveredPipeline(Protocol):
    """What this module reads of a pipeline
    (:class:`~framepipe.stream.pipeline.StreamPipeline`)."""

    @property
    def name(self) -> str: ...
    @property
    def supervisor(self) -> Supervisor | None: ...
    @property
    def healthy_after(self) -> float: ...
    @property
    def running(self) -> bool: ...
    @property
    def source_down(self) -> bool: ...
    @property
    def state(self) -> HealthState: ...


class _HealthyWatch(NamedTuple):
    """A recovered pipeline's run, watched until it has gone on ``healthy_after`` seconds:
    its capture's supervisor and that supervisor's restarts when the run began, and the timer
    of :meth:`Recoveries._on_healthy`."""

    run: tuple[Supervisor, int]
    timer: asyncio.TimerHandle


class Recoveries:
    """Each pipeline's recoveries in a row (:attr:`attempts`) and the watches that forget them.

    ``kept(pipeline)`` says whether the app still runs the pipeline (it is the app's, not
    paused, the app not stopping); ``budget()`` is the app's ``max_restart_attempts`` now;
    ``emit`` the app's events."""

    def __init__(
        self,
        log: ComponentLogger,
        emit: Callable[[str, dict[str, Any]], None],
        kept: Callable[[RecoveredPipeline], bool],
        budget: Callable[[], int],
    ) -> None:
        self.attempts: dict[str, int] = {}
        self._healthy: dict[str, _HealthyWatch] = {}
        self._log = log
        self._emit = emit
        self._kept = kept
        self._budget = budget

    def reset(self, name: str | None = None) -> None:
        """Forget the recoveries of pipeline ``name`` (of every pipeline when None)."""
        for watched in list(self._healthy) if name is None else [name]:
            self.unwatch(watched)
        if name is None:
            self.attempts.clear()
        else:
            self.attempts.pop(name, None)

    def unwatch_all(self) -> None:
        for name in list(self._healthy):
            self.unwatch(name)

    def watch(self, pipeline: RecoveredPipeline | None) -> None:
        """A session of ``pipeline``'s capture delivered its first frame: if the pipeline was
        recovered, its recoveries are forgotten once that run has gone on
        ``pipeline.healthy_after`` seconds without a failure (see the module)."""
        capture = pipeline.supervisor if pipeline is not None else None
        if pipeline is None or capture is None or not self.attempts.get(pipeline.name):
            return
        run = (capture, capture.health.restarts)
        watch = self._healthy.get(pipeline.name)
        if watch is not None and watch.run == run:
            return  # the run goes on
        self.unwatch(pipeline.name)
        timer = asyncio.get_running_loop().call_later(
            pipeline.healthy_after, self._on_healthy, pipeline, run
        )
        self._healthy[pipeline.name] = _HealthyWatch(run, timer)

    def unwatch(self, name: str) -> None:
        watch = self._healthy.pop(name, None)
        if watch is not None:
            watch.timer.cancel()

    def _on_healthy(self, pipeline: RecoveredPipeline, run: tuple[Supervisor, int]) -> None:
        """``healthy_after`` seconds after the first frame of a recovered pipeline's run: if
        that run still goes on, its recoveries are forgotten."""
        name = pipeline.name
        watch = self._healthy.get(name)
        if watch is not None and watch.run == run:
            del self._healthy[name]
        capture, restarts = run
        attempts = self.attempts.get(name, 0)
        if (
            not attempts
            or not self._kept(pipeline)
            or pipeline.supervisor is not capture
            or capture.health.restarts != restarts
            or not pipeline.running
            or pipeline.source_down
            or pipeline.state is HealthState.FAILED
        ):
            return
        del self.attempts[name]
        self._log.info(
            "[%s] ran %gs without a failure: its %d recover%s forgotten, %d left",
            name,
            pipeline.healthy_after,
            attempts,
            "y is" if attempts == 1 else "ies are",
            self._budget(),
        )
        self._emit(
            "pipeline.healthy",
            {"pipeline": name, "recoveries": attempts, "healthy_after": pipeline.healthy_after},
        )
