"""Registrations a registry cannot read, on the real Redis: an id in ``<ns>:processors`` whose
record is a key of another type (``WRONGTYPE``: an older system's key, a typo, a hostile
writer), and a record naming a stream that is a key of another type. Each is skipped with one
warning naming it; the other processors are routed to and watched as usual, where the first
failed the registry's start and, appearing later, killed its health watch (the registry failed
for good) and the second killed the health watch at its first reaping.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from conftest import REDIS_URL

redis_sync = pytest.importorskip("redis")

from framepipe.processors import ProcessorRegistry  # noqa: E402
from test_processors_remote import Detector, make_frame, serving  # noqa: E402
from waiting import wait_until_async  # noqa: E402

pytestmark = pytest.mark.slow


def warnings_naming(logs: pytest.LogCaptureFixture, key: str) -> list[str]:
    return [
        r.getMessage()
        for r in logs.records
        if r.name.startswith("framepipe.processors") and r.levelno >= logging.WARNING
        if key in r.getMessage()
    ]


async def seen_by_the_watch(registry: ProcessorRegistry, detector: Detector) -> None:
    """Start ``detector`` and wait until the registry's health watch (not a refresh of the
    test's) has read its record: a tick went through after it registered."""
    await wait_until_async(
        f"the health watch never saw {detector.processor_id}",
        lambda: any(
            p.processor_id == detector.processor_id
            for p in registry.processors(include_departed=False)
        ),
        15,
    )


def test_a_record_of_another_type_is_skipped_by_name(
    ns: str, logs: pytest.LogCaptureFixture
) -> None:
    client = redis_sync.Redis.from_url(REDIS_URL)
    bad = f"{ns}proc:bogus"

    async def main() -> None:
        first, second = (Detector(f"face-{n}", ["face_detection"], ns) for n in (1, 2))
        async with serving(first):
            client.sadd(f"{ns}processors", "bogus")
            client.set(bad, "not a hash")
            async with ProcessorRegistry(REDIS_URL, ns, poll_interval=0.05) as registry:
                assert (await registry.call(make_frame(1), "face_detection", timeout=15)).ok
                async with serving(second):  # two ticks at least with the bad record
                    await seen_by_the_watch(registry, second)
                    client.hset(f"{ns}proc:face-2", "capacity", "7")
                    await wait_until_async(
                        "the health watch stopped reading",
                        lambda: any(p.capacity == 7 for p in registry.processors()),
                        15,
                    )
                    assert registry._failed is None
                    assert (await registry.call(make_frame(2), "face_detection", timeout=15)).ok
                assert "bogus" not in {p.processor_id for p in registry.processors()}
        [warning] = warnings_naming(logs, bad)
        assert "WRONGTYPE" in warning

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        client.close()


def test_a_processor_whose_stream_cannot_be_reaped_leaves_the_watch_running(
    ns: str, logs: pytest.LogCaptureFixture
) -> None:
    client = redis_sync.Redis.from_url(REDIS_URL)
    stream = f"{ns}proc:broken:frames"

    async def main() -> None:
        detector = Detector("face-1", ["face_detection"], ns)
        client.set(stream, "not a stream")
        client.hset(f"{ns}proc:broken", mapping={"id": "broken", "state": "stopped", "capacity": 1})
        client.sadd(f"{ns}processors", "broken")
        async with (
            ProcessorRegistry(REDIS_URL, ns, poll_interval=0.05) as registry,
            serving(detector),
        ):
            await seen_by_the_watch(registry, detector)
            client.hset(f"{ns}proc:face-1", "capacity", "7")
            await wait_until_async(
                "the health watch stopped reading",
                lambda: any(p.capacity == 7 for p in registry.processors()),
                15,
            )
            assert registry._failed is None
            assert (await registry.call(make_frame(1), "face_detection", timeout=15)).ok
        [warning] = warnings_naming(logs, stream)
        assert "broken" in warning and "WRONGTYPE" in warning

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        client.close()


def test_a_record_naming_another_processor_s_stream_never_has_it_reaped(ns: str) -> None:
    """A stopped record whose ``stream`` field names a live processor's stream (a hostile or
    confused writer): the registry reaps the stopped processor's own stream, by the protocol's
    name for it, and the live one keeps its stream and its frames."""
    client = redis_sync.Redis.from_url(REDIS_URL)

    async def main() -> None:
        detector = Detector("face-1", ["face_detection"], ns)
        own = f"{ns}proc:face-1:frames"
        async with (
            serving(detector),
            ProcessorRegistry(REDIS_URL, ns, poll_interval=0.05) as registry,
        ):
            assert (await registry.call(make_frame(1), "face_detection", timeout=15)).ok
            assert client.xinfo_stream(own)["entries-added"] == 1
            client.hset(
                f"{ns}proc:liar",
                mapping={"id": "liar", "state": "stopped", "stream": own, "capacity": 1},
            )
            client.sadd(f"{ns}processors", "liar")
            await wait_until_async(
                "the stopped record reaped",
                lambda: not client.sismember(f"{ns}processors", "liar"),
                15,
            )
            # Deleted and made again (the processor registers anew), it would count afresh.
            assert client.xinfo_stream(own)["entries-added"] == 1
            assert (await registry.call(make_frame(2), "face_detection", timeout=15)).ok

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        client.close()
