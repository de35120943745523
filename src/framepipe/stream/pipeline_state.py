"""A live pipeline's state, decided in one place from its run's phase and its capture's health.

Guarantees (each a plain function of the run's ``phase`` and its capture's
:class:`~framepipe.supervise.Supervisor`, so :class:`~framepipe.stream.pipeline.StreamPipeline`
and its reports never disagree):

* While the run's capture is supervised (``phase`` ``running``), the state is the capture's:
  ``starting`` until a session's first frame (after a restart too), ``running``, ``stalled``,
  ``backoff``, ``retrying``, ``failed``; a capture that stopped leaves the pipeline
  ``running`` while the run is not over (its queued frames drain), ``stopped`` once it is.
  Otherwise the state is the run's own ``phase``: ``stopped``, ``starting`` or ``failed``.
* The source is down only while the capture is supervised and, after a failure, backing off,
  stalled, retried at the backoff's cap, or started again without a frame yet: never at a
  first start (nor after a looped recording's pass), never once the run is not supervising.
* Retried at the backoff's cap means the capture gave up its restarts (``keep_trying``) and
  has no running session: waiting for its next attempt, or an attempt without a frame yet.
"""

from __future__ import annotations

from framepipe.health import HealthState
from framepipe.supervise import Supervisor

__all__ = ["DOWN", "pipeline_state", "retried_at_cap", "source_is_down"]

DOWN = frozenset((HealthState.BACKOFF, HealthState.STALLED, HealthState.RETRYING))
"""Capture states in which the source is down (see :func:`source_is_down`)."""


def pipeline_state(phase: HealthState, capture: Supervisor | None, running: bool) -> HealthState:
    """The pipeline's state: the capture's while ``phase`` is ``running`` (``running``: the
    run is not over), else ``phase``."""
    if phase is not HealthState.RUNNING or capture is None:
        return phase
    state = capture.health.state
    if state is HealthState.STOPPED:
        return HealthState.RUNNING if running else HealthState.STOPPED
    return state


def source_is_down(phase: HealthState, capture: Supervisor | None) -> bool:
    """True while the supervised capture is down after a failure (see the module)."""
    if phase is not HealthState.RUNNING or capture is None:
        return False
    health = capture.health
    return health.state in DOWN or (health.state is HealthState.STARTING and health.attempt > 0)


def retried_at_cap(phase: HealthState, capture: Supervisor | None) -> bool:
    """True while the supervised capture is retried at the backoff's cap without a running
    session (see the module)."""
    if phase is not HealthState.RUNNING or capture is None:
        return False
    health = capture.health
    return health.retrying_since is not None and health.state is not HealthState.RUNNING
