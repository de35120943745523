"""Stall detection for one :class:`~framepipe.supervise.Supervisor`'s sessions: a
:class:`StallWatchdog` finds a session that delivers no frame and cancels it.

Guarantees:

* A launched session must deliver its first frame within ``start_timeout`` seconds of its
  launch; once it runs, it must deliver a frame (or say it waits for the pipeline) at least
  every ``stall_timeout`` seconds. None disables that bound.
* Nothing polls: one timer per session, which never finds a stall early. When it fires and a
  frame came since, it is armed again for the rest of the limit.
* A stall found is recorded once (:attr:`StallWatchdog.stall`, with a
  :class:`~framepipe.errors.SourceStalledError` naming the limit missed), the health enters
  ``stalled`` and the session's task is cancelled, with that error as the cancellation's
  message (its ``CancelledError`` carries it: a capture can tell a stall from a stop). A
  session that ignores its cancellation for 5 s is warned about in the log, once; it is
  still waited for.
* Once :meth:`StallWatchdog.stop` was called no stall is found: a stopping supervisor's
  session ends by its stop, not as a stall.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from framepipe.errors import SourceStalledError
from framepipe.health import HealthState
from framepipe.supervise_report import Reporter, format_delay

__all__ = ["Stall", "StallWatchdog"]

_CANCEL_GRACE = 5.0
"""Seconds a stalled session may take to honour its cancellation before a warning is logged."""


@dataclass(frozen=True)
class Stall:
    """A stall found: the failure recorded for the session, how long it went without a frame
    (or without its first one) and the log's wording of it."""

    error: SourceStalledError
    seconds: float
    detail: str


class StallWatchdog:
    """Watches one session at a time of the supervisor that ``report`` speaks for.

    :attr:`last_frame` is written by the sessions' contexts for every frame (from any
    thread); the rest is used on the event loop."""

    def __init__(
        self, report: Reporter, *, stall_timeout: float | None, start_timeout: float | None
    ) -> None:
        self._report = report
        self._stall_timeout = stall_timeout
        self._start_timeout = start_timeout
        self.last_frame = float("-inf")
        """Monotonic time of the last frame (or wait for the pipeline), over all sessions."""
        self.stall: Stall | None = None
        """The current session's stall, once found; None before and without one."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._running = False  # the session runs: stall_timeout applies, not start_timeout
        self._opened = False  # the session called started()
        self._mark = 0.0  # the session's launch, then the start of its run
        self._stopped = False
        self._timer: asyncio.TimerHandle | None = None
        self._grace_timer: asyncio.TimerHandle | None = None

    def watch(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
        """A session was launched now as ``task``: it must deliver its first frame within
        ``start_timeout``."""
        self._loop = loop
        self._task = task
        self.stall = None
        self._running = False
        self._opened = False
        self._mark = time.monotonic()
        self._arm()

    def opened(self) -> None:
        """The session called ``started()``: a stall before its first frame says so."""
        self._opened = True

    def running(self) -> None:
        """The session runs from now (its first frame): ``stall_timeout`` applies."""
        self._running = True
        self._mark = time.monotonic()
        self._arm()

    def end(self) -> None:
        """The session ended: its timers are cancelled (a stall found stands)."""
        for handle in (self._timer, self._grace_timer):
            if handle is not None:
                handle.cancel()
        self._timer = self._grace_timer = None
        self._task = None

    def stop(self) -> None:
        """The supervisor stops: no stall is found from now on."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _limit(self) -> float | None:
        return self._stall_timeout if self._running else self._start_timeout

    def _arm(self) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        limit = self._limit()
        if limit is not None:
            self._timer = self._loop.call_later(limit, self._check)

    def _check(self) -> None:
        """Fires when the session may have stalled; re-arms itself if a frame came since."""
        assert self._loop is not None
        self._timer = None
        task = self._task
        limit = self._limit()
        if task is None or task.done() or self._stopped or limit is None:
            return
        ref = max(self._mark, self.last_frame) if self._running else self._mark
        elapsed = time.monotonic() - ref
        if elapsed < limit:
            self._timer = self._loop.call_later(limit - elapsed, self._check)
            return
        if self._running:
            detail = f"no frame for {elapsed:.1f}s"
        elif self._opened:
            detail = f"not started within {elapsed:.1f}s: open, but no frame yet"
        else:
            detail = f"not started within {elapsed:.1f}s"
        error = SourceStalledError(detail, source_id=self._report.name)
        self.stall = Stall(error, elapsed, detail)
        self._report.enter(HealthState.STALLED)
        task.cancel(error)  # the message: the session can tell a stall from a stop
        self._grace_timer = self._loop.call_later(_CANCEL_GRACE, self._warn_ignoring, task)

    def _warn_ignoring(self, task: asyncio.Task[None]) -> None:
        self._grace_timer = None
        if not task.done():
            self._report.log.warning(
                "%s session ignores its cancellation after %s; still waiting",
                self._report.What,
                format_delay(_CANCEL_GRACE),
            )
