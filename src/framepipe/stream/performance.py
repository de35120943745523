"""How well a live pipeline keeps up with its source: the performance score and its reason.

The rule, in one place for every live pipeline (its ``health()``, the dashboard, applications
that report a score of their own):

* A *paced* source (a camera, a network stream, a file or pattern replayed in real time) makes
  frames at its nominal rate whether or not the pipeline takes them. Its score is the rate at
  which the pipeline takes frames in (its first stage's frames per second over the last
  measuring window, or the capture's when it has no stage) against the nominal rate, so frames
  the camera made while the capture could not take them lower it, and so do frames dropped in
  front of a slow stage.
* A source read on demand (a file read as fast as the pipeline takes it) loses nothing by being
  slower than its nominal rate: its score is 1.
* Frames that failed in a stage in the current capture session lower either score in
  proportion to the frames that session took (a restarted camera is not judged by the frames
  that failed before it restarted).
* The score is judged while the capture runs, once it has run for a full measuring window (the
  first frames of a session wait for models to load): before that, while it backs off, or once
  a finite file has ended and drains, it is 1. A stopped pipeline is 1; a failed one, or one
  whose source is down and retried at the backoff's cap, 0.
* Below 1, ``reason`` says why in words an operator can act on: the rate achieved against the
  nominal one, the slowest stage (its workers, time a frame and queue), the frames the capture
  could not take, dropped and failed frames.
* The slowest stage is looked for among the stages and the sinks (a frame store whose object
  store hangs is one): the last of them, in flow order, whose input queue is full (the hops
  before it only wait on it), else the one with the most time a frame per worker.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from framepipe.stream.stage import Stage, StageStats

__all__ = ["Performance", "RateWindow", "Session", "failed_frames", "measure"]


@dataclass
class RateWindow:
    """Events per second over the last ``window`` seconds (a monotonic clock)."""

    window: float = 5.0
    _times: collections.deque[float] = field(default_factory=collections.deque, repr=False)

    def tick(self) -> None:
        """Count one event now."""
        now = time.monotonic()
        self._times.append(now)
        cutoff = now - self.window
        while self._times[0] < cutoff:
            self._times.popleft()

    @property
    def rate(self) -> float:
        """Events per second over the window (0 when none arrived in it)."""
        now = time.monotonic()
        cutoff = now - self.window
        while self._times and self._times[0] < cutoff:
            self._times.popleft()
        if len(self._times) < 2:
            return len(self._times) / self.window
        return len(self._times) / max(now - self._times[0], 1e-6)


@dataclass(frozen=True)
class Performance:
    """One reading of a pipeline's performance (see the module's rule)."""

    score: float = 1.0
    reason: str | None = None
    paced: bool = False
    processed_fps: float | None = None
    nominal_fps: float | None = None
    not_taken: int = 0
    """Frames a camera at the nominal rate made since the capture opened that it did not take."""
    dropped: int = 0
    """Frames dropped in front of a stage because the pipeline fell behind."""
    failed: int = 0
    """Frames that failed in a stage during the current capture session."""
    bottleneck: str | None = None
    """The stage with the most work per worker."""

    def to_dict(self) -> dict[str, Any]:
        """The reading as JSON-ready fields."""
        return asdict(self)


def _slowest(hops: Sequence[StageStats], by_name: dict[str, Stage]) -> StageStats | None:
    """The slowest of ``hops`` (in flow order): see the module docstring."""
    full = [s for s in hops if s.depth >= by_name[s.name].queue_size]
    if full:
        return full[-1]
    return max(hops, key=lambda s: s.latency_ms / max(1, by_name[s.name].workers), default=None)


def failed_frames(stats: Sequence[StageStats]) -> int:
    """Frames that failed in the stages whose counters are ``stats``, since the run started."""
    return sum(s.errors for s in stats)


@dataclass(frozen=True)
class Session:
    """Where the current capture session started: its monotonic time, the frames captured and
    the frames failed (:func:`failed_frames` of the stages) before it."""

    started: float
    frames_before: int
    failed_before: int


def measure(
    *,
    stages: Sequence[Stage],
    stats: Sequence[StageStats],
    capture_rate: float,
    frames_captured: int,
    nominal_fps: float | None,
    paced: bool,
    session: Session | None,
    window: float = 5.0,
    sinks: Sequence[Stage] = (),
    sink_stats: Sequence[StageStats] = (),
) -> Performance:
    """Score a running capture (the caller handles stopped and failed pipelines).

    ``session`` is None while no capture session is open (opening, backing off, a file that
    ended); ``stats`` holds the stages' counters in order (the same ones the session's
    ``failed_before`` was counted from), ``capture_rate`` the capture's frames per second over
    the window; ``sinks`` and ``sink_stats`` the sinks' hops, looked at for the slowest
    stage only."""
    if not nominal_fps or session is None:
        return Performance(paced=paced, nominal_fps=nominal_fps)
    elapsed = time.monotonic() - session.started
    if elapsed < window:
        return Performance(paced=paced, nominal_fps=nominal_fps)
    taken = frames_captured - session.frames_before
    processed = stats[0].fps if stats else capture_rate
    not_taken = max(0, round(nominal_fps * elapsed) - taken) if paced else 0
    dropped = sum(s.dropped for s in stats)
    failed = max(0, failed_frames(stats) - session.failed_before)
    score = min(1.0, processed / nominal_fps) if paced else 1.0
    score *= 1.0 - min(1.0, failed / max(1, taken))
    score = round(max(0.0, score), 3)
    by_name = {s.label: s for s in [*stages, *sinks]}
    bottleneck = _slowest([s for s in [*stats, *sink_stats] if s.name in by_name], by_name)
    reason: str | None = None
    if score < 1.0 and not paced:
        reason = f"{failed} of {taken} frames failed"
    elif score < 1.0:
        parts = [f"processing {processed:.1f} frames/s of the source's {nominal_fps:g}"]
        if bottleneck is not None:
            stage = by_name[bottleneck.name]
            parts.append(
                f"{bottleneck.name} is the slowest stage ({stage.workers} worker(s), "
                f"{bottleneck.latency_ms:.0f} ms a frame, queue {bottleneck.depth}/"
                f"{stage.queue_size})"
            )
        if not_taken:
            parts.append(
                f"the capture could not take {not_taken} of the frames the source made "
                f"in {elapsed:.0f}s"
            )
        if dropped:
            parts.append(f"{dropped} frames dropped because the pipeline fell behind")
        if failed:
            parts.append(f"{failed} frames failed")
        reason = "; ".join(parts)
    return Performance(
        score=score,
        reason=reason,
        paced=paced,
        processed_fps=round(processed, 2),
        nominal_fps=round(nominal_fps, 2),
        not_taken=not_taken,
        dropped=dropped,
        failed=failed,
        bottleneck=bottleneck.name if bottleneck is not None else None,
    )
