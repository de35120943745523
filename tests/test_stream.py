"""Live pipelines: stages, ordering, overflow, errors, segments, frame store, motion gate."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from framepipe import LocalObjectStore
from framepipe.frames import Frame
from framepipe.health import HealthState
from framepipe.processors import Processor
from framepipe.sources import PatternSource
from framepipe.stream import FrameStore, MotionGate, Segmenter, Sink, Stage, StreamPipeline
from waiting import wait_until_async

Events = list[tuple[str, dict[str, Any]]]


def run_pipeline(pipeline: StreamPipeline) -> Events:
    events: Events = []
    pipeline.on_event(lambda kind, data: events.append((kind, data)))
    asyncio.run(asyncio.wait_for(pipeline.run(), 60))
    return events


def of(events: Events, kind: str) -> list[dict[str, Any]]:
    return [data for k, data in events if k == kind]


class Collect(Sink):
    """A sink that keeps what reaches it."""

    def __init__(self) -> None:
        self.name = "collect"
        self.frames: list[Frame] = []
        self.closed: list[str] = []
        self.lock = threading.Lock()

    def write(self, frame: Frame) -> None:
        with self.lock:
            self.frames.append(frame)

    def segment_closed(self, segment: Any) -> None:
        with self.lock:
            seen = [f.seq for f in self.frames if f.segment_id == segment.id]
        assert len(seen) == segment.frames  # every frame of it was written before
        self.closed.append(segment.id)


def test_ordered_stage_keeps_source_order_with_many_workers() -> None:
    def jitter(frame: Frame) -> Frame:
        time.sleep(random.uniform(0, 0.004))
        frame.meta["worker"] = threading.get_ident()
        return frame

    sink = Collect()
    pipeline = StreamPipeline(
        "ordered",
        PatternSource("cam", count=120, realtime=False),
        stages=[Stage(jitter, workers=4, ordered=True)],
        sinks=[sink],
    )
    run_pipeline(pipeline)
    assert [f.seq for f in sink.frames] == list(range(1, 121))
    assert len({f.meta["worker"] for f in sink.frames}) > 1  # really ran in parallel
    stats = pipeline.stats[0]
    assert (stats.frames_in, stats.frames_out, stats.errors) == (120, 120, 0)


def test_block_loses_nothing_and_drop_oldest_drops_and_counts() -> None:
    def slow(frame: Frame) -> Frame:
        time.sleep(0.01)
        return frame

    kept = Collect()
    blocking = StreamPipeline(
        "block",
        PatternSource("a", count=60, realtime=False),
        stages=[Stage(slow, queue_size=2)],
        sinks=[kept],
    )
    run_pipeline(blocking)
    assert len(kept.frames) == 60
    assert blocking.stats[0].dropped == 0

    live = Collect()
    dropping = StreamPipeline(
        "drop",
        PatternSource("b", count=60, realtime=False),
        stages=[Stage(slow, queue_size=2, overflow="drop_oldest")],
        sinks=[live],
    )
    run_pipeline(dropping)
    dropped = dropping.stats[0].dropped
    assert dropped > 0
    assert len(live.frames) + dropped == 60
    assert [f.seq for f in live.frames] == sorted(f.seq for f in live.frames)


def test_failing_processor_is_counted_reported_and_does_not_stop_the_stream() -> None:
    def picky(frame: Frame) -> Frame:
        if frame.seq % 10 == 0:
            raise ValueError(f"cannot read frame {frame.seq}")
        return frame

    sink = Collect()
    pipeline = StreamPipeline(
        "picky",
        PatternSource("cam", count=50, realtime=False),
        stages=[Stage(picky, workers=2)],
        sinks=[sink],
    )
    events = run_pipeline(pipeline)
    errors = of(events, "processor.error")
    assert [e["seq"] for e in errors] == [10, 20, 30, 40, 50] or sorted(
        e["seq"] for e in errors
    ) == [10, 20, 30, 40, 50]
    assert "stage 'picky', frame 10: ValueError: cannot read frame 10" in errors[0]["error"] or any(
        "cannot read frame" in e["error"] for e in errors
    )
    assert pipeline.stats[0].errors == 5
    assert len(sink.frames) == 45
    assert pipeline.state is HealthState.STOPPED


def test_processor_setup_and_teardown_run_once() -> None:
    class Model(Processor):
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.threads: set[int] = set()

        def setup(self) -> None:
            self.calls.append("setup")
            self.threads.add(threading.get_ident())

        def process(self, item: Any) -> Any:
            self.threads.add(threading.get_ident())
            return item

        def teardown(self) -> None:
            self.calls.append("teardown")

    model = Model()
    run_pipeline(
        StreamPipeline(
            "model",
            PatternSource("cam", count=20, realtime=False),
            stages=[Stage(model, workers=3)],
        )
    )
    assert model.calls == ["setup", "teardown"]
    assert threading.get_ident() not in model.threads  # blocking work ran off the loop


def tagger(orders: dict[range, str]) -> Any:
    def tag(frame: Frame) -> Frame:
        for frames, order in orders.items():
            if frame.seq in frames:
                frame.meta["order"] = order
        return frame

    return tag


def test_an_order_open_at_a_stop_whose_drain_completes_is_completed_as_stopped(
    tmp_path: Path,
) -> None:
    """A stop that drains every frame still says the open order was cut by the stop
    (``"stopped"``), not by the end of a recording (``"end"``): a checking service tells an
    order a Ctrl-C ended from one whose footage ended."""
    store = LocalObjectStore(tmp_path / "objects")

    async def main() -> Events:
        pipeline = StreamPipeline(
            "station_1",
            PatternSource("station_1", fps=50),
            stages=[Stage(tagger({range(1, 100_000): "ORDER_1"}))],
            segmenter=Segmenter("order", timeout=30),
            sinks=[FrameStore(store)],
        )
        events: Events = []
        pipeline.on_event(lambda kind, data: events.append((kind, data)))
        await pipeline.start()
        await wait_until_async("an open order", lambda: pipeline.open_segment is not None, 10)
        await asyncio.wait_for(pipeline.stop(drain_timeout=30), 40)
        assert pipeline.frames_out == pipeline.frames_captured  # the drain completed
        return events

    done = of(asyncio.run(main()), "segment.completed")
    assert [(d["segment_id"], d["reason"]) for d in done] == [("ORDER_1", "stopped")]
    assert len(done[0]["stored"]) == done[0]["frames"] > 0


def test_a_recording_that_ended_before_the_stop_closes_its_order_as_end(tmp_path: Path) -> None:
    """The reason is decided as the capture ends: a file that played to its end, its last
    frames still in a slow stage when the stop comes (Ctrl-C right after it ended), completes
    its order as ``"end"``, not ``"stopped"``."""
    store = LocalObjectStore(tmp_path / "objects")

    def slow_tag(frame: Frame) -> Frame:
        time.sleep(0.05)
        frame.meta["order"] = "ORDER_1"
        return frame

    async def main() -> Events:
        pipeline = StreamPipeline(
            "station_1",
            PatternSource("station_1", count=40, realtime=False),
            stages=[Stage(slow_tag)],
            segmenter=Segmenter("order", timeout=30),
            sinks=[FrameStore(store)],
        )
        events: Events = []
        pipeline.on_event(lambda kind, data: events.append((kind, data)))
        await pipeline.start()
        assert pipeline.supervisor is not None
        await asyncio.wait_for(pipeline.supervisor.wait(), 20)  # the recording ended
        assert pipeline.frames_out < pipeline.frames_captured  # its last frames in flight
        await asyncio.wait_for(pipeline.stop(drain_timeout=30), 40)
        assert pipeline.frames_out == pipeline.frames_captured  # the drain completed
        return events

    done = of(asyncio.run(main()), "segment.completed")
    assert [(d["segment_id"], d["reason"]) for d in done] == [("ORDER_1", "end")]


def test_segments_by_key_timeout_key_change_reappearance_and_end(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    tags = tagger(
        {
            range(5, 15): "ORDER_1",
            range(15, 20): "ORDER_2",
            range(40, 45): "ORDER_1",
            range(60, 63): "ORDER_3",
        }
    )
    frames = FrameStore(store)
    # The stream clock makes the test independent of the machine's load (a wall-clock gap of
    # 75 ms between two frames is easy to hit on a busy CI machine).
    pipeline = StreamPipeline(
        "station_1",
        PatternSource("station_1", count=63, fps=100, realtime=False),
        stages=[Stage(tags, workers=2)],
        segmenter=Segmenter("order", timeout=0.075, clock="stream"),
        sinks=[frames],
    )
    events = run_pipeline(pipeline)
    done = of(events, "segment.completed")
    assert [(d["segment_id"], d["reason"]) for d in done] == [
        ("ORDER_1", "key_changed"),
        ("ORDER_2", "timeout"),
        ("ORDER_1.2", "timeout"),
        ("ORDER_3", "end"),
    ]
    first = done[0]
    assert first["frames"] == 10 and first["source_id"] == "station_1"
    assert first["stored"] == [
        f"frames/station_1/ORDER_1/frame_{f.ts_ms}_{f.seq}.jpg"
        for f in frames.read_frames("station_1", "ORDER_1")
    ]
    assert len(first["stored"]) == 10
    assert first["latency_s"] >= 0 and first["first_ts_ms"] <= first["last_ts_ms"]
    # ORDER_2 kept the untagged frames that followed it until its timeout
    assert done[1]["frames"] == 5 + 7
    assert [d["segment_id"] for d in of(events, "segment.started")] == [
        "ORDER_1",
        "ORDER_2",
        "ORDER_1.2",
        "ORDER_3",
    ]
    back = list(frames.read_frames("station_1", "ORDER_2"))
    assert len(back) == done[1]["frames"] and back[0].image.shape == (240, 320, 3)
    assert pipeline.segments_completed == 4


def test_a_pipeline_started_again_still_closes_its_segments_on_their_timeout() -> None:
    """A run that ended while its segment's timeout was pending leaves nothing of it to the
    next run of the same pipeline (an app's resume, a recovery): the wall-clock timeout of the
    next run's segments still closes them."""
    tags = {"key": "A", "left": 3}

    def tag(frame: Frame) -> Frame:
        if tags["left"] > 0:  # the first frames of each run are keyed, the rest are not
            tags["left"] -= 1
            frame.meta["order"] = tags["key"]
        return frame

    events: Events = []
    pipeline = StreamPipeline(
        "s",
        PatternSource("s", fps=50),
        stages=[Stage(tag)],
        segmenter=Segmenter("order", timeout=1.0),
    )
    pipeline.on_event(lambda kind, data: events.append((kind, data)))

    def completed(key: str) -> list[str]:
        return [d["reason"] for d in of(events, "segment.completed") if d["key"] == key]

    async def main() -> None:
        await pipeline.start()
        await wait_until_async("segment A open", lambda: of(events, "segment.started"))
        await pipeline.stop()  # A's timeout is still ahead
        assert completed("A")
        tags.update(key="B", left=3)
        await pipeline.start()
        try:
            await wait_until_async("segment B completed", lambda: completed("B"))
        finally:
            await pipeline.stop()

    asyncio.run(main())
    assert completed("B") == ["timeout"]


def test_frame_store_copies_the_best_frames_of_each_segment(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")

    def score(frame: Frame) -> Frame:
        frame.meta["order"] = "ORDER_9"
        frame.meta["score"] = -abs(frame.seq - 7)  # frames 7, 6 and 8 are the best
        return frame

    bucket = LocalObjectStore(tmp_path / "selected-bucket")
    run_pipeline(
        StreamPipeline(
            "s",
            PatternSource("s", count=12, realtime=False),
            stages=[Stage(score)],
            segmenter=Segmenter("order", timeout=5),
            sinks=[
                FrameStore(store, select_best=3),
                Stage(
                    FrameStore(store, select_best=2, selected_prefix="", selected_store=bucket),
                    name="to_bucket",
                ),
            ],
        )
    )
    selected = sorted(o.key for o in store.list("selected/"))
    assert len(selected) == 3
    assert [k.rsplit("_", 1)[1] for k in selected] == ["6.jpg", "7.jpg", "8.jpg"]
    assert all(store.get(k)[:2] == b"\xff\xd8" for k in selected)
    in_bucket = sorted(o.key for o in bucket.list())
    assert [k.rsplit("_", 1)[1] for k in in_bucket] == ["6.jpg", "7.jpg"]
    assert in_bucket[0].startswith("frames/s/ORDER_9/")


def test_frames_the_store_refuses_are_counted_per_segment_and_warned_about_sparingly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An object store that refuses a segment's frames (here a file sits where that order's
    folder goes): each refused frame is a ``processor.error`` event, its segment's
    ``segment.completed`` says how many of its frames were not stored (``not_stored``) and its
    log line too, the other segments are whole, and the log gets one warning for the run of
    refusals, not one per frame."""
    store = LocalObjectStore(tmp_path / "objects")
    blocker = tmp_path / "objects" / "frames" / "s" / "B"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")
    tag = tagger({range(1, 11): "A", range(11, 41): "B", range(41, 51): "C"})  # seq from 1
    caplog.set_level("INFO")
    events = run_pipeline(
        StreamPipeline(
            "s",
            PatternSource("s", count=50, realtime=False),
            stages=[Stage(tag)],
            segmenter=Segmenter("order", timeout=5),
            sinks=[FrameStore(store)],
        )
    )
    completed = {d["segment_id"]: d for d in of(events, "segment.completed")}
    assert set(completed) == {"A", "B", "C"}
    assert (completed["B"]["frames"], completed["B"]["not_stored"]) == (30, 30)
    assert completed["B"]["stored"] == []
    for whole in ("A", "C"):
        assert completed[whole]["not_stored"] == 0
        assert len(completed[whole]["stored"]) == completed[whole]["frames"] == 10
    errors = [d for d in of(events, "processor.error") if d["stage"] == "frame_store"]
    assert len(errors) == 30  # every refused frame is an event
    warnings = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "B" in r.getMessage()
    ]
    assert 1 <= len(warnings) <= 3, warnings  # not 30
    lines = [r.getMessage() for r in caplog.records if "completed:" in r.getMessage()]
    assert any(
        line.startswith("Segment B completed:") and "not stored=30" in line for line in lines
    )
    assert not any("not stored" in line for line in lines if not line.startswith("Segment B"))


def test_sink_sees_all_frames_of_a_segment_before_it_closes() -> None:
    sink = Collect()
    tag = tagger({range(1, 30): "A", range(30, 60): "B"})
    run_pipeline(
        StreamPipeline(
            "barrier",
            PatternSource("c", count=60, realtime=False),
            stages=[Stage(tag, workers=3)],
            segmenter=Segmenter("order", timeout=5),
            sinks=[Stage(sink, workers=4)],
        )
    )
    assert sink.closed == ["A", "B"]


class Sequence(Sink):
    """A one-worker sink that keeps one open segment, as a video writer does: every write
    must belong to the segment being written, and a segment closes before the next starts."""

    def __init__(self) -> None:
        self.name = "sequence"
        self.log: list[tuple[str, str | None]] = []

    def write(self, frame: Frame) -> None:
        self.log.append(("write", frame.segment_id))
        time.sleep(0.0005)  # a call long enough for the next frame to be handed over

    def segment_closed(self, segment: Any) -> None:
        time.sleep(0.002)  # a slow close: a write of the next segment would overtake it
        self.log.append(("closed", segment.id))


def test_a_one_worker_sink_closes_a_segment_before_writing_the_next() -> None:
    """The frames of the next segment reach a ``workers=1`` sink only after it closed the
    segment before them, even though the sink's thread takes frames ahead of the loop."""
    sink = Sequence()
    bounds = {range(start, start + 7): f"S{start}" for start in range(1, 120, 8)}
    run_pipeline(
        StreamPipeline(
            "sequence",
            PatternSource("c", width=32, height=32, count=120, realtime=False),
            stages=[Stage(tagger(bounds), workers=2)],
            segmenter=Segmenter("order", timeout=5),
            sinks=[Stage(sink, workers=1)],
        )
    )
    closed = [seg for kind, seg in sink.log if kind == "closed"]
    assert closed == [f"S{start}" for start in range(1, 120, 8)]
    current: str | None = None
    for kind, segment in sink.log:
        if kind == "write" and segment is not None:
            assert current in (None, segment), f"{segment} written while {current} was open"
            current = segment
        elif kind == "closed":
            assert segment == current
            current = None


def test_an_unordered_one_worker_stage_keeps_order_under_backpressure() -> None:
    """One worker hands frames on in the order it took them, also when the next hop's full
    queue makes it wait (a motion gate or a tracker after it relies on that)."""

    def quick(frame: Frame) -> Frame:
        time.sleep(random.uniform(0, 0.001))
        return frame

    def slow(frame: Frame) -> Frame:
        time.sleep(random.uniform(0, 0.002))
        return frame

    sink = Collect()
    run_pipeline(
        StreamPipeline(
            "unordered",
            PatternSource("c", width=16, height=16, count=200, realtime=False),
            stages=[
                Stage(quick, workers=1, ordered=False),
                Stage(slow, name="slow", workers=1, ordered=False, queue_size=1),
            ],
            sinks=[Stage(sink, workers=1)],
        )
    )
    assert [f.seq for f in sink.frames] == list(range(1, 201))


def test_activity_segments_after_a_motion_gate() -> None:
    frozen = np.full((120, 160, 3), 80, np.uint8)

    def still_then_moving(image: np.ndarray, seq: int) -> None:
        if 20 <= seq < 40:
            image[:] = frozen  # no motion
        elif seq >= 40:
            image[:] = frozen
            x = (seq * 7) % 140
            image[40:80, x : x + 20] = 255

    gate = MotionGate(0.002)
    pipeline = StreamPipeline(
        "porch",
        PatternSource(
            "porch", width=160, height=120, count=60, fps=200, realtime=True, draw=still_then_moving
        ),
        stages=[Stage(gate)],
        segmenter=Segmenter(None, timeout=0.05),
    )
    events = run_pipeline(pipeline)
    stats = pipeline.stats[0]
    assert stats.filtered >= 19  # the still frames did not pass
    visits = of(events, "segment.completed")
    assert len(visits) >= 2  # the first moving part and the last one, split by stillness
    assert all(v["key"] is None for v in visits)


def test_motion_gate_methods() -> None:
    a = Frame(np.zeros((240, 320, 3), np.uint8), "cam", 1)
    b = Frame(np.zeros((240, 320, 3), np.uint8), "cam", 2)
    b.image[100:140, 100:160] = 255
    for method in ("diff", "mog2"):
        gate = MotionGate(0.01, method=method)  # type: ignore[arg-type]
        assert gate.process(a) is None  # the first frame counts as still
        assert gate.process(b) is b
        assert b.meta["motion"] > 0.01
    with pytest.raises(ValueError, match="fraction"):
        MotionGate(5)


def test_motion_gate_starts_again_after_a_size_change_with_both_methods() -> None:
    """A camera restarted at another resolution: its first frame at the new size counts as
    still (the comparison starts again from it), then motion is scored as before."""
    for method in ("diff", "mog2"):
        gate = MotionGate(0.01, method=method, width=160)  # type: ignore[arg-type]
        for n in range(1, 4):
            gate.process(Frame(np.zeros((240, 320, 3), np.uint8), "cam", n))
        wide = Frame(np.full((180, 320, 3), 90, np.uint8), "cam", 4)  # 16:9 now, brighter
        assert gate.process(wide) is None, method
        assert wide.meta["motion"] == 0.0
        moved = Frame(np.full((180, 320, 3), 90, np.uint8), "cam", 5)
        moved.image[60:120, 100:200] = 255
        assert gate.process(moved) is moved, method


def test_a_task_that_dies_fails_the_pipeline_loudly(caplog: pytest.LogCaptureFixture) -> None:
    def key(frame: Frame) -> str | None:
        if frame.seq > 4:
            raise RuntimeError("disk on fire")  # the segmenter's own task dies of it
        return "X"

    pipeline = StreamPipeline(
        "doomed",
        PatternSource("d", count=500, fps=200, realtime=True),
        segmenter=Segmenter(key, timeout=0.02),
    )
    events = run_pipeline(pipeline)  # returns: no hang on the dead task
    assert pipeline.state is HealthState.FAILED
    failed = of(events, "pipeline.failed")
    assert failed and "disk on fire" in failed[0]["error"]
    assert "disk on fire" in caplog.text
    assert pipeline.frames_captured < 500  # the capture was stopped


def test_stream_clock_segments_recorded_video_by_its_own_time() -> None:
    # 200 fps of "video" processed as fast as possible: 10 tagged frames, 40 untagged
    # (0.2 stream-seconds), 10 tagged. With a 0.1 s stream-time timeout that is two orders,
    # whatever the processing speed.
    tags = tagger({range(1, 11): "A", range(51, 61): "A"})
    pipeline = StreamPipeline(
        "recorded",
        PatternSource("recorded", fps=200, count=75, realtime=False),
        stages=[Stage(tags)],
        segmenter=Segmenter("order", timeout=0.1, clock="stream"),
    )
    done = of(run_pipeline(pipeline), "segment.completed")
    assert [(d["segment_id"], d["reason"]) for d in done] == [("A", "timeout"), ("A.2", "end")]
    assert done[0]["frames"] in (29, 30)  # + the untagged frames within 0.1 stream-seconds
    with pytest.raises(ValueError, match="clock"):
        Segmenter("order", clock="sundial")  # type: ignore[arg-type]


def test_cheap_threaded_stages_batch_yet_keep_order_and_per_frame_errors() -> None:
    threads: set[int] = set()

    def cheap(frame: Frame) -> Frame:
        threads.add(threading.get_ident())
        if frame.seq % 97 == 0:
            raise ValueError("bad frame")
        return frame

    sink = Collect()
    pipeline = StreamPipeline(
        "batched",
        PatternSource("cam", width=16, height=16, count=2000, realtime=False),
        stages=[
            Stage(cheap, workers=2, queue_size=64, ordered=True),
            Stage(lambda f: f, name="second", workers=3, ordered=True),
        ],
        sinks=[sink],
    )
    events = run_pipeline(pipeline)
    expected = [s for s in range(1, 2001) if s % 97]
    assert [f.seq for f in sink.frames] == expected
    assert sorted(e["seq"] for e in of(events, "processor.error")) == list(range(97, 2001, 97))
    assert pipeline.stats[0].errors == 20
    assert pipeline.stats[0].frames_in == 2000
    assert threading.get_ident() not in threads


def test_a_stage_thread_goes_on_to_its_next_frame_while_the_event_loop_is_busy() -> None:
    """While a worker thread runs a frame, the frame queued behind it is handed over too:
    when the event loop is blocked (a busy callback, a slow inline stage), the thread does not
    wait for it between frames. The frames still leave in the source's order."""
    k = 30
    running_k = threading.Event()
    starts: dict[int, float] = {}

    def slow(frame: Frame) -> Frame:
        starts[frame.seq] = time.monotonic()
        time.sleep(0.002)  # too long a call to be batched with the frames behind it
        if frame.seq == k:
            running_k.set()
            time.sleep(0.1)  # meanwhile the event loop is blocked
        return frame

    sink = Collect()
    pipeline = StreamPipeline(
        "ahead",
        PatternSource("cam", width=16, height=16, count=40, realtime=False),
        stages=[Stage(slow, workers=1, ordered=True)],
        sinks=[sink],
    )
    blocked: list[float] = []

    async def main() -> None:
        run = asyncio.create_task(pipeline.run())
        await asyncio.to_thread(running_k.wait, 10)
        time.sleep(0.5)  # noqa: ASYNC251 -- the event loop blocked on purpose
        blocked.append(time.monotonic())
        await asyncio.wait_for(run, 30)

    asyncio.run(main())
    assert [f.seq for f in sink.frames] == list(range(1, 41))
    assert starts[k + 1] < blocked[0] - 0.2  # began while the loop was still blocked


@pytest.mark.slow
def test_wall_clock_timeout_closes_a_segment_when_no_frame_comes() -> None:
    tags = tagger({range(1, 6): "ORDER_W"})
    started = time.monotonic()
    pipeline = StreamPipeline(
        "wall",
        PatternSource("wall", count=60, fps=50, realtime=True),
        stages=[Stage(tags)],
        segmenter=Segmenter("order", timeout=0.3, include_untagged=False),
    )
    done = of(run_pipeline(pipeline), "segment.completed")
    assert [(d["segment_id"], d["reason"], d["frames"]) for d in done] == [
        ("ORDER_W", "timeout", 5)
    ]
    assert time.monotonic() - started >= 1.0  # closed by the timer while frames still came


@pytest.mark.slow
def test_a_pipeline_running_behind_its_camera_does_not_split_a_segment() -> None:
    """Keyed frames captured 20 ms apart reach the segmenter 120 ms apart (a slow stage): the
    lag grows past the 0.3 s timeout, yet the key never left the picture, so one segment."""
    tags = tagger({range(1, 16): "ORDER_L"})

    def slow(frame: Frame) -> Frame:
        time.sleep(0.12)
        return frame

    pipeline = StreamPipeline(
        "late",
        PatternSource("late", count=15, fps=50, realtime=True),
        stages=[Stage(tags), Stage(slow, queue_size=32)],
        segmenter=Segmenter("order", timeout=0.3),
    )
    done = of(run_pipeline(pipeline), "segment.completed")
    assert [(d["segment_id"], d["frames"]) for d in done] == [("ORDER_L", 15)]
    assert done[0]["last_ts_ms"] - done[0]["first_ts_ms"] < 600  # captured within 0.3 s...
    # ...but the lag at the end was over a second: by capture time it would have split


def test_a_processor_calling_sys_exit_is_a_processor_error() -> None:
    def bail(frame: Frame) -> Frame:
        if frame.seq == 3:
            raise SystemExit(4)
        return frame

    pipeline = StreamPipeline(
        "bail",
        PatternSource("bail", count=6, realtime=False),
        stages=[Stage(bail), Stage(bail, name="inline", inline=True)],
    )
    events = run_pipeline(pipeline)
    assert [e["stage"] for e in of(events, "processor.error")] == ["bail"]
    assert pipeline.frames_out == 5


def test_a_finite_source_draining_is_not_scored_as_slow() -> None:
    def slow(frame: Frame) -> Frame:
        time.sleep(0.04)
        return frame

    pipeline = StreamPipeline(
        "drain",
        PatternSource("drain", count=20, fps=100, realtime=True),
        stages=[Stage(slow, queue_size=32)],
    )

    async def main() -> list[float]:
        await pipeline.start()
        scores = []
        while pipeline.running:
            sup = pipeline.supervisor
            if sup is not None and sup.health.state is not HealthState.RUNNING:
                scores.append(pipeline.performance_score())  # captured all, still draining
            await asyncio.sleep(0.02)
        await pipeline.wait()
        return scores

    scores = asyncio.run(asyncio.wait_for(main(), 30))
    assert scores and set(scores) == {1.0}
    assert pipeline.frames_out == 20


def test_a_crashed_stage_fails_the_pipeline_even_while_frames_keep_coming() -> None:
    """The capture delivers frames as fast as it can; frames read after the crash, before the
    capture has stopped, must not turn the failed pipeline back to running (the App would then
    see it stopped, not failed, and never recover it)."""

    def broken(frame: Frame) -> Frame:
        raise RuntimeError("model state corrupted")

    async def once() -> tuple[HealthState, str | None]:
        pipeline = StreamPipeline(
            "crash",
            PatternSource("crash", width=32, height=24, realtime=False),
            stages=[Stage(broken, workers=2, max_consecutive_errors=2)],
        )
        await pipeline.start()
        await asyncio.wait_for(pipeline.wait(), 10)
        return pipeline.state, pipeline.last_error

    for _ in range(20):
        state, error = asyncio.run(once())
        assert state is HealthState.FAILED
        assert error is not None and "stage 'broken' crashed: 2 frames failed in a row" in error


def test_a_cancelled_error_raised_by_a_processor_fails_that_frame_only() -> None:
    """A CancelledError a processor raises without its stage being cancelled (an awaited
    request cancelled elsewhere, a nested event loop's) is that frame's error, on the event
    loop and in a thread; the stream goes on and ends."""

    async def remote(frame: Frame) -> Frame:
        if frame.seq == 5:
            request = asyncio.get_running_loop().create_future()
            request.cancel()  # the client's connection dropped and cancelled it
            await request
        return frame

    def nested(frame: Frame) -> Frame:
        if frame.seq == 7:
            raise asyncio.CancelledError
        return frame

    pipeline = StreamPipeline(
        "cancelled",
        PatternSource("cam", count=12, realtime=False),
        stages=[Stage(remote), Stage(nested)],
    )
    events: Events = []
    pipeline.on_event(lambda kind, data: events.append((kind, data)))
    asyncio.run(asyncio.wait_for(pipeline.run(), 20))  # no hop died: the run ends
    errors = of(events, "processor.error")
    assert [(e["stage"], e["seq"]) for e in errors] == [("remote", 5), ("nested", 7)]
    assert all("CancelledError" in e["error"] for e in errors)
    assert pipeline.frames_out == 10
    assert pipeline.state is HealthState.STOPPED


def test_a_pipeline_task_cancelled_from_outside_fails_the_pipeline_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> Events:
        pipeline = StreamPipeline(
            "door", PatternSource("cam", fps=50), stages=[Stage(lambda f: f, name="model")]
        )
        events: Events = []
        pipeline.on_event(lambda kind, data: events.append((kind, data)))
        await pipeline.start()
        try:
            (hop,) = [t for t in asyncio.all_tasks() if t.get_name() == "door:model"]
            hop.cancel()  # e.g. a framework cancelling every task it finds
            await asyncio.wait_for(pipeline.wait(), 10)  # ends: nothing waits on the dead hop
        finally:
            await pipeline.stop()
        assert pipeline.state is HealthState.FAILED
        return events

    events = asyncio.run(main())
    failed = of(events, "pipeline.failed")
    assert len(failed) == 1
    assert "task door:model was cancelled" in failed[0]["error"]
    assert "pipeline task door:model was cancelled" in caplog.text


def test_stop_returns_when_a_processor_call_never_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck, release = threading.Event(), threading.Event()

    def model(frame: Frame) -> Frame:
        if frame.seq == 5:
            stuck.set()
            release.wait()  # a request without a timeout
        return frame

    async def main() -> float:
        pipeline = StreamPipeline(
            "door",
            PatternSource("cam", fps=50),
            stages=[Stage(model, name="model")],
            teardown_timeout=1.0,
        )
        await pipeline.start()
        assert await asyncio.to_thread(stuck.wait, 10)
        started = time.monotonic()
        await asyncio.wait_for(pipeline.stop(drain_timeout=0.5), 10)
        assert pipeline.state is HealthState.STOPPED
        assert not pipeline.running
        return time.monotonic() - started

    try:
        took = asyncio.run(main())
    finally:
        release.set()
    assert took < 4.0  # the drain's 0.5 s and the teardown's 1 s, not forever
    assert "stage 'model' did not tear down within 1s" in caplog.text


class SlowTeardown(Sink):
    """A sink whose teardown finalises its output for ``delay`` seconds (closing an MP4,
    uploading the last segment), and records what was called, in order."""

    def __init__(self, delay: float, slow_close: str | None = None) -> None:
        self.name = "writer"
        self.delay = delay
        self.slow_close = slow_close
        self.calls: list[str] = []
        self.closing = threading.Event()

    def write(self, frame: Frame) -> None:
        pass

    def segment_closed(self, segment: Any) -> None:
        self.calls.append(f"closing {segment.id}")
        if segment.id == self.slow_close:
            self.closing.set()
            time.sleep(1.0)  # uploading the segment takes a while
        self.calls.append(f"closed {segment.id}")

    def teardown(self) -> None:
        self.calls.append("teardown")
        time.sleep(self.delay)
        self.calls.append("finalised")


def test_a_finite_run_tears_its_sinks_down_to_the_end(caplog: pytest.LogCaptureFixture) -> None:
    """A run that ended on its own has no call left running: a sink's teardown longer than
    ``drain_timeout`` runs to its end before run() returns (it was abandoned on a daemon
    thread that died with the process)."""
    sink = SlowTeardown(delay=1.0)
    pipeline = StreamPipeline(
        "p", PatternSource("cam", count=20, realtime=False), sinks=[sink], drain_timeout=0.2
    )
    run_pipeline(pipeline)
    assert sink.calls == ["teardown", "finalised"]
    assert pipeline.state is HealthState.STOPPED
    assert "did not tear down" not in caplog.text


def slow_model(frame: Frame) -> Frame:
    time.sleep(0.05)  # 20 fps against a 50 fps camera: the queue is full when stop() comes
    return frame


@pytest.mark.parametrize(
    ("drain_timeout", "delay", "slow"),
    [
        (0.0, 0.0, False),  # no drain at all: the teardowns still run
        (0.3, 0.6, False),  # the drain completes: the teardown is not bounded
        (0.1, 0.6, True),  # the drain is cut short: bounded by teardown_timeout (10 s), not 0.1
    ],
)
def test_stop_tears_every_stage_down_whatever_the_drain_timeout(
    caplog: pytest.LogCaptureFixture, drain_timeout: float, delay: float, slow: bool
) -> None:
    torn: list[str] = []
    flowing = threading.Event()

    class Model(Processor):
        name = "model"

        def process(self, frame: Frame) -> Frame:
            if frame.seq >= 10:
                flowing.set()
            return slow_model(frame) if slow else frame

        def teardown(self) -> None:
            torn.append("model")

    sink = SlowTeardown(delay)

    async def main() -> None:
        pipeline = StreamPipeline(
            "p", PatternSource("cam", fps=50), stages=[Stage(Model())], sinks=[sink]
        )
        await pipeline.start()
        assert await asyncio.to_thread(flowing.wait, 10)
        await asyncio.wait_for(pipeline.stop(drain_timeout=drain_timeout), 10)
        assert torn == ["model"] and sink.calls == ["teardown", "finalised"]
        assert pipeline.state is HealthState.STOPPED and not pipeline.running
        await asyncio.wait_for(pipeline.wait(), 5)  # the run is over, even after a cut drain

    asyncio.run(main())
    assert "did not tear down" not in caplog.text


def test_a_sink_is_torn_down_after_its_segment_closed_returned() -> None:
    """A stop cuts the drain short while a sink's ``segment_closed`` runs (the hop's task is
    cancelled): the call still runs to its end, once, before the sink's teardown starts; the
    segment the stop cut reaches the sink after it."""
    sink = SlowTeardown(delay=0.0, slow_close="ORDER_1")

    async def main() -> Events:
        pipeline = StreamPipeline(
            "station",
            PatternSource("cam", fps=50),
            stages=[Stage(tagger({range(1, 6): "ORDER_1", range(6, 10_000): "ORDER_2"}))],
            segmenter=Segmenter("order", timeout=30),
            sinks=[sink],
        )
        events: Events = []
        pipeline.on_event(lambda kind, data: events.append((kind, data)))
        await pipeline.start()
        assert await asyncio.to_thread(sink.closing.wait, 10)
        await asyncio.wait_for(pipeline.stop(drain_timeout=0.1), 10)
        return events

    events = asyncio.run(main())
    assert sink.calls == [
        "closing ORDER_1",
        "closed ORDER_1",
        "closing ORDER_2",
        "closed ORDER_2",
        "teardown",
        "finalised",
    ]
    done = of(events, "segment.completed")
    assert [(d["segment_id"], d["reason"]) for d in done][:1] == [("ORDER_1", "key_changed")]
    # ORDER_2: closed by the stop (through the end of the stream it caused, or cut)
    assert [(d["segment_id"], d["reason"]) for d in done[1:]] == [("ORDER_2", "stopped")]


@pytest.mark.parametrize(
    ("sink_queue", "reason"),
    [
        (2, "stopped"),  # the segmenter still had frames and the end queued: the open segment
        (64, "stopped"),  # it had closed the segment at the end the stop caused; its marker
        # was still in the sink
    ],
)
def test_a_stop_that_cuts_the_drain_short_still_completes_the_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sink_queue: int, reason: str
) -> None:
    wrote = threading.Event()

    class SlowStore(FrameStore):
        def write(self, frame: Frame) -> None:
            super().write(frame)
            if len(self.list_frames("cam")) >= 3:
                wrote.set()
            time.sleep(0.1)  # a slow bucket: the camera makes frames faster

    store = SlowStore(LocalObjectStore(tmp_path), workers=1)

    async def main() -> Events:
        pipeline = StreamPipeline(
            "station",
            PatternSource("cam", fps=50),
            stages=[Stage(tagger({range(1, 10_000): "ORDER_1"}))],
            segmenter=Segmenter("order", timeout=30),
            sinks=[Stage(store, queue_size=sink_queue)],
        )
        events: Events = []
        pipeline.on_event(lambda kind, data: events.append((kind, data)))
        await pipeline.start()
        assert await asyncio.to_thread(wrote.wait, 10)
        await asyncio.wait_for(pipeline.stop(drain_timeout=0.3), 10)
        assert pipeline.state is HealthState.STOPPED
        assert pipeline.open_segment is None
        assert pipeline.frames_captured - pipeline.frames_out > 5  # the drain was cut short
        return events

    events = asyncio.run(main())
    done = of(events, "segment.completed")
    assert [(d["segment_id"], d["reason"]) for d in done] == [("ORDER_1", reason)]
    listed = {info.key for info in store.list_frames("cam", "ORDER_1")}
    stored = done[0]["stored"]
    assert len(stored) >= 3 and set(stored) <= listed  # what the store had written so far
    assert done[0]["frames"] >= len(stored)
    assert not of(events, "pipeline.failed")
    assert [k for k, _ in events][-1] == "pipeline.stopped"  # the segment came before it
    assert "captured frame(s) abandoned in the pipeline's queues" in caplog.text


