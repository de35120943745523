"""Frames' deadlines, with real processor processes on the real Redis: a processor that comes
back after its callers gave up skips their frames (acknowledged unrun, counted in its health
and its record) and answers the next fresh frame at once; frames still within their deadline
after a short outage are all processed; a frame moved from a dead processor keeps the deadline
of its first entry; an entry without ``ttl_ms`` (an older router) has none.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import REDIS_URL

redis_sync = pytest.importorskip("redis")

from fleet_processes import Processor, entry, processor_script  # noqa: E402
from framepipe.errors import ResultTimeoutError  # noqa: E402
from framepipe.processors import ProcessorRegistry  # noqa: E402
from framepipe.processors.fleet.deadlines import RedisClock, deadline_ms  # noqa: E402
from framepipe.redis.connection import connect  # noqa: E402
from waiting import free_port, wait_until_async  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def script(tmp_path: Path) -> Path:
    return processor_script(tmp_path)


def health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            body: dict[str, Any] = json.loads(answer.read())
    except OSError:
        return {}
    return body


async def killed(life: Processor) -> None:
    """SIGKILL: its record stays ``ready`` (routers go on sending to it) until it is declared
    dead, which the tests' ``heartbeat_timeout`` puts off."""
    assert life.proc is not None
    life.proc.kill()
    await life.exited()


def test_a_processor_back_after_its_callers_gave_up_skips_their_frames_and_answers_at_once(
    ns: str, script: Path
) -> None:
    """The only processor with the capability is killed while frames are sent to it; every
    caller times out. Restarted under the same id, it acknowledges those frames without
    running them (processing them would take it 4 s: 8 frames, 2 at a time, 1 s each), and the
    next fresh frame is answered after its own second (well before the 5 s it would wait
    behind them); the count shows in its health
    endpoint and, after a heartbeat, in the registry's view of it."""

    async def main() -> None:
        port = free_port()
        first = await Processor(script, ns, capacity=2, delay=1.0).start()
        lives = [first]
        client = redis_sync.Redis.from_url(REDIS_URL)
        stream = f"{ns}proc:solo:frames"
        try:
            async with ProcessorRegistry(
                REDIS_URL, ns, heartbeat_timeout=60, circuit_failures=100
            ) as registry:
                await registry.wait_for_processor("cap", timeout=15)
                assert (await registry.call(entry("warm"), "cap", timeout=10)).ok
                await killed(first)
                stale = [f"old-{n}" for n in range(8)]
                calls = [
                    registry.call(entry(frame_id), "cap", timeout=1.0, wait=30)
                    for frame_id in stale
                ]
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                assert all(isinstance(o, ResultTimeoutError) for o in outcomes), outcomes
                assert client.xlen(stream) == 8  # waiting for a processor that is gone

                back = await Processor(script, ns, capacity=2, delay=1.0, health_port=port).start()
                lives.append(back)
                await wait_until_async("the second life is healthy", lambda: health(port), 15)
                started = time.monotonic()
                fresh = await registry.call(entry("fresh"), "cap", timeout=10)
                took = time.monotonic() - started
                assert fresh.ok and fresh.frame_id == "fresh"
                assert took < 3.5, f"the fresh frame waited {took:.1f}s behind stale ones"
                assert not any(back.said("start", frame_id) for frame_id in stale)
                assert client.xlen(stream) == 0  # acknowledged and deleted
                assert client.xpending(stream, "processors")["pending"] == 0
                assert health(port)["expired"] == 8

                async def seen_by_registry() -> bool:
                    return [p.expired for p in await registry.refresh()] == [8]

                await wait_until_async("the registry sees the count", seen_by_registry, 10)
        finally:
            client.close()
            for life in lives:
                await life.finish()

    asyncio.run(asyncio.wait_for(main(), 90))


