"""How a :class:`~framepipe.supervise.Supervisor` answers a failed session: :class:`Restarts`
records the failure, says it (health, log, event) and decides the restart.

Guarantees:

* Each failure is recorded in the health (``last_error``; ``last_exit_code`` for a capture
  that exited; ``stalls`` for a stall), logged once by its kind (a capture's exit with its
  last stderr lines; an exception of an unexpected type with its traceback) and announced
  (``ended``, ``stalled`` or ``died``), before the answer to it.
* Failures in a row are counted (the health's ``attempt``). The count is reset by a run that
  stayed up ``healthy_after`` seconds after its first frame, whether it still runs (a timer)
  or failed since; a session that never delivered a frame never resets it.
* The answer to a failure: restart after ``backoff.delay(attempt)`` (state ``backoff``) until
  ``max_attempts`` failures in a row; then give up (state ``failed``, event ``failed``), or
  with ``after_attempts="keep_trying"`` try again every ``retry_delay`` seconds (state
  ``retrying``; event ``retrying`` once, with ``retrying_since`` in the health) until a
  session delivers a frame (event ``recovered`` with the time it was down).
* While waiting, the health's ``next_attempt_at`` is the next launch's time; each restart
  announces it (event ``restarting``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from framepipe.backoff import Backoff
from framepipe.errors import CaptureExitedError, FramepipeError, SourceStalledError
from framepipe.health import HealthState
from framepipe.supervise_report import Reporter, describe_error, format_delay
from framepipe.supervise_stall import Stall
from framepipe.urls import safe_text

__all__ = ["Restarts"]

_STDERR_LINES = 10
"""How many lines of a dead capture's stderr tail are logged."""


