"""A processor whose results Redis rejects for good, on the real Redis: its result stream is a
key of another type (the key of an older system, a typo colliding with a hash). Each frame is
answered with an ``output`` error naming the result stream and acknowledged, where it stayed
pending for ever in the live processor's stream (its caller told only that no result came in
time, then the circuit opened); at start, the processor refuses such a result stream by name.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import REDIS_URL

redis_sync = pytest.importorskip("redis")

from framepipe.errors import ConfigError  # noqa: E402
from framepipe.processors import ProcessorRegistry  # noqa: E402
from test_processors_remote import Detector, make_frame, serving  # noqa: E402

pytestmark = pytest.mark.slow


def test_a_result_the_result_stream_rejects_is_answered_as_an_output_error(ns: str) -> None:
    detector = Detector("face-1", ["face_detection"], ns)
    client = redis_sync.Redis.from_url(REDIS_URL)

    async def main() -> None:
        async with serving(detector), ProcessorRegistry(REDIS_URL, ns) as registry:
            assert (await registry.call(make_frame(1), "face_detection")).ok
            client.delete(detector.result_stream)
            client.set(detector.result_stream, "a key of an older system")
            for seq in (2, 3):
                result = await registry.call(make_frame(seq), "face_detection", timeout=15)
                assert not result.ok and result.error_kind == "output"
                assert result.error is not None
                assert detector.result_stream in result.error and "WRONGTYPE" in result.error
            assert client.xpending(detector.stream, "processors")["pending"] == 0
            assert client.get(detector.result_stream) == b"a key of an older system"
            assert (detector.processed, detector.failed) == (1, 2)

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        client.close()


def test_a_result_stream_of_another_type_fails_the_start_by_name(ns: str) -> None:
    detector = Detector("face-1", ["face_detection"], ns)
    client = redis_sync.Redis.from_url(REDIS_URL)
    client.hset(detector.result_stream, "field", "value")
    try:
        with pytest.raises(ConfigError, match=rf"{detector.result_stream!r} is a Redis hash"):
            asyncio.run(asyncio.wait_for(detector.start(), 30))
        assert not client.sismember(f"{ns}processors", "face-1")
    finally:
        client.close()
