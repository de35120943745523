"""What a live pipeline's log says of a stage's failed frames: each line already carries the
pipeline's name (the logger's component), so the message does not name it again. A real
pipeline whose frame store refuses every frame (a local object store closed under it)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from framepipe import LocalObjectStore
from framepipe.frames import Frame
from framepipe.sources import PatternSource
from framepipe.stream import FrameStore, Segmenter, Stage, StreamPipeline


def test_a_failed_frame_is_logged_with_the_station_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def tag(frame: Frame) -> Frame:
        frame.meta["order"] = "ORDER_1"
        return frame

    objects = LocalObjectStore(tmp_path / "objects", durable=False)
    objects.close()  # every frame refused
    pipeline = StreamPipeline(
        "station_1",
        PatternSource("station_1", count=5, realtime=False),
        stages=[Stage(tag)],
        segmenter=Segmenter("order", timeout=30),
        sinks=[FrameStore(objects, workers=1)],
    )
    with caplog.at_level(logging.WARNING):
        asyncio.run(asyncio.wait_for(pipeline.run(), 60))
    failed = [
        r
        for r in caplog.records
        if getattr(r, "component", None) == "station_1" and "frame_store" in r.getMessage()
    ]
    assert failed, [r.getMessage() for r in caplog.records]
    first = failed[0].getMessage()
    assert first.startswith("stage 'frame_store', frame 1: ObjectStoreError: "), first
    assert "[station_1]" not in first