class Restarts:
    """The restart rule of the supervisor that ``report`` speaks for.

    :attr:`retrying` may be read and cleared from another thread (a session's first frame
    after retrying at the cap); the rest is used on the event loop."""

    def __init__(
        self,
        report: Reporter,
        *,
        backoff: Backoff,
        max_attempts: int | None,
        after_attempts: Literal["fail", "keep_trying"],
        retry_delay: float,
        healthy_after: float,
    ) -> None:
        self._report = report
        self._backoff = backoff
        self._max_attempts = max_attempts
        self._after_attempts = after_attempts
        self._retry_delay = retry_delay
        self._healthy_after = healthy_after
        self.retrying = False
        """Retrying at the cap (``keep_trying``) and no session has delivered a frame since."""
        self._up_since: float | None = None  # monotonic start of the session's run
        self._healthy_timer: asyncio.TimerHandle | None = None

    def launched(self) -> None:
        """A session was launched: no next attempt is waited for; it has not run yet."""
        self._report.health.next_attempt_at = None
        self._up_since = None

    def running(self, loop: asyncio.AbstractEventLoop) -> None:
        """The session runs from now (its first frame): ``healthy_after`` from now, the
        failure count is reset."""
        self._up_since = time.monotonic()
        if self._healthy_timer is not None:
            self._healthy_timer.cancel()
        self._healthy_timer = loop.call_later(self._healthy_after, self._on_healthy)

    def ended(self) -> None:
        """The session ended: a run's healthy timer no longer fires."""
        if self._healthy_timer is not None:
            self._healthy_timer.cancel()
            self._healthy_timer = None

    def _on_healthy(self) -> None:
        self._healthy_timer = None
        h = self._report.health
        if h.attempt:
            self._report.log.debug(
                "%s healthy for %s; attempt counter reset",
                self._report.What,
                format_delay(self._healthy_after),
            )
            h.attempt = 0

    def failed(self, exc: BaseException | None, stall: Stall | None) -> float | None:
        """Record, log and announce one failure (``exc``; None: the session ended normally and
        is restarted; ``stall``: the watchdog's finding, when it ended the session); return
        the delay before the next session, or None when the supervisor gave up (state
        failed)."""
        report = self._report
        h, log, What = report.health, report.log, report.What
        if self._up_since is not None and time.monotonic() - self._up_since >= self._healthy_after:
            h.attempt = 0
        report.clear_run()
        h.last_exit_code = None
        if exc is None:
            h.last_error = f"{What} ended"
            log.info("%s ended; it will be restarted", What)
            report.emit("ended", {"restart": True})
        elif isinstance(exc, SourceStalledError):
            found = stall if stall is not None and exc is stall.error else None
            h.last_error = describe_error(exc)
            h.stalls += 1
            if found is None:  # raised by the target itself
                report.enter(HealthState.STALLED)
            log.warning("%s stalled: %s", What, str(exc) if found is None else found.detail)
            seconds = stall.seconds if stall is not None else None
            report.emit("stalled", {"seconds": seconds, "error": h.last_error})
        elif isinstance(exc, CaptureExitedError):
            h.last_error = describe_error(exc)
            h.last_exit_code = exc.exit_code
            log.warning("%s subprocess died (exit code: %s)", What, exc.exit_code)
            lines = exc.stderr_tail.strip().splitlines()[-_STDERR_LINES:]
            tail = [safe_text(line) for line in lines]
            if tail:
                log.warning("%s stderr (last %d lines):\n  %s", What, len(tail), "\n  ".join(tail))
            report.emit("died", {"error": h.last_error, "exit_code": exc.exit_code})
        else:
            h.last_error = describe_error(exc)
            expected = isinstance(exc, FramepipeError | asyncio.CancelledError)
            log.error("%s failed: %s", What, h.last_error, exc_info=None if expected else exc)
            report.emit("died", {"error": h.last_error, "exit_code": None})
        h.attempt += 1
        at_cap = self._max_attempts is not None and h.attempt >= self._max_attempts
        if at_cap and self._after_attempts == "keep_trying":
            return self._retry_at_cap()
        if at_cap:
            report.enter(HealthState.FAILED)
            log.error(
                "%s failed after %d attempt%s, no restart left: %s",
                What,
                h.attempt,
                "" if h.attempt == 1 else "s",
                h.last_error,
            )
            report.emit("failed", {"error": h.last_error, "attempts": h.attempt})
            return None
        return self._restart_in(self._backoff.delay(h.attempt), HealthState.BACKOFF)

    def _restart_in(self, delay: float, state: HealthState) -> float:
        report = self._report
        h = report.health
        report.enter(state)
        h.next_attempt_at = time.time() + delay
        report.log.info(
            "Restarting %s in %s (attempt %d)", report.what, format_delay(delay), h.attempt
        )
        report.emit(
            "restarting",
            {
                "delay": delay,
                "attempt": h.attempt,
                "retrying": state is HealthState.RETRYING,
                "next_attempt_at": h.next_attempt_at,
            },
        )
        return delay

    def _retry_at_cap(self) -> float:
        """``keep_trying`` after ``max_attempts`` failures: announce it once, then wait
        ``retry_delay`` before each further attempt."""
        report = self._report
        h = report.health
        delay = self._retry_delay
        if not self.retrying:
            self.retrying = True
            h.retrying_since = time.time()
            report.log.error(
                "%s failed %d times in a row: %s; retrying every %s until it is back",
                report.What,
                h.attempt,
                h.last_error,
                format_delay(delay),
            )
            report.emit(
                "retrying",
                {
                    "error": h.last_error,
                    "attempts": h.attempt,
                    "delay": delay,
                    "next_attempt_at": time.time() + delay,
                },
            )
        return self._restart_in(delay, HealthState.RETRYING)

    def recovered(self, attempts: int) -> None:
        """A session launched after ``attempts`` failures in a row delivered a frame while
        :attr:`retrying` (which its context cleared): say it is back."""
        report = self._report
        h = report.health
        since = h.retrying_since
        h.retrying_since = None
        down = round(time.time() - since, 3) if since is not None else None
        report.log.warning(
            "%s is back after %d failed attempts (%s down)",
            report.What,
            attempts,
            "?" if down is None else format_delay(down),
        )
        report.emit("recovered", {"attempts": attempts, "down_seconds": down})
