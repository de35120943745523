"""The supervision of a live pipeline's capture: the :class:`~framepipe.supervise.Supervisor`
that launches a run's capture sessions, made from the pipeline's restart settings.

Guarantees:

* The supervisor is named by the source's id and reports its events to ``on_event``.
* ``max_restarts`` counts restarts after the first session (``max_restarts + 1`` attempts in
  a row may fail); None restarts forever. ``after_restarts``, ``retry_delay``, ``backoff``,
  ``stall_timeout``, ``start_timeout``, ``healthy_after`` and ``restart_on_end`` are the
  supervisor's own, as given; a looped recording (``source.loops``) starts its next pass at
  once.
* A session waiting for room in a blocking first queue tells the supervisor it waits every
  :func:`keepalive` seconds, often enough that waiting for the pipeline is never taken for a
  stall of the source.
* :data:`FAILURE_EVENTS` are the supervisor's events whose ``error`` is the capture's last
  error.
"""

from __future__ import annotations

from typing import Literal, Protocol

from framepipe.backoff import Backoff
from framepipe.sources.base import Source
from framepipe.supervise import EventCallback, SupervisedTarget, Supervisor

__all__ = ["FAILURE_EVENTS", "RestartSettings", "capture_supervisor", "keepalive"]

FAILURE_EVENTS = frozenset(("died", "stalled", "failed", "retrying"))
"""The supervisor's events that carry the capture's last error."""


class RestartSettings(Protocol):
    """What the supervision of a pipeline's capture is made from (a
    :class:`~framepipe.stream.pipeline.StreamPipeline` has them all)."""

    @property
    def source(self) -> Source: ...
    @property
    def backoff(self) -> Backoff: ...
    @property
    def max_restarts(self) -> int | None: ...
    @property
    def stall_timeout(self) -> float | None: ...
    @property
    def start_timeout(self) -> float | None: ...
    @property
    def healthy_after(self) -> float: ...
    @property
    def restart_on_end(self) -> bool: ...
    @property
    def after_restarts(self) -> Literal["fail", "keep_trying"]: ...
    @property
    def retry_delay(self) -> float | None: ...


def capture_supervisor(
    settings: RestartSettings,
    session: SupervisedTarget,
    on_event: EventCallback,
) -> Supervisor:
    """The supervisor of ``settings.source``'s capture, each session run by ``session``."""
    max_restarts = settings.max_restarts
    return Supervisor(
        settings.source.source_id,
        session,
        backoff=settings.backoff,
        max_attempts=None if max_restarts is None else max_restarts + 1,
        stall_timeout=settings.stall_timeout,
        start_timeout=settings.start_timeout,
        healthy_after=settings.healthy_after,
        restart_on_end=settings.restart_on_end,
        loop=settings.source.loops,
        after_attempts=settings.after_restarts,
        retry_delay=settings.retry_delay,
        on_event=on_event,
    )


def keepalive(stall_timeout: float | None) -> float:
    """Seconds between a waiting session's signs of life: a quarter of ``stall_timeout`` (of
    4 s without one), at least 0.05."""
    return max(0.05, (stall_timeout or 4.0) / 4)
