"""FrameStore keys from hostile segment keys (QR tags are whatever a customer prints): every
field is escaped, so each segment's frames are stored, apart from every other segment's, under
valid keys, and read back by the segment's id. Real pipelines on a local object store and on a
real S3 server (moto's, on loopback)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from framepipe import LocalObjectStore
from framepipe.backends.objects import ObjectStore, S3ObjectStore, validate_key
from framepipe.frames import Frame
from framepipe.sources import PatternSource
from framepipe.stream import FrameStore, Segmenter, Stage, StreamPipeline
from framepipe.stream.sinks import MAX_FIELD_BYTES, escape_key_field, unescape_key_field
from s3server import REGION, S3Server

HOSTILE = [
    "https://shop.example/o/17",
    "T1",
    "T1/extra",
    "..",
    ".",
    ".tmp-1234",
    "%2F",
    "a%2Fb",
    "a/b",
    "nul\x00tag",
    "tab\tand\nnewline\x7f\x85",
    "lone\udc80surrogate",
    "\ud83d\ude00 pair of surrogates",
    "back\\slash",
    "C:",
    "c:/windows",
    "émoji 🍔 order",
    "/leading",
    "trailing/",
    "x" * 2000,
    "y" * 2000,
    "🍔" * 300,
]


@pytest.mark.parametrize("text", [*HOSTILE, "", "ORDER_1", "shop.example", "A.2", "%~abc"])
def test_escaping_round_trips_and_gives_one_plain_segment(text: str) -> None:
    field = escape_key_field(text)
    assert "/" not in field and field not in (".", "..") and not field.startswith(".")
    assert len(field.encode("utf-8")) <= MAX_FIELD_BYTES
    if text:
        validate_key(f"frames/{field}/frame_1_1.jpg")
        validate_key(field)  # even first in a key: no drive prefix, no leading '/'
    shortened = len(text.encode("utf-8", "surrogatepass")) > MAX_FIELD_BYTES
    if shortened:
        assert "%~" in field
    else:
        assert unescape_key_field(field) == text
    plain = text.replace("_", "").replace(".", "")
    if not shortened and text.isascii() and plain.isalnum() and text[:1] != ".":
        assert field == text  # a plain id is its own escape


def test_escaping_is_one_to_one_and_refuses_what_it_does_not_make() -> None:
    fields = [escape_key_field(t) for t in HOSTILE]
    assert len(set(fields)) == len(HOSTILE)
    assert escape_key_field("%2F") == "%252F" != escape_key_field("/") == "%2F"
    long = escape_key_field("x" * 2000)
    assert "%~" in long and long.startswith("x" * 50)
    with pytest.raises(ValueError, match="shortened"):
        unescape_key_field(long)
    for foreign in ("a/b", "%2f", "%41", "%zz", ".hidden", "%"):
        with pytest.raises(ValueError, match="not an escaped key field"):
            unescape_key_field(foreign)


@pytest.fixture
def bucket(s3_server: S3Server, aws_env: None) -> Iterator[str]:
    name = s3_server.new_bucket()
    yield name
    s3_server.drop_bucket(name)


@pytest.fixture(params=["local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects", durable=False)
        return
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("bucket")
    with S3ObjectStore(bucket, endpoint_url=server.endpoint, region=REGION) as store:
        yield store


def run_orders(
    store: FrameStore, keys: list[str], per_order: int = 3
) -> tuple[list[dict[str, Any]], list[str]]:
    """A pipeline whose frames carry ``keys[i]`` in blocks of ``per_order``, into ``store``:
    its completed segments' data and its processor errors."""

    def tag(frame: Frame) -> Frame:
        frame.meta["order"] = keys[(frame.seq - 1) // per_order]
        frame.meta["score"] = frame.seq % per_order
        return frame

    pipeline = StreamPipeline(
        "station",
        PatternSource("cam", count=per_order * len(keys), width=64, height=48, realtime=False),
        stages=[Stage(tag)],
        segmenter=Segmenter("order", timeout=30),
        sinks=[store],
    )
    events: list[tuple[str, dict[str, Any]]] = []
    pipeline.on_event(lambda kind, data: events.append((kind, data)))
    asyncio.run(asyncio.wait_for(pipeline.run(), 120))
    done = [d for k, d in events if k == "segment.completed"]
    errors = [str(d["error"]) for k, d in events if k == "processor.error"]
    return done, errors


def test_hostile_segment_keys_are_stored_apart_and_read_back(objects: ObjectStore) -> None:
    store = FrameStore(objects, workers=2, select_best=1)
    done, errors = run_orders(store, HOSTILE)
    assert errors == []
    assert [d["segment_id"] for d in done] == HOSTILE  # each tag seen once: its own id
    every: set[str] = set()
    for index, data in enumerate(done):
        segment = data["segment_id"]
        assert len(data["stored"]) == 3, segment  # before: 0 for a URL, all writes refused
        expected = [3 * index + 1, 3 * index + 2, 3 * index + 3]
        back = list(store.read_frames("cam", segment))
        assert [f.seq for f in back] == expected, segment  # before: T1 read T1/extra's too
        assert all(f.segment_id == segment for f in back)
        listed = [info.key for info in store.list_frames("cam", segment)]
        assert listed == data["stored"]
        assert len(data["selected"]) == 1 and objects.exists(data["selected"][0])
        every.update(listed)
    assert len(every) == 3 * len(HOSTILE)
    assert {info.key for info in store.list_frames("cam")} == every
    # the stored layout: one folder per segment, named by its escaped id
    folders = {key.split("/")[2] for key in every}
    assert folders == {escape_key_field(k) for k in HOSTILE}
    assert "https%3A%2F%2Fshop.example%2Fo%2F17" in folders and "T1%2Fextra" in folders


def test_every_template_field_is_escaped_after_formatting(tmp_path: Path) -> None:
    """Format specs still apply (``{seq:06d}``), then the text is escaped: a source id, a
    meta field and a segment id with ``/`` or ``:`` stay one segment each."""
    objects = LocalObjectStore(tmp_path / "objects", durable=False)
    store = FrameStore(objects, template="{source_id}/{order}/{segment_id}/{seq:06d}.jpg")
    image = np.full((48, 64, 3), 90, np.uint8)
    frame = Frame(image, "C:/cam", 7, 1000, segment_id="../up", meta={"order": "a/b"})
    key = store.key_for(frame)
    assert key == "C%3A%2Fcam/a%2Fb/%2E.%2Fup/000007.jpg"
    store.write(frame)
    assert objects.exists(validate_key(key))


def test_frames_stored_by_earlier_versions_under_raw_ids_are_read_back(tmp_path: Path) -> None:
    """Earlier versions put the ids in keys as they were (``door:1``, ``50%``: valid keys).
    Their frames are still listed and read, merged with those stored since (escaped), each
    once; a raw folder that is another id's escape (``a%2Fb`` holds ``a/b``'s frames now) is
    not taken for this id's, and a raw id that was never a valid key is no error."""
    objects = LocalObjectStore(tmp_path / "objects", durable=False)
    store = FrameStore(objects)
    image = np.full((48, 64, 3), 90, np.uint8)

    def earlier(source: str, segment: str, seq: int) -> str:
        key = f"frames/{source}/{segment}/frame_{1000 + seq}_{seq}.jpg"  # the layout before
        objects.put(key, Frame(image, source, seq, 1000 + seq).to_jpeg())
        return key

    old = [earlier("door:1", "ORDER_1", seq) for seq in (1, 2)]
    new = Frame(image, "door:1", 3, 1003, segment_id="ORDER_1")
    store.write(new)
    assert store.key_for(new) == "frames/door%3A1/ORDER_1/frame_1003_3.jpg"
    listed = [info.key for info in store.list_frames("door:1", "ORDER_1")]
    assert listed == sorted([*old, store.key_for(new)])
    assert [f.seq for f in store.read_frames("door:1", "ORDER_1")] == [1, 2, 3]
    assert {info.key for info in store.list_frames("door:1")} == set(listed)

    percent = [earlier("cam", "50%", seq) for seq in (4, 5)]
    assert [info.key for info in store.list_frames("cam", "50%")] == percent
    assert [f.seq for f in store.read_frames("cam", "50%")] == [4, 5]

    slash = Frame(image, "cam", 6, 1006, segment_id="a/b")
    store.write(slash)  # stored under frames/cam/a%2Fb/
    assert [info.key for info in store.list_frames("cam", "a/b")] == [store.key_for(slash)]
    assert store.list_frames("cam", "a%2Fb") == []  # that folder is a/b's
    for never_valid in ("..", "back\\slash", "x" * 2000):
        assert store.list_frames("cam", never_valid) == []

    # a raw id with a '/' named nested folders, which today hold another source's segment
    lobby = Frame(image, "lobby", 7, 1007, segment_id="door")  # frames/lobby/door/
    nested = Frame(image, "lobby/door", 8, 1008, segment_id="s1")  # frames/lobby%2Fdoor/s1/
    store.write(lobby)
    store.write(nested)
    assert [info.key for info in store.list_frames("lobby/door")] == [store.key_for(nested)]
