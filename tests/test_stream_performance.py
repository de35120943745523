"""A live pipeline's performance score: the rate it takes frames in against the source's
nominal rate (paced sources), failed frames for sources read on demand, and the reason."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

import pytest

from framepipe.backoff import Backoff
from framepipe.errors import SourceError
from framepipe.frames import Frame
from framepipe.health import HealthState
from framepipe.sources import CommandSource, PatternSource
from framepipe.sources.base import StartedCallback
from framepipe.stream import Sink, Stage, StreamPipeline
from framepipe.stream.performance import Performance
from waiting import wait_until_async

WINDOW = 1.0


def slow(seconds: float) -> Callable[[Frame], Frame]:
    def work(frame: Frame) -> Frame:
        time.sleep(seconds)
        return frame

    work.__name__ = "faces"
    return work


async def reading_after(pipeline: StreamPipeline, seconds: float) -> tuple[Performance, Any]:
    """Run ``pipeline`` for ``seconds``, read its performance and health, then stop it."""
    run = asyncio.create_task(pipeline.run())
    await asyncio.sleep(seconds)
    performance, health = pipeline.performance(), pipeline.health()
    await pipeline.stop()
    await asyncio.wait_for(run, 30)
    return performance, health


@pytest.mark.slow  # reads over measuring windows of real time
def test_a_camera_faster_than_its_slowest_stage_scores_that_ratio_and_says_why() -> None:
    # A camera at 25 fps into a stage that manages ~10 frames/s: a file paced in real time
    # slows down to match (the capture waits), yet the score must say the pipeline keeps
    # only ~40% of what the camera makes, and why.
    pipeline = StreamPipeline(
        "door",
        PatternSource("cam", fps=25, realtime=True),
        stages=[Stage(slow(0.1), workers=1, queue_size=2)],
        performance_window=WINDOW,
    )
    performance, health = asyncio.run(reading_after(pipeline, 3 * WINDOW + 0.5))
    assert performance.paced
    assert 0.2 < performance.score < 0.6, performance
    assert performance.processed_fps is not None and performance.processed_fps < 15
    assert performance.nominal_fps == 25
    assert performance.bottleneck == "faces"
    assert performance.reason is not None
    assert "of the source's 25" in performance.reason
    assert "faces is the slowest stage (1 worker(s)" in performance.reason
    assert health["performance"]["score"] == health["performance_score"]
    assert 0 < health["capture_fps"] < 15  # over the window: what the capture takes now


@pytest.mark.slow  # reads over measuring windows of real time
def test_the_capture_waiting_for_a_slow_pipeline_counts_no_frames() -> None:
    pipeline = StreamPipeline(
        "door",
        PatternSource("cam", fps=50, realtime=False),
        stages=[Stage(slow(0.3), workers=1, queue_size=1)],
        stall_timeout=1.0,  # a keep-alive every 0.25 s while the capture waits ~0.3 s a frame
        performance_window=WINDOW,
    )
    _performance, health = asyncio.run(reading_after(pipeline, 2.0))
    assert health["source"]["frames"] == health["frames_captured"]
    assert health["frames_captured"] < 2.0 / 0.3 + 5  # the stage, not keep-alives, set the pace


@pytest.mark.slow  # reads over measuring windows of real time
def test_a_file_read_on_demand_loses_nothing_by_being_slow() -> None:
    pipeline = StreamPipeline(
        "batch",
        PatternSource("recorded", fps=25, realtime=False),
        stages=[Stage(slow(0.1), workers=1, queue_size=2)],
        performance_window=WINDOW,
    )
    performance, _health = asyncio.run(reading_after(pipeline, 2 * WINDOW + 0.5))
    assert not performance.paced
    assert performance.score == 1.0
    assert performance.reason is None


@pytest.mark.slow  # reads over measuring windows of real time
def test_failed_frames_lower_the_score_in_proportion() -> None:
    def every_other(frame: Frame) -> Frame:
        time.sleep(0.002)
        if frame.seq % 2 == 0:
            raise ValueError("unreadable")
        return frame

    pipeline = StreamPipeline(
        "picky",
        PatternSource("recorded", fps=200, realtime=False),
        stages=[Stage(every_other, workers=1)],
        performance_window=WINDOW,
    )
    performance, _health = asyncio.run(reading_after(pipeline, WINDOW + 0.5))
    assert 0.4 <= performance.score <= 0.6, performance
    assert performance.reason is not None
    assert performance.reason.endswith("frames failed")
    assert performance.failed > 0


@pytest.mark.slow  # reads over measuring windows of real time
def test_a_keeping_up_camera_scores_one_and_a_new_session_waits_a_full_window() -> None:
    pipeline = StreamPipeline(
        "door",
        PatternSource("cam", fps=20, realtime=True),
        stages=[Stage(slow(0.001), workers=1)],
        performance_window=WINDOW,
    )
    early, _ = asyncio.run(reading_after(pipeline, WINDOW / 3))
    assert early.score == 1.0 and early.processed_fps is None  # not judged yet
    pipeline = StreamPipeline(
        "door",
        PatternSource("cam", fps=20, realtime=True),
        stages=[Stage(slow(0.001), workers=1)],
        performance_window=WINDOW,
    )
    performance, _ = asyncio.run(reading_after(pipeline, 2 * WINDOW + 0.5))
    assert performance.score >= 0.9, performance
    assert performance.processed_fps is not None and performance.processed_fps > 15


class UnpluggedOnce(PatternSource):
    """A camera whose first session dies after 40 frames; the next ones are fine."""

    sessions = 0

    async def frames(self, started: StartedCallback | None = None) -> AsyncGenerator[Frame, None]:
        self.sessions += 1
        taken = 0
        async for frame in super().frames(started):
            yield frame
            taken += 1
            if self.sessions == 1 and taken == 40:
                raise SourceError("camera unplugged", source_id=self.source_id)


@pytest.mark.slow  # reads over measuring windows of real time
def test_frames_failed_before_a_restart_do_not_lower_the_next_sessions_score() -> None:
    camera = UnpluggedOnce("cam", fps=20, realtime=True)

    def model(frame: Frame) -> Frame:
        if camera.sessions == 1:  # it choked on the broken session's frames only
            raise ValueError("garbage frame")
        return frame

    pipeline = StreamPipeline(
        "door",
        camera,
        stages=[Stage(model)],
        backoff=Backoff(0.1, 2, 1, 0),
        performance_window=WINDOW,
    )

    async def judged_after_the_restart() -> Performance:
        await pipeline.start()
        try:
            async with asyncio.timeout(15):
                while True:  # until the second session has run a full window and is judged
                    performance = pipeline.performance()
                    if camera.sessions == 2 and performance.processed_fps is not None:
                        return performance
                    await asyncio.sleep(0.05)
        finally:
            await pipeline.stop()

    performance = asyncio.run(judged_after_the_restart())
    assert pipeline.stats[0].errors >= 40  # all of the first session's frames failed...
    assert performance.failed == 0  # ...none of this one's
    assert performance.score >= 0.9, performance


def test_stopped_failed_and_retried_pipelines() -> None:
    """Stopped: 1. Failed (its camera gave up): 0 with the failure. Retried at the backoff's
    cap: 0 with the reason, while it waits."""
    pipeline = StreamPipeline("idle", PatternSource("cam", count=1, realtime=False))
    assert pipeline.performance().score == 1.0
    gone = ["sh", "-c", "echo camera gone >&2; exit 3"]
    failed = StreamPipeline("failed", CommandSource(gone, "cam"), max_restarts=0)
    asyncio.run(asyncio.wait_for(failed.run(), 30))
    assert failed.state is HealthState.FAILED
    assert failed.performance().score == 0.0
    assert failed.performance().reason == f"the pipeline failed: {failed.last_error}"
    assert "exit code: 3" in (failed.last_error or "")
    retried = StreamPipeline(
        "retried",
        CommandSource(gone, "cam"),
        max_restarts=0,
        after_restarts="keep_trying",
        retry_delay=60,
    )

    async def waiting() -> Performance:
        await retried.start()
        try:
            await wait_until_async("retrying", lambda: retried.state is HealthState.RETRYING)
            return retried.performance()
        finally:
            await retried.stop()

    retrying = asyncio.run(waiting())
    assert retrying.score == 0.0
    assert retrying.reason == (
        f"the source is down and retried at the backoff's cap: {retried.last_error}"
    )
    assert "exit code: 3" in (retried.last_error or "")
    with pytest.raises(ValueError, match="performance_window"):
        StreamPipeline("bad", PatternSource("cam"), performance_window=0)


class SlowStore(Sink):
    """A sink that takes ``seconds`` a frame (an object store that hangs)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.name = "frame_store"

    def write(self, frame: Frame) -> None:
        time.sleep(self.seconds)


@pytest.mark.slow  # reads over measuring windows of real time
def test_a_slow_sink_is_named_as_the_bottleneck_not_the_stage_it_backs_up() -> None:
    """A store that holds each frame 0.3 s backs the fast tag reader's queue up to full: the
    reason names the store, the stage that is slow, not the tag reader waiting on it."""
    pipeline = StreamPipeline(
        "station_1",
        PatternSource("station_1", fps=25, realtime=True),
        stages=[Stage(lambda frame: frame, name="order_tags", workers=2, queue_size=4)],
        sinks=[Stage(SlowStore(0.3), name="frame_store", workers=1, queue_size=4)],
        performance_window=WINDOW,
    )
    performance, _health = asyncio.run(reading_after(pipeline, 3 * WINDOW + 0.5))
    assert performance.score < 0.5, performance
    assert performance.bottleneck == "frame_store", performance
    assert performance.reason is not None
    assert "frame_store is the slowest stage (1 worker(s)" in performance.reason
    assert "queue 4/4" in performance.reason