STUBBORN_CAMERA = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # goes only when killed, after the grace
with open(sys.argv[2], "w") as f:
    f.write(str(os.getpid()))
jpeg = bytes.fromhex(sys.argv[1])
while True:
    sys.stdout.buffer.write(jpeg)
    sys.stdout.flush()
    time.sleep(0.04)
"""


def test_a_failed_pipeline_has_ended_its_capture_when_wait_returns(tmp_path: Path) -> None:
    """A stage fails the pipeline while its capture process runs (one that ignores SIGTERM):
    when ``wait()`` returns, the capture process is gone, so an app restarting the pipeline
    never runs two captures of one camera at once."""
    import os
    import sys

    from framepipe.frames import encode_jpeg
    from framepipe.sources import CommandSource

    class Crash(Processor):
        def process(self, frame: Frame) -> Frame:
            raise RuntimeError("model broke")

    jpeg = encode_jpeg(np.full((120, 160, 3), 90, np.uint8))
    pid_file = tmp_path / "pid"
    script = tmp_path / "camera.py"
    script.write_text(STUBBORN_CAMERA)
    source = CommandSource([sys.executable, str(script), jpeg.hex(), str(pid_file)], "cam")
    pipeline = StreamPipeline("cam", source, stages=[Stage(Crash(), max_consecutive_errors=3)])

    async def main() -> None:
        await pipeline.start()
        await asyncio.wait_for(pipeline.wait(), 60)

    asyncio.run(main())
    assert pipeline.state is HealthState.FAILED
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert status == "Z", f"the capture process {pid} still runs after wait() returned"


def test_a_stages_failures_are_logged_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    """Throttled per kind of failure: a stage failing every frame with one error logs it
    once (and a count at the end), and another kind of error of the same stage meanwhile is
    logged at once, not hidden in the count."""

    def flaky(frame: Frame) -> Frame:
        if frame.seq == 15:
            raise KeyError("a different bug")
        raise ConnectionError("the model server is down")

    caplog.set_level("WARNING")
    events = run_pipeline(
        StreamPipeline(
            "kinds",
            PatternSource("k", count=30, realtime=False),
            stages=[Stage(flaky, name="model", max_consecutive_errors=1000)],
        )
    )
    assert len(of(events, "processor.error")) == 30
    lines = [r.getMessage() for r in caplog.records if "'model'" in r.getMessage()]
    assert sum("the model server is down" in line for line in lines) == 1, lines
    assert sum("a different bug" in line for line in lines) == 1, lines
    assert any("28 more frame(s) failed with ConnectionError" in line for line in lines), lines


def test_a_pipeline_started_again_while_its_failed_run_tears_down_keeps_its_new_stages() -> None:
    """An app restarts a failed pipeline as soon as it sees it failed, while the failed run's
    sinks are still being torn down (an MP4 being closed): the new run waits for that teardown
    and keeps its own stages; each run's sink is set up and torn down once, in turn."""
    crash = {"on": True}

    def model(frame: Frame) -> Frame:
        if crash["on"]:
            raise RuntimeError("model state corrupted")
        return frame

    class Writer(SlowTeardown):
        def __init__(self) -> None:
            super().__init__(delay=0.5)
            self.written = 0

        def setup(self) -> None:
            self.calls.append("setup")

        def write(self, frame: Frame) -> None:
            self.written += 1

    writer = Writer()
    pipeline = StreamPipeline(
        "restart",
        PatternSource("restart", width=32, height=24, fps=100),
        stages=[Stage(model, max_consecutive_errors=2)],
        sinks=[writer],
    )

    async def main() -> None:
        await pipeline.start()
        waiter = asyncio.create_task(pipeline.wait())
        await wait_until_async("the failed run tearing down", lambda: "teardown" in writer.calls)
        crash["on"] = False
        await pipeline.start()
        await asyncio.wait_for(waiter, 30)
        assert writer.calls[:3] == ["setup", "teardown", "finalised"]
        written = writer.written
        await wait_until_async("frames of the new run", lambda: writer.written > written + 5)
        assert pipeline.running and pipeline.state is HealthState.RUNNING
        await pipeline.stop()

    asyncio.run(main())
    assert writer.calls == ["setup", "teardown", "finalised", "setup", "teardown", "finalised"]


