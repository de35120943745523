"""Segment ids across runs: an id whose frames an earlier run (a restarted service, a station
stopped and started again) left in the frame store is not issued again, so a run never adds
its frames to another run's segment. Real pipelines on a local object store, and on a spool
whose object store is away."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from framepipe import LocalObjectStore, ObjectInfo
from framepipe.frames import Frame
from framepipe.sources import PatternSource, Source
from framepipe.sources.base import StartedCallback
from framepipe.stream import FrameStore, Segmenter, Stage, StreamPipeline, segment_flow
from framepipe.stream.segment import SegmentIds
from framepipe.stream.sinks import Sink

TEMPLATE = "frames/{station_id}/{segment_id}/frame_{ts_ms}_{seq}.jpg"


def run_orders(store: Sink, keys: list[str], per_order: int = 4) -> list[dict[str, Any]]:
    """One run of a station whose frames carry ``keys[i]`` in blocks of ``per_order``: the
    data of its completed segments."""

    def tag(frame: Frame) -> Frame:
        frame.meta["order"] = keys[(frame.seq - 1) // per_order]
        frame.meta["station_id"] = "station_1"
        return frame

    pipeline = StreamPipeline(
        "station_1",
        PatternSource("station_1", count=per_order * len(keys), realtime=False),
        stages=[Stage(tag)],
        segmenter=Segmenter("order", timeout=30),
        sinks=[store],
    )
    done: list[dict[str, Any]] = []
    pipeline.on_event(lambda kind, data: done.append(data) if kind == "segment.completed" else None)
    asyncio.run(asyncio.wait_for(pipeline.run(), 60))
    return done


def folder_of(store: LocalObjectStore, segment_id: str) -> list[str]:
    return [info.key for info in store.list(f"frames/station_1/{segment_id}/")]


def test_a_restarted_station_does_not_add_frames_to_an_order_of_an_earlier_run(
    tmp_path: Path,
) -> None:
    """Run 1 stores ORDER_1 and ORDER_2; run 2 (the service restarted) sees ORDER_1 again and
    then ORDER_3: its ORDER_1 is ``ORDER_1.2``, and every order's folder holds exactly the
    frames its ``order.completed`` lists."""
    objects = LocalObjectStore(tmp_path / "objects", durable=False)
    first = run_orders(FrameStore(objects, template=TEMPLATE, workers=1), ["ORDER_1", "ORDER_2"])
    second = run_orders(FrameStore(objects, template=TEMPLATE, workers=1), ["ORDER_1", "ORDER_3"])
    assert [d["segment_id"] for d in first] == ["ORDER_1", "ORDER_2"]
    assert [d["segment_id"] for d in second] == ["ORDER_1.2", "ORDER_3"]
    for data in [*first, *second]:
        assert folder_of(objects, data["segment_id"]) == sorted(data["stored"])
        assert len(data["stored"]) == 4


def test_a_third_run_skips_every_id_the_earlier_runs_used(tmp_path: Path) -> None:
    objects = LocalObjectStore(tmp_path / "objects", durable=False)
    for _ in range(3):
        done = run_orders(FrameStore(objects, template=TEMPLATE, workers=1), ["A", "B", "A"])
    assert [d["segment_id"] for d in done] == ["A.5", "B.3", "A.6"]
    assert len(folder_of(objects, "A")) == 4


def test_frames_kept_in_the_spool_count_as_stored(tmp_path: Path) -> None:
    """The object store was away in run 1 (its frames are in the spool, not uploaded yet):
    run 2 still does not reuse the id."""
    objects = LocalObjectStore(tmp_path / "objects", durable=False)
    spool = LocalObjectStore(tmp_path / "spool", durable=False)
    objects.close()  # every put is refused: the frames go to the spool
    away = FrameStore(objects, template=TEMPLATE, workers=1, spool=spool, spool_retry=3600)
    first = run_orders(away, ["ORDER_1"])
    assert len(first[0]["spooled"]) == 4
    back = LocalObjectStore(tmp_path / "objects", durable=False)
    store = FrameStore(back, template=TEMPLATE, workers=1)
    assert store.segment_taken(_probe(), "ORDER_1") is False  # this store has no spool
    again = FrameStore(back, template=TEMPLATE, workers=1, spool=spool, spool_retry=3600)
    assert again.segment_taken(_probe(), "ORDER_1") is True


def _probe() -> Frame:
    return Frame(np.zeros((1, 1, 3), np.uint8), "station_1", 1, 1, meta={"station_id": "station_1"})


def test_ids_checked_once_each() -> None:
    """The rule the segmenter applies: an id found taken counts as issued; one found free is
    issued as usual; neither is asked about again."""
    ids = SegmentIds()
    assert ids.unchecked("A") == "A"
    ids.checked("A", taken=True)
    assert ids.unchecked("A") == "A.2"
    ids.checked("A.2", taken=False)
    assert ids.unchecked("A") is None
    assert ids.issue("A") == "A.2"
    assert ids.unchecked("A") == "A.3"


def test_a_store_that_cannot_answer_is_said_once_and_holds_no_order_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The object store refuses every call (the spool takes the frames): each order still
    opens under its key and completes with its frames, and one warning says the ids could not
    be checked."""
    objects = LocalObjectStore(tmp_path / "objects", durable=False)
    objects.close()
    spool = LocalObjectStore(tmp_path / "spool", durable=False)
    store = FrameStore(objects, template=TEMPLATE, workers=1, spool=spool, spool_retry=3600)
    with caplog.at_level(logging.WARNING):
        done = run_orders(store, ["A", "B", "C"])
    assert [d["segment_id"] for d in done] == ["A", "B", "C"]
    assert [len(d["spooled"]) for d in done] == [4, 4, 4]
    unsure = [r for r in caplog.records if "cannot tell whether an earlier run" in r.message]
    assert len(unsure) == 1
    assert "segment id A " in unsure[0].message and "is closed" in unsure[0].message


