"""What a live pipeline reports of itself: its performance and its health report.

Guarantees:

* :func:`pipeline_performance` applies :mod:`framepipe.stream.performance`'s rule to one
  pipeline: a failed pipeline scores 0 with its last error as the reason, so does one whose
  source is retried at the backoff's cap; otherwise the score is measured from its stages'
  counters (the sinks' only to name the slowest hop), and the current capture session counts
  only while the capture runs.
* :func:`health_report` is a plain dict of plain values (JSON as it is): the name, state,
  performance (score and reading), uptime, last error, the capture's health, the source's
  description, frames captured and the capture's frames per second over the measuring window,
  frames out, frames the capture queue dropped, segments completed, the open segment's id and
  each stage's and sink's counters, in flow order. Reading it changes nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from framepipe.health import HealthState
from framepipe.sources.base import Source
from framepipe.stream.intake import Intake
from framepipe.stream.performance import Performance, measure
from framepipe.stream.segment_flow import SegmentFlow
from framepipe.stream.stage import Stage, StageStats
from framepipe.supervise import Supervisor

__all__ = ["health_report", "pipeline_performance"]


def pipeline_performance(
    *,
    state: HealthState,
    last_error: str | None,
    retried_at_cap: bool,
    capture: Supervisor | None,
    source: Source,
    stages: Sequence[Stage],
    sinks: Sequence[Stage],
    stats: Sequence[StageStats],
    intake: Intake,
) -> Performance:
    """The pipeline's performance (see the module); ``stats``: the stages' then the sinks'."""
    if state is HealthState.FAILED:
        return Performance(score=0.0, reason=f"the pipeline failed: {last_error}")
    if retried_at_cap:
        return Performance(
            score=0.0,
            reason=f"the source is down and retried at the backoff's cap: {last_error}",
        )
    running = (
        state is not HealthState.STOPPED
        and capture is not None
        and capture.health.state is HealthState.RUNNING
    )
    return measure(
        stages=stages,
        stats=stats[: len(stages)],
        capture_rate=intake.rate.rate,
        frames_captured=intake.frames,
        nominal_fps=source.fps,
        paced=source.paced,
        session=intake.session if running else None,
        window=intake.rate.window,
        sinks=sinks,
        sink_stats=stats[len(stages) :],
    )


def health_report(
    *,
    name: str,
    state: HealthState,
    performance: Performance,
    started_at: float | None,
    last_error: str | None,
    capture: Supervisor | None,
    source: Source,
    intake: Intake,
    frames_out: int,
    capture_dropped: int,
    segments: SegmentFlow,
    stats: Sequence[StageStats],
) -> dict[str, Any]:
    """The pipeline's health report (see the module)."""
    open_segment = segments.open
    return {
        "name": name,
        "state": state.value,
        "performance_score": performance.score,
        "performance": performance.to_dict(),
        "uptime": round(time.time() - started_at, 3) if started_at else 0.0,
        "last_error": last_error,
        "source": capture.health.to_dict() if capture is not None else None,
        "source_description": source.describe(),
        "frames_captured": intake.frames,
        "capture_fps": round(intake.rate.rate, 2),
        "frames_out": frames_out,
        "capture_dropped": capture_dropped,
        "segments_completed": segments.completed,
        "open_segment": open_segment.id if open_segment else None,
        "stages": [s.to_dict() for s in stats],
    }
