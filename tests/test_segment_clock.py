"""Segments on the stream's own clock across a restart of the capture, whose frames' ``pts``
start again from 0: real sessions of a :class:`PatternSource`, fed to a segmenter as its
pipeline would. And segments on the wall clock while the system clock is set back or forward
under a running pipeline (the one thing here not real: the step, made to ``time.time``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from framepipe.frames import Frame
from framepipe.sources import PatternSource
from framepipe.stream import Stage, StreamPipeline
from framepipe.stream.segment import Segment, Segmenter
from waiting import wait_until_async


async def _session(source: PatternSource, key: str | None) -> list[Frame]:
    frames = []
    async for frame in source.frames():
        if key is not None:
            frame.meta["order"] = key  # what a QR stage puts on a tagged frame
        frames.append(frame)
    return frames


def test_a_segment_open_when_the_stream_time_steps_back_still_times_out() -> None:
    """Order A is tagged in the first session (pts 0 .. 1.96 s); the capture restarts and its
    next session, untagged, has pts from 0 again. The order times out ``timeout`` stream
    seconds after its last tag, not only once the new pts passed the old ones (nor never,
    taking every frame of the next visit)."""
    source = PatternSource("cam", width=64, height=48, fps=25, count=50, realtime=False)
    first = asyncio.run(_session(source, "A"))
    second = asyncio.run(_session(source, None)) + asyncio.run(_session(source, None))
    assert second[0].pts == 0.0 and first[-1].pts is not None and first[-1].pts > 1.9

    state = Segmenter("order", timeout=1.0, clock="stream").state()
    closed: list[Segment] = []
    joined_after_restart = 0
    for frame in first + second:
        done, joined = state.feed(frame)
        closed += done
        if joined is not None and frame in second:
            joined_after_restart += 1
    closed += state.close_all()

    assert [(s.id, s.reason) for s in closed] == [("A", "timeout")]
    assert closed[0].frames == len(first) + joined_after_restart
    assert joined_after_restart == 25  # the frames of the one stream second after its last tag


def test_max_duration_counts_on_across_a_step_back() -> None:
    """A segment tagged across the restart still ends at ``max_duration`` of stream time."""
    source = PatternSource("cam", width=64, height=48, fps=25, count=50, realtime=False)
    frames = [f for _ in range(4) for f in asyncio.run(_session(source, "A"))]  # 8 s tagged

    state = Segmenter("order", timeout=5.0, max_duration=3.0, clock="stream").state()
    closed = [s for frame in frames for s in state.feed(frame)[0]] + state.close_all()

    assert [s.reason for s in closed] == ["max_duration", "max_duration", "end"]
    # 75 frames are 3 s at 25 fps; a step back counts as no time, so the frame after each
    # step (at 2 s, 4 s and 6 s of the sessions) has the time of the one before it
    assert [s.frames for s in closed] == [75 + 1, 75 + 2, 50 - 3]
    assert [s.id for s in closed] == ["A", "A.2", "A.3"]


class SteppedClock:
    """The system's wall clock, set back or forward by :meth:`step` (as NTP does on its first
    sync); the monotonic clock goes on as it was."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset = 0.0
        real, real_ns = time.time, time.time_ns
        monkeypatch.setattr(time, "time", lambda: real() + self.offset)
        monkeypatch.setattr(time, "time_ns", lambda: real_ns() + int(self.offset * 1e9))

    def step(self, seconds: float) -> None:
        self.offset += seconds


@pytest.mark.parametrize("step", [-3600.0, 86_400.0], ids=["set_back_an_hour", "forward_a_day"])
def test_a_wall_clock_segment_keeps_its_timeout_and_max_duration_when_the_clock_steps(
    monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    """Order A is tagged for a while, the system clock steps in the middle, the tags stop and
    the clock steps again: A is one segment that closes ``timeout`` seconds after its last
    tag (set back, it stayed open for the size of the step; set forward, ``max_duration``
    closed it at once)."""
    clock = SteppedClock(monkeypatch)
    tagging = {"on": True}

    def tag(frame: Frame) -> Frame:
        if tagging["on"]:
            frame.meta["order"] = "A"
        return frame

    events: list[tuple[str, dict[str, Any]]] = []
    pipeline = StreamPipeline(
        "station",
        PatternSource("station", width=32, height=24, fps=50),
        stages=[Stage(tag)],
        segmenter=Segmenter("order", timeout=0.5, max_duration=600.0),
    )
    pipeline.on_event(lambda kind, data: events.append((kind, data)))

    def completed() -> list[dict[str, Any]]:
        return [data for kind, data in events if kind == "segment.completed"]

    async def main() -> float:
        await pipeline.start()
        try:
            await wait_until_async("A open", lambda: any(k == "segment.started" for k, _ in events))
            await asyncio.sleep(0.3)
            clock.step(step / 2)
            await asyncio.sleep(0.3)
            assert completed() == []  # still tagged: A goes on across the step
            tagging["on"] = False
            untagged_at = time.monotonic()
            await asyncio.sleep(0.1)
            clock.step(step / 2)  # and once more while A waits for its timeout
            await wait_until_async("A completed", completed, timeout=10)
            return time.monotonic() - untagged_at
        finally:
            await pipeline.stop()

    waited = asyncio.run(main())
    assert [(d["segment_id"], d["reason"]) for d in completed()] == [("A", "timeout")]
    assert waited < 5.0  # the timeout (0.5 s) after the last tag, not the step's size


def test_a_frame_in_flight_when_the_clock_steps_forward_opens_a_segment_that_lasts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A frame captured just before the clock stepped an hour forward reaches the segmenter
    after it: its segment lasts its timeout, not closed at once by ``max_duration``."""
    source = PatternSource("cam", width=16, height=16, count=1, realtime=False)
    [frame] = asyncio.run(_session(source, "A"))  # stamped by the clock before the step
    SteppedClock(monkeypatch).step(3600.0)
    state = Segmenter("order", timeout=5.0, max_duration=60.0).state()
    closed, joined = state.feed(frame)
    assert closed == [] and joined is not None
    deadline = state.deadline()
    assert deadline is not None and 4.0 < deadline - time.monotonic() <= 5.0
    assert state.expire(time.monotonic()) is None


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"max_duration": float("nan")}, "max_duration"),
        ({"max_duration": -1.0}, "max_duration"),
    ],
)
def test_a_timeout_or_max_duration_that_is_not_a_finite_positive_number_is_refused(
    settings: dict[str, float], named: str
) -> None:
    """A NaN timeout compares false with every age, so its order would never close: refused
    at the start, naming the setting."""
    with pytest.raises(ValueError, match=f"segment {named} must be a finite number > 0"):
        Segmenter("order", **settings)
