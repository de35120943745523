"""Segment ids: unique per source for a pipeline's run, whatever the keys look like, so the
frames a FrameStore keeps of two segments never mix. Real pipelines (PatternSource, stages,
segmenter, FrameStore on a local object store) and the segmenter's own state."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from framepipe import LocalObjectStore
from framepipe.frames import Frame
from framepipe.sources import PatternSource
from framepipe.stream import FrameStore, Segmenter, Stage, StreamPipeline
from framepipe.stream.segment import SegmentIds


def run_orders(tmp_path: Path, keys: list[str], per_order: int = 5) -> tuple[list[Any], FrameStore]:
    """A pipeline whose frames carry ``keys[i]`` in blocks of ``per_order``; its completed
    segments' data and its frame store."""

    def tag(frame: Frame) -> Frame:
        frame.meta["order"] = keys[(frame.seq - 1) // per_order]
        return frame

    store = FrameStore(LocalObjectStore(tmp_path / "objects", durable=False), workers=1)
    pipeline = StreamPipeline(
        "station",
        PatternSource("cam", count=per_order * len(keys), realtime=False),
        stages=[Stage(tag)],
        segmenter=Segmenter("order", timeout=30),
        sinks=[store],
    )
    done: list[Any] = []
    pipeline.on_event(lambda kind, data: done.append(data) if kind == "segment.completed" else None)
    asyncio.run(asyncio.wait_for(pipeline.run(), 60))
    return done, store


def test_a_key_that_looks_like_a_repeat_gets_an_id_of_its_own(tmp_path: Path) -> None:
    """A, B, A again (``A.2``), then an order whose tag is literally ``A.2`` (twice): every
    segment has an id of its own, and each id reads back its own five frames only."""
    keys = ["A", "B", "A", "A.2", "B", "A.2", "A"]
    done, store = run_orders(tmp_path, keys)
    ids = [d["segment_id"] for d in done]
    assert ids == ["A", "B", "A.2", "A.2.2", "B.2", "A.2.3", "A.3"]
    assert [d["key"] for d in done] == keys
    for index, data in enumerate(done):
        seqs = [f.seq for f in store.read_frames("cam", data["segment_id"])]
        assert seqs == list(range(5 * index + 1, 5 * index + 6)), data["segment_id"]
        assert len(data["stored"]) == 5


_PIXEL = np.zeros((1, 1, 3), np.uint8)


def _frame(seq: int, key: str | None, ts_ms: int | None = None, pts: float | None = None) -> Frame:
    meta = {"order": key}
    return Frame(_PIXEL, "cam", seq, seq if ts_ms is None else ts_ms, pts=pts, meta=meta)


def test_ids_stay_unique_past_any_number_of_keys() -> None:
    """A key seen again after 20,000 other keys still gets a new id (a bounded memory of keys
    used to forget it and give its first id again)."""
    state = Segmenter("order", timeout=30).state()
    ids: list[str] = []
    keys = ["A", *(f"K{i}" for i in range(20_000)), "A"]
    for seq, key in enumerate(keys, 1):
        _closed, segment = state.feed(_frame(seq, key))
        assert segment is not None
        if not ids or ids[-1] != segment.id:
            ids.append(segment.id)
    assert ids[0] == "A" and ids[-1] == "A.2"
    assert len(set(ids)) == len(ids) == len(keys)


def test_a_key_ending_in_digits_keeps_its_own_id_on_its_first_segment(tmp_path: Path) -> None:
    """Common keys that end in ``.<digits>`` (an address, a version) are their own id on their
    first segment, as every key is: stored paths and event ids do not change with the key's
    shape. A tag that is another key's repeat id, read first, keeps it too; that key's repeat
    takes the next free number."""
    keys = ["10.0.0.1", "v1.2", "ORDER_1", "10.0.0.1", "A.2", "A", "B", "A"]
    done, store = run_orders(tmp_path, keys)
    ids = [d["segment_id"] for d in done]
    assert ids == ["10.0.0.1", "v1.2", "ORDER_1", "10.0.0.1.2", "A.2", "A", "B", "A.3"]
    for data in done:
        listed = store.list_frames("cam", data["segment_id"])
        assert [info.key.split("/")[2] for info in listed] == [data["segment_id"]] * 5


def test_ids_are_unique_for_any_sequence_of_hostile_keys() -> None:
    """Keys built from ``A``, ``.``, digits: every segment's id differs from all before, and
    follows the rule: the key when no segment had it yet, else ``<key>.<n>`` with the
    smallest ``n >= 2`` not issued yet."""
    rng = random.Random(7)
    pieces = ["A", ".", "1", "2", "0", ".2", ".1", ".02", "B"]
    pool = sorted(
        {"".join(rng.choice(pieces) for _ in range(rng.randint(1, 4))) for _ in range(60)}
    )
    state = Segmenter("order", timeout=30).state()
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    previous: str | None = None
    for seq in range(1, 3001):
        key = rng.choice(pool)
        if key == previous:
            continue
        previous = key
        _closed, segment = state.feed(_frame(seq, key))
        assert segment is not None
        counts[key] += 1
        n = 2
        while f"{key}.{n}" in seen:
            n += 1
        assert segment.id == (key if key not in seen else f"{key}.{n}"), (key, segment.id)
        assert segment.id not in seen, (key, counts[key], segment.id)
        seen.add(segment.id)
    assert len(seen) > 1000
    assert all(f"{key}.2" in seen for key, count in counts.items() if count > 1)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["ORDER_1", "ORDER_1", "ORDER_1"], ["ORDER_1", "ORDER_1.2", "ORDER_1.3"]),
        (["A.2", "A.2"], ["A.2", "A.2.2"]),
        (["A", "A", "A.2"], ["A", "A.2", "A.2.2"]),
        (["A.2", "A", "A", "A"], ["A.2", "A", "A.3", "A.4"]),
        (["A", "A.3", "A", "A", "A"], ["A", "A.3", "A.2", "A.4", "A.5"]),
        (["v1.", "shop.example", "A.٢"], ["v1.", "shop.example", "A.٢"]),
    ],
)
def test_segment_ids_rule(keys: list[str], expected: list[str]) -> None:
    ids = SegmentIds()
    assert [ids.issue(key) for key in keys] == expected
    assert all(i in ids for i in expected) and "A.9" not in ids


def test_keyless_ids_never_repeat_when_the_clock_does_not_move() -> None:
    """Without a key, ids are ``<source>-<ms>``; two segments opened in one millisecond (or
    after the clock stepped back) still get distinct ids."""
    state = Segmenter(timeout=30, max_duration=0.001, clock="stream").state()
    ids = []
    for seq, (ts_ms, pts) in enumerate([(100, 0.0), (100, 0.01), (90, 0.02), (101, 0.03)], 1):
        _closed, segment = state.feed(_frame(seq, None, ts_ms, pts))
        assert segment is not None
        ids.append(segment.id)
    assert ids == ["cam-100", "cam-101", "cam-102", "cam-103"]