@pytest.mark.parametrize("cost", [0.0, 0.002], ids=["cheap", "costly"])
def test_an_ordered_stage_holds_a_bounded_window_while_the_next_stage_is_slow(cost: float) -> None:
    """An ordered stage with 2 workers in front of a slow stage: while it waits for room
    downstream, its other worker takes no frame past a bounded window, so back-pressure
    reaches the capture instead of the frames piling up in the stage's memory. Every frame
    still arrives, in order."""
    held: list[int] = []
    seen: list[int] = []

    def tag(frame: Frame) -> Frame:
        if cost:
            time.sleep(cost)
        return frame

    def slow(frame: Frame) -> Frame:
        first = pipeline.stats[0]
        held.append(first.frames_in - first.frames_out)
        seen.append(frame.seq)
        time.sleep(0.01)
        return frame

    pipeline = StreamPipeline(
        "window",
        PatternSource("window", width=32, height=24, count=250, realtime=False),
        stages=[Stage(tag, workers=2, ordered=True), Stage(slow)],
    )
    run_pipeline(pipeline)
    assert seen == sorted(seen) and len(seen) == 250
    window = 2 * 2 * (16 if cost == 0.0 else 1)  # two (batches) per worker
    assert max(held) <= window + 2 * 16, max(held)


def test_a_sink_whose_segment_closed_raises_fails_that_segment_only() -> None:
    """A sink's ``segment_closed`` raising for order A is a ``processor.error`` of that sink
    naming A; A still completes, and so does B after it: the pipeline goes on."""

    class Uploader(Collect):
        def segment_closed(self, segment: Any) -> None:
            if segment.id == "A":
                raise ConnectionError("the archive refused the order")
            super().segment_closed(segment)

    uploader = Uploader()
    events = run_pipeline(
        StreamPipeline(
            "s",
            PatternSource("s", count=40, realtime=False),
            stages=[Stage(tagger({range(1, 21): "A", range(21, 41): "B"}))],
            segmenter=Segmenter("order", timeout=5),
            sinks=[uploader],
        )
    )
    assert not of(events, "pipeline.failed")
    assert [d["segment_id"] for d in of(events, "segment.completed")] == ["A", "B"]
    [error] = of(events, "processor.error")
    assert error["stage"] == "collect" and error["seq"] is None
    assert "segment_closed(A) failed: ConnectionError: the archive refused" in error["error"]
    assert uploader.closed == ["B"] and len(uploader.frames) == 40


