"""The doorbell's health as the original system reported it: :class:`SystemState`,
:class:`HealthStatus`, and the rules that map framepipe's state onto them.

Guarantees (:func:`decide_state`): a stopped, stopping or starting App keeps its own state; once
recovery gave up the state is ``ERROR`` whatever else holds; a pipeline that failed and will be
recovered is ``DEGRADED`` (``ERROR`` with auto-recovery off); otherwise a pipeline whose own
performance score is below the threshold is ``DEGRADED``. The machine's CPU and memory use never
change the state, only the score (:func:`resource_score`: lowered in proportion to the use over
its threshold, with the reason named).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from framepipe.app import SystemState as AppState

__all__ = ["HealthStatus", "SystemState", "decide_state", "resource_score"]


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
    """What :meth:`~doorbell.manager.OrchestratorManager.get_health_status` returns."""

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
    performance_reason: str | None = None
    """Why ``performance_score`` is below 1 (None when it is not)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["state"] = self.state.value
        return data


def decide_state(
    app_state: AppState,
    *,
    pipeline_failed: bool,
    gave_up: bool,
    auto_recovery: bool,
    score: float,
    threshold: float,
) -> SystemState:
    """The original system's state (see the module docstring); ``score`` is the pipeline's
    own performance score, ``threshold`` the configured ``performance_threshold``."""
    state = _STATES.get(app_state)
    if app_state in (AppState.STOPPED, AppState.STOPPING, AppState.STARTING):
        pass
    elif gave_up:
        state = SystemState.ERROR  # recovery gave up: stays so until a reset or restart()
    elif pipeline_failed or app_state in (AppState.FAILED, AppState.DEGRADED):
        # failed and not given up: a recovery is pending (the App counts it before its
        # cooldown, so the count says nothing about whether one is still to come)
        state = SystemState.DEGRADED if auto_recovery else SystemState.ERROR
    elif score < threshold:
        state = SystemState.DEGRADED  # the pipeline's own score, not the machine's load
    return state or SystemState.ERROR


def resource_score(
    perf: dict[str, Any], uses: list[tuple[str, float | None, float]]
) -> tuple[float, str | None]:
    """The pipeline's score (``perf["score"]``), lowered in proportion to each use over its
    threshold (``uses``: ``(what, percent or None, threshold percent)``), and why it is
    below 1."""
    score: float = perf["score"]
    reasons = [perf["reason"]] if perf["reason"] else []
    for what, used, threshold in uses:
        if used is not None and used > threshold:
            score = min(score, round(threshold / used, 3) if used else 0.0)
            reasons.append(f"{what} use {used}% is over its threshold {threshold:g}%")
    return score, "; ".join(reasons) or None