class _FrozenStore(Sink):
    """A sink whose store does not answer the question about ids (a frozen S3 before any
    frame found it down): ``segment_taken`` waits until ``thaw`` is set; frames are written
    at once."""

    def __init__(self) -> None:
        self.thaw = threading.Event()
        self.asked: list[str] = []

    def write(self, frame: Frame) -> None:
        pass

    def segment_taken(self, frame: Frame, segment_id: str) -> bool:
        self.asked.append(segment_id)
        self.thaw.wait(120)
        return False


def test_a_store_that_does_not_answer_is_waited_for_once_not_at_every_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the question about one id is unanswered, the ids of the next orders are used
    without asking (and without waiting): the station's frames are held back once per
    outage, not at every new order, and a single thread is kept waiting on the store."""
    store = _FrozenStore()
    try:
        with caplog.at_level(logging.WARNING):
            done = run_orders(store, ["A", "B", "C", "D", "E"])
    finally:
        store.thaw.set()
    assert [d["segment_id"] for d in done] == ["A", "B", "C", "D", "E"]
    assert store.asked == ["A"]
    unsure = [r for r in caplog.records if "cannot tell whether an earlier run" in r.message]
    assert len(unsure) == 1 and "segment id A " in unsure[0].message


class _SlowStore(LocalObjectStore):
    """A local object store whose listing of the ``gated`` segment's folder (the question
    whether an earlier run stored that id) answers only once ``answer`` is set."""

    def __init__(self, root: Path, gated: str) -> None:
        super().__init__(root, durable=False)
        self.gated = f"/{gated}/"
        self.asked = threading.Event()
        self.answer = threading.Event()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if prefix.endswith(self.gated):
            self.asked.set()
            self.answer.wait(60)
        return super().list(prefix)


class _ReopeningOrder(Source):
    """ORDER_1 (``pts`` 0, 0.1, ...) until ``store`` is asked about ``ORDER_1.2``, then
    ``pause()``, then three ORDER_1 frames ``gap`` stream-seconds later; the store answers
    half a second after the first of those."""

    live = False

    def __init__(
        self, store: _SlowStore, pause: Callable[[], Awaitable[None]], gap: float = 0.0
    ) -> None:
        super().__init__("station_1")
        self.store = store
        self.pause = pause
        self.gap = gap

    def _frame(self, pts: float) -> Frame:
        meta = {"order": "ORDER_1", "station_id": "station_1"}
        image = np.zeros((8, 8, 3), np.uint8)
        return Frame(image, "station_1", self.next_seq(), pts=pts, meta=meta)

    async def frames(self, started: StartedCallback | None = None) -> AsyncGenerator[Frame, None]:
        if started is not None:
            started(None)
        pts = 0.0
        while not self.store.asked.is_set():
            yield self._frame(pts)
            pts += 0.1
            await asyncio.sleep(0.05)
        await self.pause()
        for i in range(3):
            yield self._frame(pts + self.gap + i * 0.1)
        threading.Timer(0.5, self.store.answer.set).start()


def _earlier_run_left_order_1_2(root: Path) -> list[str]:
    """An earlier run stored ORDER_1, X and ORDER_1.2; retention removed ORDER_1. The keys of
    ORDER_1.2's frames."""
    objects = LocalObjectStore(root, durable=False)
    store = FrameStore(objects, template=TEMPLATE, workers=1)
    first = run_orders(store, ["ORDER_1", "X", "ORDER_1"])
    assert [d["segment_id"] for d in first] == ["ORDER_1", "X", "ORDER_1.2"]
    objects.delete_many(folder_of(objects, "ORDER_1"))
    return folder_of(objects, "ORDER_1.2")