def test_a_segment_closed_that_raises_at_a_stop_is_a_processor_error_too() -> None:
    """The order still open when a stop cuts the drain short is closed by the stop itself;
    its sink's ``segment_closed`` raising then is the same ``processor.error`` as while
    running."""

    class Uploader(Collect):
        def write(self, frame: Frame) -> None:
            time.sleep(0.01)  # behind the camera: frames wait when the stop comes

        def segment_closed(self, segment: Any) -> None:
            raise ConnectionError("the archive refused the order")

    events: Events = []
    pipeline = StreamPipeline(
        "s",
        PatternSource("s", fps=50),
        stages=[Stage(tagger({range(1, 100_000): "A"}))],
        segmenter=Segmenter("order", timeout=60),
        sinks=[Uploader()],
    )
    pipeline.on_event(lambda kind, data: events.append((kind, data)))

    async def main() -> None:
        await pipeline.start()
        await wait_until_async("A open", lambda: of(events, "segment.started"))
        await asyncio.sleep(0.3)
        await pipeline.stop(drain_timeout=0)  # the stop cuts the drain: it closes A itself

    asyncio.run(main())
    assert [d["segment_id"] for d in of(events, "segment.completed")] == ["A"]
    [error] = of(events, "processor.error")
    assert "segment_closed(A) failed: ConnectionError" in error["error"]


def test_a_stop_whose_drain_completes_abandons_no_frame(caplog: pytest.LogCaptureFixture) -> None:
    """A stop that catches the capture waiting for room in a full first queue: that frame
    never entered the pipeline, the queued ones drain, and nothing is said abandoned (it
    was: one frame, "not drained within" a drain that had completed)."""
    kept = Collect()

    async def main() -> StreamPipeline:
        pipeline = StreamPipeline(
            "station",
            PatternSource("cam", fps=200),
            stages=[Stage(slow_model, queue_size=2)],
            sinks=[kept],
        )
        await pipeline.start()
        await wait_until_async("the first queue to fill", lambda: len(kept.frames) >= 5)
        await asyncio.wait_for(pipeline.stop(drain_timeout=30), 60)
        return pipeline

    caplog.set_level("WARNING")
    pipeline = asyncio.run(main())
    assert pipeline.state is HealthState.STOPPED
    assert pipeline.frames_captured > pipeline.frames_out  # the frame the stop caught waiting
    assert pipeline.frames_out == len(kept.frames)
    assert "abandoned" not in caplog.text
