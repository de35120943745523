"""How a :class:`~framepipe.supervise.Supervisor` answers a failed session: :class:`Restarts`
records the failure, says it (health, log, event) and decides the restart.

Guarantees:

* Each failure is recorded in the health (``last_error``; ``last_exit_code`` for a capture
  that exited; ``stalls`` for a stall) and announced (``ended``, ``stalled`` or ``died``),
  before the answer to it.
* The log says a failure in full (by its kind: a capture's exit with its last stderr lines,
  an exception of an unexpected type with its traceback; then the restart) when it begins a
  run of failures, follows a session that delivered frames, or is of another kind than the
  failure before it (another exception type, another exit code). A failure that repeats
  the one before is one line, the restart with the error: a camera down for a day logs one
  line per attempt, not a screenful.
* A failure whose exception is ``permanent`` (an attribute, True for
  :class:`~framepipe.errors.InvalidSourceError`: a local file that is not a video) is
  not restarted: state ``failed`` at once, one error line, event ``failed`` with
  ``permanent``, whatever ``max_attempts`` and ``after_attempts`` say.
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
        self._last_kind: tuple[str, int | None] | None = None  # the failure before, if any

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
        ran = self._up_since is not None
        if self._up_since is not None and time.monotonic() - self._up_since >= self._healthy_after:
            h.attempt = 0
        kind = _kind(exc)
        repeat = h.attempt > 0 and not ran and kind == self._last_kind
        self._last_kind = kind
        report.clear_run()
        permanent = getattr(exc, "permanent", False) is True
        self._record(exc, stall, say=not (repeat or permanent))
        h.attempt += 1
        if permanent:
            report.enter(HealthState.FAILED)
            log.error("%s failed and is not restarted: %s", What, h.last_error)
            report.emit("failed", {"error": h.last_error, "attempts": h.attempt, "permanent": True})
            return None
        again = h.last_error if repeat else None
        at_cap = self._max_attempts is not None and h.attempt >= self._max_attempts
        if at_cap and self._after_attempts == "keep_trying":
            return self._retry_at_cap(again)
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
        return self._restart_in(self._backoff.delay(h.attempt), HealthState.BACKOFF, again)

    def _record(self, exc: BaseException | None, stall: Stall | None, *, say: bool) -> None:
        """Record ``exc`` in the health and announce it; with ``say``, log it by its kind."""
        report = self._report
        h, log, What = report.health, report.log, report.What
        h.last_exit_code = None
        if exc is None:
            h.last_error = f"{What} ended"
            if say:
                log.info("%s ended; it will be restarted", What)
            report.emit("ended", {"restart": True})
            return
        h.last_error = describe_error(exc)
        if isinstance(exc, SourceStalledError):
            found = stall if stall is not None and exc is stall.error else None
            h.stalls += 1
            if found is None:  # raised by the target itself
                report.enter(HealthState.STALLED)
            if say:
                log.warning("%s stalled: %s", What, str(exc) if found is None else found.detail)
            seconds = stall.seconds if stall is not None else None
            report.emit("stalled", {"seconds": seconds, "error": h.last_error})
        elif isinstance(exc, CaptureExitedError):
            h.last_exit_code = exc.exit_code
            if say:
                log.warning("%s subprocess died (exit code: %s)", What, exc.exit_code)
                lines = exc.stderr_tail.strip().splitlines()[-_STDERR_LINES:]
                tail = [safe_text(line) for line in lines]
                if tail:
                    log.warning(
                        "%s stderr (last %d lines):\n  %s", What, len(tail), "\n  ".join(tail)
                    )
            report.emit("died", {"error": h.last_error, "exit_code": exc.exit_code})
        else:
            expected = isinstance(exc, FramepipeError | asyncio.CancelledError)
            if say:
                log.error("%s failed: %s", What, h.last_error, exc_info=None if expected else exc)
            report.emit("died", {"error": h.last_error, "exit_code": None})

    def _restart_in(self, delay: float, state: HealthState, again: str | None = None) -> float:
        """Wait ``delay`` in ``state``; ``again``: the error of a failure that repeats the one
        before, said on the restart's line."""
        report = self._report
        h = report.health
        report.enter(state)
        h.next_attempt_at = time.time() + delay
        if again is None:
            report.log.info(
                "Restarting %s in %s (attempt %d)", report.what, format_delay(delay), h.attempt
            )
        else:
            report.log.info(
                "Restarting %s in %s (attempt %d), failed again: %s",
                report.what,
                format_delay(delay),
                h.attempt,
                again,
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

    def _retry_at_cap(self, again: str | None) -> float:
        """``keep_trying`` after ``max_attempts`` failures: announce it once, then wait
        ``retry_delay`` before each further attempt (``again``: as for :meth:`_restart_in`)."""
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
            again = None  # the line above said it
        return self._restart_in(delay, HealthState.RETRYING, again)

    def recovered(self, attempts: int) -> None:
        """A session launched after ``attempts`` failures in a row delivered a frame while
        :attr:`retrying` (which its context cleared): say it is back, in one line (the
        supervisor's ``Persistent ... started`` is left out then)."""
        report = self._report
        h = report.health
        since = h.retrying_since
        h.retrying_since = None
        down = round(time.time() - since, 3) if since is not None else None
        started = f"persistent {report.what} started" + (
            "" if h.pid is None else f" (PID: {h.pid})"
        )
        report.log.warning(
            "%s is back after %d failed attempts (%s down): %s",
            report.What,
            attempts,
            "?" if down is None else format_delay(down),
            started,
        )
        report.emit("recovered", {"attempts": attempts, "down_seconds": down})


def _kind(exc: BaseException | None) -> tuple[str, int | None]:
    """What tells failures apart for the log: the exception's type and a capture's exit code
    (a normal end is one kind)."""
    if exc is None:
        return ("ended", None)
    code = exc.exit_code if isinstance(exc, CaptureExitedError) else None
    return (type(exc).__qualname__, code)