def _run_reopening(
    slow: _SlowStore, source: _ReopeningOrder, segmenter: Segmenter, closed: threading.Event
) -> list[dict[str, Any]]:
    pipeline = StreamPipeline(
        "station_1", source, segmenter=segmenter, sinks=[FrameStore(slow, template=TEMPLATE)]
    )
    done: list[dict[str, Any]] = []

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "segment.completed":
            done.append(data)
            closed.set()

    pipeline.on_event(on_event)
    try:
        asyncio.run(asyncio.wait_for(pipeline.run(), 60))
    finally:
        slow.answer.set()
    return done


def test_an_order_reopened_before_the_store_answered_about_its_next_id_waits_for_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This run opens ORDER_1 and asks the store in the background whether ORDER_1.2 (an
    earlier run's) is taken; the store is slow to answer (longer than the wait allowed for an
    answer, counted from the question), and ORDER_1 times out and reopens meanwhile: the
    reopened order waits for the answer and is ORDER_1.3, so its frames do not land among the
    earlier run's ORDER_1.2."""
    earlier = _earlier_run_left_order_1_2(tmp_path / "objects")
    monkeypatch.setattr(segment_flow, "TAKEN_TIMEOUT", 0.2)  # the question goes stale soon
    slow = _SlowStore(tmp_path / "objects", gated="ORDER_1.2")
    closed = threading.Event()

    async def until_closed() -> None:
        assert await asyncio.to_thread(closed.wait, 30), "ORDER_1 never timed out"
        monkeypatch.setattr(segment_flow, "TAKEN_TIMEOUT", 60.0)

    source = _ReopeningOrder(slow, until_closed)
    done = _run_reopening(slow, source, Segmenter("order", timeout=0.3), closed)
    assert [d["segment_id"] for d in done] == ["ORDER_1", "ORDER_1.3"]
    assert done[1]["reason"] == "end" and len(done[1]["stored"]) == 3
    assert folder_of(slow, "ORDER_1.2") == earlier
    assert folder_of(slow, "ORDER_1.3") == sorted(done[1]["stored"])


def test_a_frame_that_times_out_its_order_and_reopens_it_waits_for_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stream time: an ORDER_1 frame that comes ``timeout`` stream-seconds after the last one
    closes ORDER_1 and opens it again, while the store has not answered whether ORDER_1.2
    (an earlier run's) is taken: that frame waits for the answer, and the order is
    ORDER_1.3."""
    earlier = _earlier_run_left_order_1_2(tmp_path / "objects")
    monkeypatch.setattr(segment_flow, "TAKEN_TIMEOUT", 60.0)
    slow = _SlowStore(tmp_path / "objects", gated="ORDER_1.2")

    async def nothing() -> None:
        pass

    source = _ReopeningOrder(slow, nothing, gap=5.0)
    segmenter = Segmenter("order", timeout=1.0, clock="stream")
    done = _run_reopening(slow, source, segmenter, threading.Event())
    assert [(d["segment_id"], d["reason"]) for d in done] == [
        ("ORDER_1", "timeout"),
        ("ORDER_1.3", "end"),
    ]
    assert folder_of(slow, "ORDER_1.2") == earlier
    assert folder_of(slow, "ORDER_1.3") == sorted(done[1]["stored"])
