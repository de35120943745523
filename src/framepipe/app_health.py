"""What an app reports of itself: its state (:class:`SystemState`) and the health
:meth:`framepipe.app.App.health` returns and its health snapshot holds (:class:`AppHealth`).

Both are plain values: an :class:`AppHealth` is a copy, later changes of the app do not show in
it, and :meth:`AppHealth.to_dict` is JSON-ready.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["AppHealth", "SystemState"]


class SystemState(StrEnum):
    """State of the whole app."""

    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    FAILED = "failed"
    ERROR = "failed"  # an alias kept for code that names it ERROR: SystemState.ERROR is FAILED
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass
class AppHealth:
    """What :meth:`~framepipe.app.App.health` returns."""

    name: str
    state: SystemState
    performance_score: float
    uptime: float
    last_error: str | None
    pid: int
    updated_at: float
    host: str = ""
    """The host and pid namespace the app runs in (:func:`framepipe.liveness.this_host`)."""
    pipeline_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    event_sinks: list[dict[str, Any]] = field(default_factory=list)
    """One entry per event sink attached to the app (``sink``, ``target``, ``written``,
    ``dropped``, ``pending``, ``failing_since``)."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["state"] = self.state.value
        return data