def test_frames_within_their_deadline_are_processed_after_a_short_outage(
    ns: str, script: Path
) -> None:
    """Killed while frames are sent (their calls wait up to 20 s), the processor is back within
    a second or two: every frame is processed and answered, none skipped."""

    async def main() -> None:
        port = free_port()
        first = await Processor(script, ns, capacity=4).start()
        lives = [first]
        try:
            async with ProcessorRegistry(REDIS_URL, ns, heartbeat_timeout=60) as registry:
                await registry.wait_for_processor("cap", timeout=15)
                await killed(first)
                frame_ids = [f"f-{n}" for n in range(4)]
                calls = [
                    asyncio.ensure_future(registry.call(entry(frame_id), "cap", timeout=20))
                    for frame_id in frame_ids
                ]
                await asyncio.sleep(1.0)
                back = await Processor(script, ns, capacity=4, health_port=port).start()
                lives.append(back)
                results = await asyncio.gather(*calls)
                assert [(r.frame_id, r.ok) for r in results] == [(i, True) for i in frame_ids]
                assert all(back.said("done", frame_id) for frame_id in frame_ids)
                body = await wait_until_async("its health", lambda: health(port), 10)
                assert body["expired"] == 0 and body["processed"] == 4
        finally:
            for life in lives:
                await life.finish()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_frame_moved_from_a_dead_processor_keeps_the_deadline_of_its_first_entry(
    ns: str, script: Path
) -> None:
    """A frame is routed with ``max_age`` 2 s to a processor that was just killed; the registry
    declares it dead, and no other processor has the capability. One registers 2.5 s after
    the route: the registry moves the frame to it (a new entry, of a new id), and it skips the
    frame unrun, because the moved entry carries ``first_entry`` (its own id alone would give
    the frame a fresh deadline)."""

    async def main() -> None:
        doomed = await Processor(script, ns, capacity=4).start()
        heir = Processor(script, ns, capacity=4)
        heir.cfg["id"] = "heir"
        client = redis_sync.Redis.from_url(REDIS_URL)
        try:
            async with ProcessorRegistry(REDIS_URL, ns, heartbeat_timeout=1.0) as registry:
                await registry.wait_for_processor("cap", timeout=15)
                await killed(doomed)
                await registry.route(entry("moved"), "cap", max_age=2.0)
                routed = time.monotonic()
                await wait_until_async(
                    "solo declared dead",
                    lambda: client.hget(f"{ns}proc:solo", "state") == b"dead",
                    15,
                )
                await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - routed)))
                await heir.start()
                await wait_until_async(
                    "the heir counts the moved frame expired",
                    lambda: client.hget(f"{ns}proc:heir", "expired") == b"1",
                    15,
                    explain=lambda: (heir.lines, client.hgetall(f"{ns}proc:heir")),
                )
                assert not heir.said("start", "moved")
                assert client.exists(f"{ns}proc:solo:frames") == 0  # moved out, then removed
        finally:
            client.close()
            await doomed.finish()
            await heir.finish()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_an_entry_without_ttl_has_no_deadline_and_redis_s_clock_is_learned() -> None:
    """The deadline is the first entry's Redis time plus ``ttl_ms``; an entry from an older
    router (no ``ttl_ms``) has none. :class:`RedisClock` reads Redis's time within a few ms."""
    assert deadline_ms(b"5000-1", {b"ttl_ms": b"1500"}) == 6500
    assert deadline_ms(b"9000-0", {b"ttl_ms": b"1500", b"first_entry": b"5000-1"}) == 6500
    assert deadline_ms(b"5000-1", {b"frame_id": b"x"}) is None
    assert deadline_ms(b"5000-1", {b"ttl_ms": b"soon"}) is None

    async def main() -> None:
        redis = connect(REDIS_URL)
        clock = RedisClock()
        try:
            assert clock.now_ms() is None
            await clock.sync(redis)
            seconds, micros = await redis.time()
            now = clock.now_ms()
            assert now is not None and abs(now - (seconds * 1000 + micros / 1000)) < 50
        finally:
            await redis.aclose()

    asyncio.run(main())
