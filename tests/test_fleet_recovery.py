"""The fleet's recovery of frames left pending, with real processor processes on the real Redis:
a processor declared dead that comes back answers the frames the registry took from it, a
frame that kills its processor is given up after ``max_attempts`` restarts under the same id,
two registries reaping one dead processor route each of its frames once, a reaper whose
view is behind leaves the frames of a processor that registered again, and a reaper that loses
Redis while moving a dead processor's frames keeps every frame's track on the dead processor.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import REDIS_URL

redis_sync = pytest.importorskip("redis")

from fleet_processes import Processor, entry, processor_script  # noqa: E402
from framepipe.errors import ResultTimeoutError  # noqa: E402
from framepipe.processors import ProcessorClient, ProcessorRegistry  # noqa: E402
from framepipe.processors.fleet.keys import Keys, ProcessorState  # noqa: E402
from framepipe.processors.fleet.registry import register  # noqa: E402
from framepipe.processors.fleet.rerouting import REAPER, TAKE_NEW_LUA  # noqa: E402
from framepipe.redis.connection import REDIS_DOWN, connect  # noqa: E402
from framepipe.redis.wire import Wire  # noqa: E402
from waiting import free_port, wait_until_async  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def script(tmp_path: Path) -> Path:
    return processor_script(tmp_path)


def test_frames_taken_from_a_processor_declared_dead_are_answered_when_it_comes_back(
    ns: str, script: Path
) -> None:
    """The only processor with the capability stalls (SIGSTOP) past heartbeat_timeout: it is
    declared dead and the registry takes the frames it had not read yet (under the reaper's
    consumer, with nobody to re-route them to). It comes back (SIGCONT), registers again and
    answers them itself (as ok results: being held by the registry is not an attempt). A frame
    whose caller gave up meanwhile is past its deadline (the call's timeout): it is
    acknowledged without being run, and the next call gets its own result."""

    async def main() -> None:
        solo = await Processor(script, ns, capacity=4, delay=0.5).start()
        client = redis_sync.Redis.from_url(REDIS_URL)
        stream = f"{ns}proc:solo:frames"
        try:
            async with ProcessorRegistry(
                REDIS_URL, ns, heartbeat_timeout=1.0, result_timeout=20
            ) as registry:
                await registry.wait_for_processor("cap", timeout=15)
                a = asyncio.create_task(registry.call(entry("A"), "cap"))
                await wait_until_async("A started", lambda: solo.said("start", "A"), 10)
                assert solo.proc is not None
                solo.proc.send_signal(signal.SIGSTOP)  # silent, and handles nothing more
                # B may still go to the read the processor had waiting when it stopped
                b = asyncio.create_task(registry.call(entry("B"), "cap"))
                await wait_until_async("B routed", lambda: client.xlen(stream) == 2, 5)
                c = asyncio.create_task(registry.call(entry("C"), "cap", timeout=1.0))
                e = asyncio.create_task(registry.call(entry("E"), "cap"))
                await wait_until_async("C and E routed", lambda: client.xlen(stream) == 4, 5)
                frame_of = {mid: f[b"frame_id"] for mid, f in client.xrange(stream)}

                def holders() -> dict[bytes, tuple[bytes, int]]:
                    pending = client.xpending_range(stream, "processors", "-", "+", 10)
                    return {
                        frame_of[p["message_id"]]: (p["consumer"], p["times_delivered"])
                        for p in pending
                    }

                def taken_by_reaper() -> bool:
                    held = holders()
                    return (
                        client.hget(f"{ns}proc:solo", "state") == b"dead"
                        and held.get(b"A") == (b"solo", 1)
                        and held.get(b"C") == held.get(b"E") == (REAPER.encode(), 0)
                    )

                # declared dead, nobody to take its frames over: the reaper takes those never
                # delivered (C and E), without counting a delivery; A stays with solo
                await wait_until_async(
                    "the reaper took C and E",
                    taken_by_reaper,
                    10,
                    explain=lambda: (client.hgetall(f"{ns}proc:solo"), holders()),
                )
                with pytest.raises(ResultTimeoutError):
                    await c  # its caller gives up while the processor is away
                solo.proc.send_signal(signal.SIGCONT)

                results = await asyncio.gather(a, b, e)
                assert [(r.frame_id, r.ok, r.processor_id) for r in results] == [
                    ("A", True, "solo"),
                    ("B", True, "solo"),
                    ("E", True, "solo"),
                ]
                await wait_until_async(
                    "every entry acknowledged and deleted",
                    lambda: (
                        client.xlen(stream) == 0
                        and client.xpending(stream, "processors")["pending"] == 0
                    ),
                    5,
                )
                assert client.hget(f"{ns}proc:solo", "state") == b"ready"
                assert not solo.said("start", "C")  # past its deadline: skipped, not run
                # a new frame gets its own result
                result_d = await registry.call(entry("D"), "cap", timeout=10)
                assert (result_d.frame_id, result_d.ok) == ("D", True)
                assert [i.outstanding for i in registry.processors()] == [0]
        finally:
            client.close()
            await solo.finish()

    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_frame_that_kills_its_processor_is_given_up_after_max_attempts_restarts(
    ns: str, script: Path
) -> None:
    """A frame kills the process each time it runs; the process is restarted under the same id
    at once (compose ``restart: unless-stopped``), well within heartbeat_timeout, so the
    registry never declares it dead. It runs max_attempts (3) times; the fourth life answers
    it with the ``lost`` error result instead of running it again, and goes on serving."""

    async def main() -> None:
        client = redis_sync.Redis.from_url(REDIS_URL)
        stream = f"{ns}proc:solo:frames"
        lives: list[Processor] = []
        try:
            async with ProcessorRegistry(
                REDIS_URL, ns, heartbeat_timeout=60, max_attempts=3
            ) as registry:
                lives.append(await Processor(script, ns).start())
                await registry.wait_for_processor("cap", timeout=15)
                call = asyncio.create_task(registry.call(entry("poison-1"), "cap", timeout=60))
                while True:
                    life = lives[-1]
                    exit_code = asyncio.ensure_future(life.exited())
                    await asyncio.wait({call, exit_code}, return_when=asyncio.FIRST_COMPLETED)
                    if call.done():
                        exit_code.cancel()
                        break
                    assert exit_code.result() == 3 and life.said("start", "poison-1")
                    assert len(lives) <= 3, f"crash loop: poison-1 ran in {len(lives)} lives"
                    lives.append(await Processor(script, ns).start())
                result = call.result()
                assert not result.ok and result.error_kind == "lost", result
                assert result.error is not None and "delivered 3 times" in result.error
                assert len(lives) == 4 and not lives[-1].said("start", "poison-1")
                assert client.hget(f"{ns}proc:solo", "state") == b"ready"  # never declared dead
                assert client.xlen(stream) == 0  # acknowledged and deleted
                published = [f for _, f in client.xrange(f"{ns}results")]
                assert [(f[b"frame_id"], f[b"error_kind"]) for f in published] == [
                    (b"poison-1", b"lost")
                ]
                # the fourth life goes on serving
                started = time.monotonic()
                fine = await registry.call(entry("fine-1"), "cap", timeout=10)
                assert fine.ok and time.monotonic() - started < 10
        finally:
            client.close()
            for life in lives:
                await life.finish()

    asyncio.run(asyncio.wait_for(main(), 120))


def in_process(ns: str) -> dict[str, Any]:
    """The options of a test's in-process processor on namespace ``ns``: raw images, quick
    health reports, results on ``<ns>results``, no environment checks."""
    return {
        "redis_url": REDIS_URL,
        "namespace": ns,
        "health_interval": 0.2,
        "image_encoding": "raw",
        "result_stream": f"{ns}results",
        "environ": {},
    }


class Gated(ProcessorClient):
    """An in-process processor whose frame ``hold`` waits for ``release``."""

    def __init__(self, ns: str) -> None:
        super().__init__("gated", ["cap"], capacity=1, **in_process(ns))
        self.release = asyncio.Event()
        self.started: list[str] = []

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        frame_id = frame_data[b"frame_id"].decode()
        self.started.append(frame_id)
        if frame_id == "hold":
            await self.release.wait()
        return {"frame": frame_id}


def test_entries_the_reaper_holds_in_a_ready_processors_stream_are_taken_back(ns: str) -> None:
    """Whenever the registry's reaper holds entries in the stream of a processor that is
    ready (it took them while the processor was declared dead, and the processor came back
    before or while it did), the processor's heartbeat notices and it runs them."""

    async def main() -> None:
        gated = Gated(ns)
        client = redis_sync.Redis.from_url(REDIS_URL)
        serving = asyncio.create_task(gated.start())
        try:
            await asyncio.wait_for(gated.wait_registered(), 10)
            client.xadd(gated.stream, entry("hold"))
            await wait_until_async("hold started", lambda: gated.started == ["hold"], 5)
            # at capacity: it reads nothing now; the reaper takes the next entry
            client.xadd(gated.stream, entry("waiting"))
            taken = client.eval(TAKE_NEW_LUA, 1, gated.stream, "processors", REAPER, 10)
            assert taken == 1
            gated.release.set()

            def answered() -> list[bytes]:
                return [f[b"frame_id"] for _, f in client.xrange(f"{ns}results")]

            await wait_until_async(
                "the entry held by the reaper answered",
                lambda: answered() == [b"hold", b"waiting"],
                10,
                explain=lambda: client.xpending_range(gated.stream, "processors", "-", "+", 10),
            )
            assert gated.started == ["hold", "waiting"]
            assert client.xlen(gated.stream) == 0
        finally:
            client.close()
            await gated.stop()
            await asyncio.wait_for(serving, 15)

    asyncio.run(asyncio.wait_for(main(), 60))


class Target(ProcessorClient):
    """An in-process processor that answers at once and records the frames it was given."""

    def __init__(self, ns: str) -> None:
        super().__init__("target", ["cap"], capacity=4, **in_process(ns))
        self.started: list[str] = []

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        self.started.append(frame_data[b"frame_id"].decode())
        return {"ok": True}


def test_two_registries_reaping_one_dead_processor_route_each_frame_once(
    ns: str, script: Path
) -> None:
    """Two registries reap the same dead processor at the same moment: each of its frames (those
    it had read and those still waiting in its stream) goes to the live processor once, and
    every call gets its result from there."""

    async def main() -> None:
        client = redis_sync.Redis.from_url(REDIS_URL)
        stream = f"{ns}proc:solo:frames"
        doomed = await Processor(script, ns, capacity=12, delay=3600).start()
        target = Target(ns)
        serving: asyncio.Task[None] | None = None
        # the health watches sleep (poll_interval): the test runs the two reapers' ticks itself
        settings: dict[str, Any] = {"heartbeat_timeout": 60, "poll_interval": 3600}
        try:
            async with (
                ProcessorRegistry(REDIS_URL, ns, registry_id="a", **settings) as a,
                ProcessorRegistry(REDIS_URL, ns, registry_id="b", **settings) as b,
            ):
                await a.wait_for_processor("cap", timeout=15)
                ids = [f"F{i}" for i in range(12)]
                calls = [asyncio.create_task(a.call(entry(i), "cap", timeout=60)) for i in ids[:6]]
                await wait_until_async(
                    "six frames started", lambda: all(doomed.said("start", i) for i in ids[:6]), 10
                )
                assert doomed.proc is not None
                doomed.proc.send_signal(signal.SIGSTOP)  # reads nothing more
                calls += [asyncio.create_task(a.call(entry(i), "cap", timeout=60)) for i in ids[6:]]
                await wait_until_async("twelve routed", lambda: client.xlen(stream) == 12, 10)
                doomed.proc.kill()
                await doomed.exited()

                serving = asyncio.create_task(target.start())
                await asyncio.wait_for(target.wait_registered(), 10)
                client.hset(f"{ns}proc:solo", "state", "dead")  # declared dead (by either)
                await asyncio.gather(a._reaper.tick(), b._reaper.tick())

                results = await asyncio.wait_for(asyncio.gather(*calls), 30)
                assert [(r.frame_id, r.ok, r.processor_id) for r in results] == [
                    (i, True, "target") for i in ids
                ]
                await wait_until_async(
                    "the target's stream drained",
                    lambda: (
                        client.xlen(target.stream) == 0
                        and client.xpending(target.stream, "processors")["pending"] == 0
                    ),
                    10,
                )
                assert sorted(target.started) == sorted(ids), "a frame was routed twice"
                assert client.xlen(stream) == 0
        finally:
            client.close()
            await doomed.finish()
            if serving is not None:
                await target.stop()
                await asyncio.wait_for(serving, 15)

    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_reaper_whose_view_is_behind_leaves_the_frames_of_a_processor_that_came_back(
    ns: str,
) -> None:
    """The registry saw the processor dead, and the processor has registered again since (its
    view is a poll behind): reaping it moves nothing, whatever live processor could take its
    frames; the processor answers them itself."""

    async def main() -> None:
        gated, target = Gated(ns), Target(ns)
        client = redis_sync.Redis.from_url(REDIS_URL)
        tasks = [asyncio.create_task(gated.start()), asyncio.create_task(target.start())]
        try:
            await asyncio.wait_for(gated.wait_registered(), 10)
            await asyncio.wait_for(target.wait_registered(), 10)
            client.xadd(gated.stream, entry("hold"))
            await wait_until_async("hold started", lambda: gated.started == ["hold"], 5)
            client.xadd(gated.stream, entry("waiting"))
            async with ProcessorRegistry(
                REDIS_URL, ns, heartbeat_timeout=60, poll_interval=3600
            ) as registry:
                await registry.refresh()
                seen = registry._procs["gated"]
                seen.state = ProcessorState.DEAD  # what it saw a poll ago
                await registry._reaper.rerouter.reap(seen)
                assert client.xlen(gated.stream) == 2
                assert client.hget(f"{ns}proc:gated", "state") == b"ready"
            gated.release.set()
            await wait_until_async(
                "both answered by gated",
                lambda: (
                    [f[b"frame_id"] for _, f in client.xrange(f"{ns}results")]
                    == [b"hold", b"waiting"]
                ),
                10,
            )
            assert target.started == []
        finally:
            client.close()
            for client_ in (gated, target):
                await client_.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_reaper_that_loses_redis_while_moving_frames_keeps_their_tracks_on_the_dead_one(
    ns: str,
) -> None:
    """Redis is unreachable when the reaper runs the scripts moving a dead processor's five
    frames (their connection refused): nothing moved, every frame's track is back on the dead
    processor, its capacity held there, before the error is raised. The next tick moves them
    and every call gets its result."""

    async def main() -> None:
        client = redis_sync.Redis.from_url(REDIS_URL)
        keys = Keys(ns)
        target = Target(ns)
        serving: asyncio.Task[None] | None = None
        ids = [f"F{i}" for i in range(5)]
        try:
            async with ProcessorRegistry(
                REDIS_URL, ns, heartbeat_timeout=60, poll_interval=3600
            ) as registry:
                await register(
                    registry._require(),
                    keys,
                    "doomed",  # reads nothing
                    capabilities=["cap"],
                    capacity=5,
                    stream=keys.frames("doomed"),
                    result_stream=f"{ns}results",
                    in_flight=0,
                    processed=0,
                    failed=0,
                )
                await registry.wait_for_processor("cap", timeout=10)
                calls = [
                    asyncio.create_task(registry.call(entry(i), "cap", timeout=60)) for i in ids
                ]
                await wait_until_async(
                    "five routed", lambda: client.xlen(keys.frames("doomed")) == 5, 10
                )
                serving = asyncio.create_task(target.start())
                await asyncio.wait_for(target.wait_registered(), 10)
                client.hset(keys.proc("doomed"), "state", "dead")

                routes = registry._routes
                away = connect(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
                registry._routes = Wire(away)
                try:
                    with pytest.raises(REDIS_DOWN):
                        await registry._reaper.tick()
                finally:
                    await registry._routes.close()
                    await away.aclose()
                    registry._routes = routes
                procs = registry._procs
                assert {t.frame_id: t.processor_id for t in registry._routed.values()} == {
                    i: "doomed" for i in ids
                }
                assert (procs["doomed"].outstanding, procs["target"].outstanding) == (
                    set(ids),
                    set(),
                )
                assert client.xlen(keys.frames("doomed")) == 5

                await registry._reaper.tick()
                results = await asyncio.wait_for(asyncio.gather(*calls), 30)
                assert [(r.frame_id, r.ok, r.processor_id) for r in results] == [
                    (i, True, "target") for i in ids
                ]
                assert sorted(target.started) == ids
                assert [
                    (i.processor_id, i.outstanding)
                    for i in registry.processors(include_departed=False)
                ] == [("target", 0)]
        finally:
            client.close()
            if serving is not None:
                await target.stop()
                await asyncio.wait_for(serving, 15)

    asyncio.run(asyncio.wait_for(main(), 60))
