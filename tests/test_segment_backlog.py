"""A wall-clock segment after a backlog: frames that reach the segmenter in a burst (the
pipeline held back by a store that hung, then catching up) are grouped by the time between
their captures, as they would have been live: an order takes the frames of its timeout after
its tag, not every frame until the next tag. A step of the system clock among them (NTP)
neither closes an order early nor holds it open."""

from __future__ import annotations

import numpy as np

from framepipe.frames import Frame
from framepipe.stream.segment import Segmenter

_PIXEL = np.zeros((1, 1, 3), np.uint8)


def burst(tags: list[str | None], *, start_ms: int = 1_000_000, every_ms: int = 100) -> list[Frame]:
    """Frames captured ``every_ms`` apart carrying ``tags`` (None: no tag in view)."""
    return [
        Frame(_PIXEL, "station_1", seq, start_ms + (seq - 1) * every_ms, meta={"order": tag})
        for seq, tag in enumerate(tags, 1)
    ]


def groups(frames: list[Frame], timeout: float) -> list[tuple[str, int, str]]:
    """(segment id, frames, reason) of each segment the frames make, fed all at once."""
    state = Segmenter("order", timeout=timeout).state()
    closed = []
    for frame in frames:
        done, _joined = state.feed(frame)
        closed += done
    closed += state.close_all("end")
    return [(s.id, s.frames, s.reason or "") for s in closed]


def test_a_burst_after_a_backlog_closes_an_order_on_its_capture_time() -> None:
    """ORDER_1 in view for 3 s, an empty counter for 5 s, then ORDER_2, captured at 10 fps and
    delivered at once: ORDER_1 takes the frames captured within the 2 s of its timeout after
    its last tag (19: the 20th is captured 2 s after it and closes it), the rest of the empty
    counter is no order's."""
    tags: list[str | None] = ["ORDER_1"] * 30 + [None] * 50 + ["ORDER_2"] * 30
    assert groups(burst(tags), timeout=2.0) == [
        ("ORDER_1", 49, "timeout"),
        ("ORDER_2", 30, "end"),
    ]


def test_a_tag_hidden_for_longer_than_the_timeout_in_a_burst_opens_a_repeat() -> None:
    tags: list[str | None] = ["A"] * 10 + [None] * 40 + ["A"] * 10
    assert groups(burst(tags), timeout=2.0) == [("A", 29, "timeout"), ("A.2", 10, "end")]


def test_a_clock_step_among_the_frames_neither_closes_nor_holds_an_order() -> None:
    """An hour forward between two untagged frames counts as two frames' interval (0.2 s); an
    hour back counts as none: A still takes about its 2 s of frames after its last tag."""
    forward = burst(["A"] * 10 + [None] * 10)
    later = burst([None] * 30, start_ms=forward[-1].ts_ms + 3_600_000)
    assert groups(forward + later, timeout=2.0) == [("A", 28, "timeout")]
    back = burst([None] * 30, start_ms=forward[-1].ts_ms - 3_600_000)
    assert groups(forward + back, timeout=2.0) == [("A", 30, "timeout")]


def test_frames_of_a_keeping_up_pipeline_are_grouped_as_before() -> None:
    """Frames that come as they are captured: the capture time agrees with the arrival."""
    tags: list[str | None] = ["A"] * 5 + [None] * 5 + ["A"] * 5
    assert groups(burst(tags), timeout=2.0) == [("A", 15, "end")]
