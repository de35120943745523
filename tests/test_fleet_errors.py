"""A processor's errors as its log and its callers see them, on the real Redis.

* ``process_frame`` raising on every frame (a camera sending corrupt images) logged a full
  traceback per frame; now the first of each kind comes with its traceback, later ones as
  one line per 10 s with the count held back, and every frame still gets its error result.
* The hint that ``image_data`` holds base64 (``image_encoding='raw'``) was added to every
  error of a processor left at the default encoding; now only to one plausibly about reading
  the image.
* A frame id (any text a router sends) was written into the log as it came: a 200 KB id made
  one 200 KB line, and a newline or NUL in it forged or broke lines; now it is cut and
  escaped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from typing import Any

import pytest

from conftest import REDIS_URL

redis_sync = pytest.importorskip("redis")

from framepipe.frames import decode_jpeg  # noqa: E402
from framepipe.processors import ProcessorRegistry  # noqa: E402
from framepipe.processors.fleet.frame_entries import frame_entry  # noqa: E402
from framepipe.processors.fleet.handling import about_image  # noqa: E402
from framepipe.processors.fleet.shown import loggable  # noqa: E402
from test_processors_remote import Detector, make_frame, serving  # noqa: E402

pytestmark = pytest.mark.slow


def raised_lines(logs: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in logs.records if "process_frame raised" in r.getMessage()]


def test_a_processor_raising_on_every_frame_does_not_flood_its_log(
    ns: str, logs: pytest.LogCaptureFixture
) -> None:
    detector = Detector("face-1", ["face_detection"], ns)
    frames = 40

    async def main() -> float:
        async with (
            serving(detector),
            ProcessorRegistry(REDIS_URL, ns, circuit_failures=frames + 1) as registry,
        ):
            started = time.monotonic()
            for seq in range(frames):
                result = await registry.call(make_frame(seq, mode="raise"), "face_detection")
                assert not result.ok and result.error == "RuntimeError: detector exploded"
            return time.monotonic() - started

    took = asyncio.run(asyncio.wait_for(main(), 120))
    lines = raised_lines(logs)
    assert len([r for r in lines if r.exc_info]) == 1  # one traceback, the first frame's
    assert 1 <= len(lines) <= 1 + took / 10  # at most one line per 10 s after the first
    assert detector.failed == frames


def test_the_base64_hint_comes_only_with_an_error_about_the_image(ns: str) -> None:
    class Reader(Detector):
        async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
            if self.metadata(frame_data).get("meta", {}).get("mode") == "decode":
                decode_jpeg(frame_data[b"image_data"])  # base64 text, not JPEG bytes
            return await super().process_frame(frame_data)

    reader = Reader("face-1", ["face_detection"], ns, image_encoding=None)  # base64

    async def main() -> None:
        async with serving(reader), ProcessorRegistry(REDIS_URL, ns) as registry:
            model = await registry.call(make_frame(1, mode="raise"), "face_detection")
            assert model.error == "RuntimeError: detector exploded"
            image = await registry.call(make_frame(2, mode="decode"), "face_detection")
            assert image.error is not None and "not a decodable JPEG" in image.error
            assert "image_encoding='raw'" in image.error

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_hostile_frame_id_is_cut_and_escaped_in_the_log(
    ns: str, logs: pytest.LogCaptureFixture
) -> None:
    detector = Detector("face-1", ["face_detection"], ns)
    hostile = "cam\n2026-12-06 INFO [processor] forged line\x00" + "x" * 200_000 + "\r\nend"

    async def main() -> None:
        async with serving(detector), ProcessorRegistry(REDIS_URL, ns) as registry:
            entry = frame_entry(make_frame(1, mode="raise"))
            entry["frame_id"] = hostile
            assert not (await registry.call(entry, "face_detection")).ok
            bad = {**frame_entry(make_frame(2)), "frame_id": hostile + "2", "width": "wide"}
            assert (await registry.call(bad, "face_detection")).error_kind == "input"

    asyncio.run(asyncio.wait_for(main(), 60))
    shown = [r.getMessage() for r in logs.records if "forged" in r.getMessage()]
    assert len(shown) == 2  # process_frame raised; the malformed entry
    for line in shown:
        assert "\n" not in line and "\r" not in line and "\x00" not in line
        assert len(line) < 2_000
        assert "cam\\x0a2026-12-06 INFO [processor] forged line\\x00" in line
        assert f"[{len(hostile)} chars]" in line or f"[{len(hostile) + 1} chars]" in line


def test_loggable_and_about_image() -> None:
    assert loggable("face-1") == "face-1"
    assert loggable("a\x00b\nc\u2028\udcff") == "a\\x00b\\x0ac\\u2028\\udcff"
    cut = loggable("y" * 10_000, 30)
    assert cut == "y" * 20 + "…[10000 chars]…" + "y" * 10
    assert about_image(ValueError("Incorrect padding"))
    assert about_image(AttributeError("'NoneType' object has no attribute 'shape'"))
    with pytest.raises(binascii.Error) as decoding:
        base64.b64decode(b"abc")
    assert about_image(decoding.value)
    assert not about_image(RuntimeError("model exploded"))
    assert not about_image(KeyError("boxes"))


def test_a_hostile_error_text_is_cut_and_escaped_in_the_registrys_log(
    ns: str, logs: pytest.LogCaptureFixture
) -> None:
    hostile = "boom\n2026-12-06 ERROR [registry] forged line\x00" + "z" * 200_000

    class Hostile(Detector):
        async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
            raise RuntimeError(hostile)

    detector = Hostile("face-1", ["face_detection"], ns)

    async def main() -> None:
        async with (
            serving(detector),
            ProcessorRegistry(REDIS_URL, ns, circuit_failures=1) as registry,
        ):
            assert not (await registry.call(make_frame(1), "face_detection")).ok

    asyncio.run(asyncio.wait_for(main(), 60))
    [opened] = [
        r.getMessage()
        for r in logs.records
        if r.name.startswith("framepipe.processors.registry") and "circuit open" in r.getMessage()
    ]
    assert "\n" not in opened and "\x00" not in opened and len(opened) < 2_000
    assert "boom\\x0a2026-12-06 ERROR [registry] forged line\\x00" in opened
