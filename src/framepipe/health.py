"""The health of one supervised component: the states of its supervisor's machine
(:class:`HealthState`) and a snapshot of it (:class:`Health`), which
:attr:`framepipe.supervise.Supervisor.health` returns and the live pipelines, the app and its
health snapshot report.

A :class:`Health` is a copy: later changes of its supervisor do not show in it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["Health", "HealthState"]


class HealthState(StrEnum):
    """The state of one supervised component."""

    STARTING = "starting"
    """A session was launched and has not delivered its first frame yet (its process may be
    up: ``started()`` called, ``pid`` known)."""
    RUNNING = "running"
    """The session called ``started()``, delivered a frame and has not ended."""
    STALLED = "stalled"
    """The session produced no frame within the stall timeout; it is being replaced."""
    BACKOFF = "backoff"
    """The session failed; waiting before the next one."""
    RETRYING = "retrying"
    """Failed ``max_attempts`` times in a row; waiting to try again at the backoff's cap
    (``after_attempts="keep_trying"``)."""
    FAILED = "failed"
    """Gave up after ``max_attempts`` consecutive failures (or the supervisor crashed)."""
    STOPPED = "stopped"
    """Not started yet, stopped by ``stop()``, or ended normally without restart."""


@dataclass
class Health:
    """A snapshot of one supervised component's health; :meth:`to_dict` is JSON-ready."""

    name: str
    state: HealthState
    since: float
    """Unix time at which ``state`` began."""
    started_at: float | None = None
    """Unix time at which the current run began running (its first frame); None when not
    running."""
    restarts: int = 0
    """Sessions launched after a failure (or after a normal end with ``restart_on_end``)."""
    stalls: int = 0
    """Sessions that ended as stalls."""
    attempt: int = 0
    """Consecutive failures since the last healthy run (0: healthy or never failed)."""
    last_error: str | None = None
    """``"ExcType: message"`` of the last failure."""
    last_exit_code: int | None = None
    """Exit code of the last failure when it was a capture exit, else None."""
    pid: int | None = None
    """The pid given to ``started()`` by the current session (known while it starts too)."""
    frames: int = 0
    """``alive()`` calls over all sessions."""
    next_attempt_at: float | None = None
    """Unix time of the next session's launch while waiting (backoff, retrying), else None."""
    retrying_since: float | None = None
    """Unix time at which it failed ``max_attempts`` times in a row and began retrying at
    the cap (``keep_trying``); None once a session delivers a frame again."""
    last_frame_at: float | None = None
    """Unix time of the last ``alive()`` call."""
    description: str = ""

    @property
    def uptime(self) -> float:
        """Seconds since the current run started (0.0 when not running)."""
        if self.started_at is None:
            return 0.0
        return max(0.0, time.time() - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field plus ``uptime``."""
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        data["uptime"] = self.uptime
        return data
