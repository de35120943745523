"""The circuit breaker a router keeps for each processor.

``closed``: frames go through. After ``circuit_failures`` consecutive failed results (the
processor raised, returned a bad result, or gave no result within the timeout; malformed input
does not count) it is ``open``: no frame for ``circuit_reset`` seconds. Then ``half_open``: one
trial frame; its success closes the circuit, its failure opens it again.

Each request counts once, by how it ended: its result, or its timeout. A result that comes
after its request timed out (late) counts for nothing, so a processor that answers only after
its callers gave up is opened by its timeouts, and a late error is not a second failure. A
timeout Redis may be to blame for (the request was in flight when Redis restarted and lost its
data, or it ran out while Redis was away) counts for nothing either
(:mod:`~framepipe.processors.fleet.inflight`): a restart that loses a healthy processor's
frames does not open its circuit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from framepipe.logs import ComponentLogger
from framepipe.processors.fleet.shown import loggable

__all__ = ["CircuitBreaker", "CircuitPolicy", "CircuitState"]


class CircuitState:
    """States of a processor's circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitPolicy(Protocol):
    """The thresholds, read at each decision (the registry's settings)."""

    circuit_failures: int
    """Consecutive failures that open a closed circuit."""
    circuit_reset: float
    """Seconds an open circuit stays open before its trial frame."""


class CircuitBreaker:
    """One processor's circuit. ``on_open`` is called whenever it opens (routes waiting for
    capacity must look again: the processor is out)."""

    def __init__(
        self,
        processor_id: str,
        policy: CircuitPolicy,
        log: ComponentLogger,
        on_open: Callable[[], None],
    ) -> None:
        self.processor_id = processor_id
        self.policy = policy
        self.log = log
        self.on_open = on_open
        self.state = CircuitState.CLOSED
        self.failures = 0
        """Consecutive failures counted (reset by a success)."""
        self.opened_at = 0.0
        """``time.monotonic()`` when it last opened."""
        self.trial: str | None = None
        """The frame id of the half-open circuit's trial frame, while it is out."""

    def current(self, now: float) -> str:
        """The state at ``now`` (monotonic): an open circuit whose ``circuit_reset`` has passed
        turns ``half_open`` here."""
        if self.state == CircuitState.OPEN and now - self.opened_at >= self.policy.circuit_reset:
            self.state = CircuitState.HALF_OPEN
            self.trial = None
            self.log.info(
                "Processor %s: circuit half-open, one trial frame next", loggable(self.processor_id)
            )
        return self.state

    def admits(self, state: str) -> bool:
        """Whether a frame may go to the processor in ``state`` (from :meth:`current`): not
        while open, and only one trial frame at a time while half-open."""
        if state == CircuitState.OPEN:
            return False
        return not (state == CircuitState.HALF_OPEN and self.trial is not None)

    def reopens_in(self, now: float) -> float:
        """Seconds until an open circuit turns half-open (negative: due)."""
        return self.opened_at + self.policy.circuit_reset - now

    def sent(self, frame_id: str) -> None:
        """A frame was reserved for the processor: the trial frame when half-open."""
        if self.state == CircuitState.HALF_OPEN:
            self.trial = frame_id

    def settled(self, frame_id: str) -> None:
        """A frame's result came (or its wait ended): the trial slot is free again."""
        if self.trial == frame_id:
            self.trial = None

    def record(self, ok: bool, error_kind: str | None, error: str | None) -> None:
        """Count a result: a success closes the circuit; a failure other than bad input
        (``error_kind`` ``input``) counts towards opening it."""
        if ok:
            if self.state != CircuitState.CLOSED:
                self.log.info(
                    "Processor %s: circuit closed (trial frame succeeded)",
                    loggable(self.processor_id),
                )
            self.failures = 0
            self.state = CircuitState.CLOSED
        elif error_kind != "input":
            self.failed(error or "error")

    def failed(self, reason: str) -> None:
        """Count one failure; open the circuit after ``circuit_failures`` in a row, or at
        once when it was the half-open circuit's trial."""
        self.failures += 1
        trial_failed = self.state == CircuitState.HALF_OPEN
        if trial_failed or (
            self.state == CircuitState.CLOSED and self.failures >= self.policy.circuit_failures
        ):
            self.state = CircuitState.OPEN
            self.opened_at = time.monotonic()
            self.trial = None
            self.log.warning(
                "Processor %s: circuit open after %d consecutive failure(s) "
                "(last: %s); no frames for %.1fs",
                loggable(self.processor_id),
                self.failures,
                loggable(reason, 300),
                self.policy.circuit_reset,
            )
            self.on_open()
