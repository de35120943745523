"""Replies matched to the request that produced them, on the real Redis: a caller that reuses a
frame id after a timeout gets its own result, never the late reply of the earlier request under
that id. A processor from before reply tokens (its reply does not echo ``reply_token``) is
matched by frame id: every reply it sends is taken, whether the router knows the entry it
answered yet or not (a reply read before the ``XADD`` that sent the frame replied, one to an
entry the reaper moved, or another registry's reaper), and its late replies to requests that
ended are dropped: the router knows their entries, its own and those any registry's reaper
moved them to (announced on its reply stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any, cast

import numpy as np
import pytest

from conftest import REDIS_URL, redis_namespace

redis_sync = pytest.importorskip("redis")

from redis.asyncio import Redis  # noqa: E402

from framepipe.errors import ResultTimeoutError  # noqa: E402
from framepipe.frames import encode_jpeg  # noqa: E402
from framepipe.processors import ProcessorClient, ProcessorRegistry  # noqa: E402
from framepipe.processors.fleet import replies  # noqa: E402
from framepipe.processors.fleet.field_values import text  # noqa: E402
from framepipe.processors.fleet.keys import GROUP, Keys  # noqa: E402
from framepipe.processors.fleet.registry import register  # noqa: E402
from framepipe.processors.fleet.result_entries import (  # noqa: E402
    Outcome,
    ProcessorResult,
    result_fields,
)
from framepipe.redis.scripts import REPLY_STREAM_TTL  # noqa: E402
from test_fleet_recovery import in_process  # noqa: E402
from waiting import wait_until_async  # noqa: E402

JPEG = encode_jpeg(np.zeros((8, 8, 3), np.uint8))


def entry(frame_id: str, n: int) -> dict[str, Any]:
    """A frame entry; ``n`` (in its metadata) tells the requests under one frame id apart."""
    return {"frame_id": frame_id, "camera_id": "cam", "image_data": JPEG, "metadata": {"n": n}}


def dropped(registry: ProcessorRegistry) -> int:
    """The replies the registry read and dropped (0 where it does not count them)."""
    return int(getattr(registry._reader, "dropped", 0))


class Gated(ProcessorClient):
    """An in-process processor: request ``n`` waits in ``process_frame`` until ``release(n)``;
    its result is ``{"n": n}``."""

    def __init__(self, ns: str) -> None:
        super().__init__(
            "gated",
            ["cap"],
            capacity=2,
            **in_process(ns),
            shutdown_timeout=2.0,  # a test that failed leaves its frames held
        )
        self.gates: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.started: list[int] = []

    def release(self, n: int) -> None:
        self.gates[n].set()

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        n = int(self.metadata(frame_data)["n"])
        self.started.append(n)
        await self.gates[n].wait()
        return {"n": n}


@contextlib.asynccontextmanager
async def serving(client: ProcessorClient) -> AsyncIterator[None]:
    task = asyncio.create_task(client.start())
    try:
        await asyncio.wait_for(client.wait_registered(), 10)
        yield
    finally:
        await client.stop()
        await asyncio.wait_for(task, 15)


def test_a_late_reply_is_not_delivered_to_a_newer_request_under_the_same_frame_id(
    ns: str,
) -> None:
    """Request 1 of frame X times out while the processor still works on it; the caller sends
    X again (request 2). Request 1's result comes first: it is read and dropped; request 2
    gets its own result."""

    async def main() -> None:
        gated = Gated(ns)
        async with (
            serving(gated),
            ProcessorRegistry(REDIS_URL, ns, heartbeat_timeout=60, result_timeout=60) as registry,
        ):
            await registry.wait_for_processor("cap", timeout=10)
            # the processor holds request 1 until released: it cannot answer within 0.5 s
            with pytest.raises(ResultTimeoutError):
                await registry.call(entry("X", 1), "cap", timeout=0.5)
            await wait_until_async("request 1 started", lambda: gated.started == [1], 10)
            second = asyncio.create_task(registry.call(entry("X", 2), "cap", timeout=60))
            await wait_until_async("request 2 started", lambda: gated.started == [1, 2], 10)

            gated.release(1)  # request 1's late result
            await wait_until_async(
                "request 1's late reply read",
                lambda: second.done() or dropped(registry) == 1,
                10,
            )
            assert not second.done(), f"request 2 got {second.result()}"

            gated.release(2)
            result = await asyncio.wait_for(second, 10)
            assert (result.frame_id, result.ok, result.data) == ("X", True, {"n": 2})
            assert [i.outstanding for i in registry.processors()] == [0]

    asyncio.run(asyncio.wait_for(main(), 60))


class OldProcessor:
    """A processor from before reply tokens, played by the test on the real Redis: registered
    as processors register; its replies are what ``result_fields`` wrote then (every field of
    today's result entry but ``reply_token``)."""

    def __init__(self, redis: Redis, ns: str) -> None:
        self.redis = redis
        self.keys = Keys(ns)
        self.id = "old"
        self.stream = self.keys.frames(self.id)

    async def register(self) -> None:
        await register(
            self.redis,
            self.keys,
            self.id,
            capabilities=["cap"],
            capacity=4,
            stream=self.stream,
            result_stream=self.keys.results,
            in_flight=0,
            processed=0,
            failed=0,
        )

    async def read(self) -> tuple[bytes, dict[bytes, bytes]]:
        """The next frame entry routed to it."""
        reply = await self.redis.xreadgroup(GROUP, self.id, {self.stream: ">"}, 1, 10_000)
        [(_stream, [(mid, fields)])] = cast("list[tuple[bytes, list[tuple[bytes, Any]]]]", reply)
        return mid, dict(fields)

    async def answer(self, mid: bytes, fields: dict[bytes, bytes]) -> None:
        n = json_n(fields)
        payload = result_fields(
            self.id, mid, fields, Outcome(ok=True, result_json=f'{{"n": {n}}}'), None, 1.0
        )
        payload.pop("reply_token", None)  # the older processor does not echo it
        await self.redis.xadd(fields[b"reply_to"].decode(), cast("Any", payload))
        await self.redis.xack(self.stream, GROUP, mid)
        await self.redis.xdel(self.stream, mid)


def json_n(fields: dict[bytes, bytes]) -> int:
    return int(json.loads(fields[b"metadata"])["n"])


def test_an_older_processor_without_reply_tokens_is_matched_by_the_entry_it_answered(
    ns: str,
) -> None:
    """The same reuse of frame id X, answered by a processor whose replies carry no
    ``reply_token``: its late reply to request 1 (an entry the registry remembers as an ended
    request's) is dropped, its reply to request 2 resolves request 2."""

    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        old = OldProcessor(redis, ns)
        try:
            await old.register()
            async with ProcessorRegistry(
                REDIS_URL, ns, heartbeat_timeout=60, result_timeout=60
            ) as registry:
                await registry.wait_for_processor("cap", timeout=10)
                first = asyncio.create_task(registry.call(entry("X", 1), "cap", timeout=0.5))
                mid1, fields1 = await old.read()
                with pytest.raises(ResultTimeoutError):
                    await first
                second = asyncio.create_task(registry.call(entry("X", 2), "cap", timeout=60))
                mid2, fields2 = await old.read()
                assert (json_n(fields1), json_n(fields2)) == (1, 2)

                await old.answer(mid1, fields1)  # late
                await wait_until_async(
                    "request 1's late reply read",
                    lambda: second.done() or dropped(registry) == 1,
                    10,
                )
                assert not second.done(), f"request 2 got {second.result()}"

                await old.answer(mid2, fields2)
                result = await asyncio.wait_for(second, 10)
                assert (result.frame_id, result.processor_id, result.data) == (
                    "X",
                    "old",
                    {"n": 2},
                )
                assert result.reply_token == ""
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


async def register_as(redis: Redis, ns: str, processor_id: str, capacity: int) -> None:
    """Register ``processor_id`` (capability ``cap``) as processors register."""
    keys = Keys(ns)
    await register(
        redis,
        keys,
        processor_id,
        capabilities=["cap"],
        capacity=capacity,
        stream=keys.frames(processor_id),
        result_stream=keys.results,
        in_flight=0,
        processed=0,
        failed=0,
    )


class OldServer:
    """A processor from before reply tokens that answers every frame as fast as it reads it:
    in a thread of its own, on a connection of its own, it reads up to 100 entries at a time
    and publishes each one's result (``{"n": n}``, without ``reply_token``), acknowledges and
    deletes them, in one pipeline per read."""

    def __init__(self, ns: str, processor_id: str = "old") -> None:
        self.id = processor_id
        self.stream = Keys(ns).frames(processor_id)
        self.answered: list[str] = []
        """The frame ids it answered, in order."""
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"old-{processor_id}")

    def __enter__(self) -> OldServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _serve(self) -> None:
        client = redis_sync.Redis.from_url(REDIS_URL)
        try:
            while not self._stop.is_set():
                got = client.xreadgroup(GROUP, self.id, {self.stream: ">"}, count=100, block=100)
                for _stream, items in got or []:
                    pipe = client.pipeline(transaction=False)
                    for mid, fields in items:
                        outcome = Outcome(ok=True, result_json=json.dumps({"n": json_n(fields)}))
                        payload = result_fields(self.id, mid, fields, outcome, None, 1.0)
                        payload.pop("reply_token", None)  # the older processor does not echo it
                        pipe.xadd(fields[b"reply_to"], cast("Any", payload))
                        pipe.xack(self.stream, GROUP, mid)
                        pipe.xdel(self.stream, mid)
                    pipe.execute()
                    self.answered += [f[b"frame_id"].decode() for _, f in items]
        except BaseException as exc:  # reported by the test's waits
            self.error = exc
        finally:
            client.close()

    def has_answered(self, count: int) -> bool:
        if self.error is not None:
            raise AssertionError(f"the older processor failed: {self.error!r}")
        return len(self.answered) >= count


def read_up(registry: ProcessorRegistry) -> bool:
    """Whether the registry's reply reader has read every reply on its stream so far."""
    client = redis_sync.Redis.from_url(REDIS_URL)
    try:
        last = client.xrevrange(registry.reply_stream, count=1)
    finally:
        client.close()
    return not last or text(last[0][0]) == text(registry._reader.read)


def answered_by_old(results: list[ProcessorResult]) -> list[tuple[str, str, Any]]:
    return [(r.frame_id, r.processor_id, r.data) for r in results]


def hold_entry_ids_back(
    monkeypatch: pytest.MonkeyPatch, registry: ProcessorRegistry, old: OldServer
) -> None:
    """Have the replies of the XADDs routing frames reach ``registry`` only once ``old``
    has answered those frames and the reply reader has read the answers, as the last replies
    of a long pipelined batch do: the router learns the frames' entry ids after their results
    (which happens by itself only in a race)."""
    send = registry._send

    async def send_then_wait(items: list[tuple[Any, dict[str, Any]]]) -> list[Any]:
        results = await send(items)
        frames = {text(fields["frame_id"]) for _, fields in items}
        await wait_until_async(
            f"{len(frames)} frame(s) answered and the answers read",
            lambda: frames <= set(old.answered) and read_up(registry),
            60,
            explain=lambda: (len(old.answered), old.error),
        )
        return results

    monkeypatch.setattr(registry, "_send", send_then_wait)


def test_an_older_processor_answering_a_route_many_batch_before_its_ids_are_known_is_taken(
    ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """route_many sends 1000 frames in one pipelined batch (the processor's capacity) to a
    processor from before reply tokens, which answers each as soon as it reads it: before the
    router has learnt the entry ids of the batch. Every reply is taken (its frame's capacity
    freed, none dropped), its circuit stays closed, and it takes the next call."""
    count = 1000

    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        try:
            await register_as(redis, ns, "old", capacity=count)
            with OldServer(ns) as old:
                async with ProcessorRegistry(
                    REDIS_URL, ns, heartbeat_timeout=60, result_timeout=120
                ) as registry:
                    await registry.wait_for_processor("cap", timeout=10)
                    hold_entry_ids_back(monkeypatch, registry, old)
                    ids = await registry.route_many(
                        [entry(f"F{i}", i) for i in range(count)], "cap", wait=60
                    )
                    assert len(ids) == count and old.answered == [f"F{i}" for i in range(count)]
                    assert dropped(registry) == 0
                    assert registry._routed == {}, f"{len(registry._routed)} frame(s) still held"
                    [info] = registry.processors()
                    assert (info.outstanding, info.circuit) == (0, "closed")
                    result = await registry.call(entry("next", count), "cap", timeout=30)
                    assert (result.frame_id, result.ok, result.data) == ("next", True, {"n": count})
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_calls_an_older_processor_answers_before_their_entry_ids_are_known_get_results(
    ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 concurrent calls to a processor from before reply tokens, each answered before the
    router learnt its entry id: every call gets its own result."""
    count = 20

    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        try:
            await register_as(redis, ns, "old", capacity=count)
            with OldServer(ns) as old:
                async with ProcessorRegistry(
                    REDIS_URL, ns, heartbeat_timeout=60, result_timeout=120
                ) as registry:
                    await registry.wait_for_processor("cap", timeout=10)
                    hold_entry_ids_back(monkeypatch, registry, old)
                    calls = [
                        registry.call(entry(f"F{i}", i), "cap", timeout=30) for i in range(count)
                    ]
                    results = await asyncio.wait_for(asyncio.gather(*calls), 60)
                    assert answered_by_old(results) == [
                        (f"F{i}", "old", {"n": i}) for i in range(count)
                    ]
                    assert dropped(registry) == 0
                    assert [i.outstanding for i in registry.processors()] == [0]
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 120))


async def in_stream(redis: Redis, ns: str, count: int) -> bool:
    """Whether ``count`` entries wait in the stream of ``doomed``."""
    return int(await redis.xlen(Keys(ns).frames("doomed"))) == count


@contextlib.asynccontextmanager
async def dead_with_frames(
    ns: str, count: int
) -> AsyncIterator[tuple[Redis, ProcessorRegistry, list[asyncio.Task[ProcessorResult]]]]:
    """A registry whose ``count`` calls (frames ``F<i>``, ``n`` = i) wait in the stream of
    ``doomed``, a processor that reads nothing: the test declares it dead. The registry's
    health watch sleeps (the test runs its ticks)."""
    redis = Redis.from_url(REDIS_URL)
    try:
        await register_as(redis, ns, "doomed", capacity=count)
        async with ProcessorRegistry(
            REDIS_URL, ns, registry_id="a", heartbeat_timeout=60, poll_interval=3600
        ) as registry:
            await registry.wait_for_processor("cap", timeout=10)
            calls = [
                asyncio.create_task(registry.call(entry(f"F{i}", i), "cap", timeout=60))
                for i in range(count)
            ]
            try:
                await wait_until_async(
                    "every frame routed", lambda: in_stream(redis, ns, count), 10
                )
                yield redis, registry, calls
            finally:
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await redis.aclose()


def test_frames_the_reaper_moves_to_an_older_processor_are_answered(
    ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead processor's 50 frames are moved by the reaper to a processor from before reply
    tokens, which answers them before the reaper learnt their new entry ids (the replies of
    the move scripts held back here until the reply reader read every answer): every call gets
    its result."""
    count = 50

    async def main() -> None:
        async with dead_with_frames(ns, count) as (redis, registry, calls):
            await register_as(redis, ns, "old", capacity=8)
            with OldServer(ns) as old:
                await registry.refresh()
                move = registry._reaper.rerouter._move

                async def move_then_wait(scripts: list[list[bytes | str]]) -> list[Any]:
                    results = await move(scripts)
                    await wait_until_async(
                        "every moved frame answered and read",
                        lambda: old.has_answered(count) and read_up(registry),
                        30,
                    )
                    return results

                monkeypatch.setattr(registry._reaper.rerouter, "_move", move_then_wait)
                await redis.hset(Keys(ns).proc("doomed"), "state", "dead")
                await registry._reaper.tick()
                results = await asyncio.wait_for(asyncio.gather(*calls), 30)
                assert answered_by_old(results) == [
                    (f"F{i}", "old", {"n": i}) for i in range(count)
                ]
                assert dropped(registry) == 0
                assert [
                    (i.processor_id, i.outstanding)
                    for i in registry.processors(include_departed=False)
                ] == [("old", 0)]

    asyncio.run(asyncio.wait_for(main(), 120))


def test_frames_another_registry_moves_to_an_older_processor_are_answered(ns: str) -> None:
    """Registry ``b`` reaps the dead processor holding registry ``a``'s 20 calls and moves
    them to a processor from before reply tokens: ``a`` never learns their new entries, and
    every call gets its result all the same."""
    count = 20

    async def main() -> None:
        async with dead_with_frames(ns, count) as (redis, a, calls):
            await register_as(redis, ns, "old", capacity=8)
            with OldServer(ns):
                await redis.hset(Keys(ns).proc("doomed"), "state", "dead")
                async with ProcessorRegistry(
                    REDIS_URL, ns, registry_id="b", heartbeat_timeout=60, poll_interval=3600
                ) as b:
                    await b._reaper.tick()
                    assert not b._routed
                # the announcements of the moves, on a's reply stream, give it an expiry
                assert 0 < await redis.ttl(a.reply_stream) <= REPLY_STREAM_TTL
                results = await asyncio.wait_for(asyncio.gather(*calls), 30)
                assert answered_by_old(results) == [
                    (f"F{i}", "old", {"n": i}) for i in range(count)
                ]
                assert dropped(a) == 0

    asyncio.run(asyncio.wait_for(main(), 120))


def test_the_reaper_moves_a_timed_out_request_and_a_newer_one_of_its_frame_id_apart(
    ns: str,
) -> None:
    """Request 1 of frame X times out in a processor that reads nothing; request 2 of X waits
    there too. The processor is declared dead and the reaper moves both entries to a processor
    from before reply tokens: the reply to request 1's entry is dropped (the reaper knew it
    for an ended request's), the reply to request 2's resolves request 2."""

    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        old = OldProcessor(redis, ns)
        try:
            await register_as(redis, ns, "doomed", capacity=4)
            async with ProcessorRegistry(
                REDIS_URL, ns, heartbeat_timeout=60, result_timeout=60, poll_interval=3600
            ) as registry:
                await registry.wait_for_processor("cap", timeout=10)
                with pytest.raises(ResultTimeoutError):
                    await registry.call(entry("X", 1), "cap", timeout=0.5)
                second = asyncio.create_task(registry.call(entry("X", 2), "cap", timeout=60))
                await wait_until_async("request 2 routed", lambda: in_stream(redis, ns, 2), 10)
                await old.register()
                await registry.refresh()
                await redis.hset(Keys(ns).proc("doomed"), "state", "dead")
                await registry._reaper.tick()
                mid1, fields1 = await old.read()
                mid2, fields2 = await old.read()
                assert (json_n(fields1), json_n(fields2)) == (1, 2)

                await old.answer(mid1, fields1)  # request 1's, late
                await wait_until_async(
                    "request 1's late reply read",
                    lambda: second.done() or dropped(registry) == 1,
                    10,
                )
                assert not second.done(), f"request 2 got {second.result()}"

                await old.answer(mid2, fields2)
                result = await asyncio.wait_for(second, 10)
                assert (result.frame_id, result.processor_id, result.data) == ("X", "old", {"n": 2})
                assert [
                    (i.processor_id, i.outstanding)
                    for i in registry.processors(include_departed=False)
                ] == [("old", 0)]
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_another_registry_moving_a_timed_out_request_keeps_its_late_reply_from_a_newer_one(
    ns: str,
) -> None:
    """Registry ``a``'s request 1 of frame X times out in a processor that reads nothing;
    request 2 of X waits there too. Registry ``b`` reaps the processor and moves both entries
    to a processor from before reply tokens. ``a`` learns the entries ``b`` gave them: the
    reply to request 1's is dropped, the reply to request 2's resolves request 2."""

    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        old = OldProcessor(redis, ns)
        try:
            await register_as(redis, ns, "doomed", capacity=4)
            async with ProcessorRegistry(
                REDIS_URL,
                ns,
                registry_id="a",
                heartbeat_timeout=60,
                result_timeout=60,
                poll_interval=3600,
            ) as a:
                await a.wait_for_processor("cap", timeout=10)
                with pytest.raises(ResultTimeoutError):
                    await a.call(entry("X", 1), "cap", timeout=0.5)
                second = asyncio.create_task(a.call(entry("X", 2), "cap", timeout=60))
                await wait_until_async("request 2 routed", lambda: in_stream(redis, ns, 2), 10)
                await old.register()
                await redis.hset(Keys(ns).proc("doomed"), "state", "dead")
                async with ProcessorRegistry(
                    REDIS_URL, ns, registry_id="b", heartbeat_timeout=60, poll_interval=3600
                ) as b:
                    await b._reaper.tick()
                mid1, fields1 = await old.read()
                mid2, fields2 = await old.read()
                assert (json_n(fields1), json_n(fields2)) == (1, 2)
                assert text(fields1[b"rerouted_from"]) == "doomed"

                await old.answer(mid1, fields1)  # request 1's, late
                await wait_until_async(
                    "request 1's late reply read",
                    lambda: second.done() or dropped(a) == 1,
                    10,
                )
                assert not second.done(), f"request 2 got {second.result()}"

                await old.answer(mid2, fields2)
                result = await asyncio.wait_for(second, 10)
                assert (result.frame_id, result.processor_id, result.data) == ("X", "old", {"n": 2})
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_record_of_ended_requests_is_bounded_and_forgets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The entries of ended requests are kept for the latest ``frames`` frame ids, each for
    ``ttl`` seconds after a request of it last ended, at most 16 per frame id."""
    now = [1000.0]
    monkeypatch.setattr(replies.time, "monotonic", lambda: now[0])
    ended = replies.Ended(frames=2, ttl=60)
    ended.add("A", [("p", "1-0"), ("q", "")])  # an entry id not known yet is not kept
    assert ("p", "1-0") in ended.of("A") and ("q", "") not in ended.of("A")
    ended.add("B", [("p", "2-0")])
    ended.add("A", [("p", "3-0")])  # A ended again: the latest
    ended.add("C", [("p", "4-0")])  # B, the oldest, is forgotten
    assert list(ended.of("A")) == [("p", "1-0"), ("p", "3-0")]
    assert not ended.of("B") and ended.of("C")
    now[0] += 61
    assert not ended.of("A") and not ended.of("C")
    ended.add("D", [("p", f"{i}-0") for i in range(20)])
    assert list(ended.of("D")) == [("p", f"{i}-0") for i in range(4, 20)]


def test_a_reply_stream_left_behind_by_a_stopped_registry_expires(ns: str) -> None:
    """A registry removes its reply stream when it stops, but a processor still working on
    one of its frames answers afterwards and so makes the stream again: every reply (and
    every announcement of a reaper) gives the stream an expiry, so one whose registry is gone
    (stopped, or killed) does not stay in Redis for good."""

    async def main() -> None:
        gated = Gated(ns)
        redis = Redis.from_url(REDIS_URL)
        try:
            async with serving(gated):
                async with ProcessorRegistry(
                    REDIS_URL, ns, heartbeat_timeout=60, result_timeout=60
                ) as registry:
                    await registry.wait_for_processor("cap", timeout=10)
                    reply_stream = registry.reply_stream
                    with pytest.raises(ResultTimeoutError):
                        await registry.call(entry("X", 1), "cap", timeout=0.5)
                    await wait_until_async("request 1 started", lambda: gated.started == [1], 10)
                assert not await redis.exists(reply_stream)  # removed at stop
                gated.release(1)  # the late reply, to a registry that has stopped
                await wait_until_async(
                    "the late reply written", lambda: redis.exists(reply_stream), 10
                )
                ttl = await redis.ttl(reply_stream)
                assert 0 < ttl <= REPLY_STREAM_TTL
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


class Recording(ProcessorClient):
    """An in-process processor that records the frames it is given; its result is
    ``{"ok": frame_id}``."""

    def __init__(self, ns: str) -> None:
        super().__init__("recording", ["cap"], capacity=4, **in_process(ns))
        self.given: list[str] = []

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        frame_id = frame_data[b"frame_id"].decode()
        self.given.append(frame_id)
        return {"ok": frame_id}


async def victims(redis: Redis, ns: str, other: str) -> dict[str, Any]:
    """Keys a hostile ``reply_to`` could name, each made here: another namespace's processor
    stream and reply stream, and this namespace's set of processors. None expires."""
    made = {
        Keys(other).frames("p"): "stream",
        Keys(other).replies("r"): "stream",
        Keys(ns).processors: "set",
    }
    for key, kind in made.items():
        if kind == "stream":
            await redis.xadd(key, {"kept": "1"})
    return {key: await snapshot(redis, key) for key in made}


async def snapshot(redis: Redis, key: str) -> tuple[Any, ...]:
    """What is to stay unchanged of ``key``: its type, expiry and (a stream) entries."""
    kind = text(await redis.type(key))
    entries = await redis.xrange(key) if kind == "stream" else None
    return (kind, await redis.ttl(key), entries)


def test_a_processor_refuses_a_reply_to_that_is_not_a_reply_stream_of_its_namespace(
    ns: str,
) -> None:
    """Frame entries whose ``reply_to`` names a key other than a reply stream of the
    processor's namespace (another namespace's streams, its own set of processors, the bare
    ``replies:`` prefix) are malformed: the key is neither written nor given an expiry,
    ``process_frame`` is not run, and each entry gets an ``input`` error result on the result
    stream and is acknowledged. An entry naming a reply stream of the namespace is answered
    there."""

    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        processor = Recording(ns)
        try:
            with redis_namespace("fptest:") as other:
                before = await victims(redis, ns, other)
                async with serving(processor):
                    # the victims first, so the processor's own registration is in the set
                    before[Keys(ns).processors] = await snapshot(redis, Keys(ns).processors)
                    stream = Keys(ns).frames(processor.processor_id)
                    hostile = [*before, Keys(ns).replies("")]
                    for i, target in enumerate(hostile):
                        await redis.xadd(
                            stream, {**entry(f"bad{i}", i), "metadata": "{}", "reply_to": target}
                        )
                    good = Keys(ns).replies("r1")
                    await redis.xadd(
                        stream, {**entry("good", 0), "metadata": "{}", "reply_to": good}
                    )

                    async def answered_all() -> list[ProcessorResult]:
                        got = await redis.xrange(Keys(ns).results)
                        results = [ProcessorResult.from_fields(f) for _, f in got]
                        return results if len(results) == len(hostile) + 1 else []

                    answered = await wait_until_async("every entry answered", answered_all, 10)
                    assert await redis.xlen(stream) == 0
                    assert processor.given == ["good"]
                    refused = [r for r in answered if not r.ok]
                    assert [r.frame_id for r in refused] == [f"bad{i}" for i in range(len(hostile))]
                    for result, target in zip(refused, hostile, strict=True):
                        assert result.error_kind == "input"
                        assert f"reply_to {target!r} is not a reply stream" in (result.error or "")
                    assert not (await redis.xpending(stream, GROUP))["pending"]
                    after = {key: await snapshot(redis, key) for key in before}
                    assert after == before
                    [(_mid, reply)] = await redis.xrange(good)
                    assert ProcessorResult.from_fields(reply).data == {"ok": "good"}
                    assert 0 < await redis.ttl(good) <= REPLY_STREAM_TTL
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_reaper_writes_nothing_to_a_reply_to_that_is_not_a_reply_stream_of_its_namespace(
    ns: str,
) -> None:
    """A dead processor's entries name another namespace's stream as ``reply_to``, with a
    reply token: the reaper moves the one with attempts left to a live processor without
    announcing the move there, and gives up the other without answering there; the stream
    is neither written nor given an expiry."""

    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        try:
            with redis_namespace("fptest:") as other:
                victim = Keys(other).frames("p")
                await redis.xadd(victim, {"kept": "1"})
                before = await snapshot(redis, victim)
                await register_as(redis, ns, "doomed", capacity=4)
                await register_as(redis, ns, "alive", capacity=4)
                doomed = Keys(ns).frames("doomed")
                hostile = {"metadata": "{}", "reply_to": victim, "reply_token": "t"}
                await redis.xadd(doomed, {**entry("moved", 1), **hostile})
                await redis.xadd(
                    doomed, {**entry("lost", 2), **hostile, "attempt": "2", "max_attempts": "1"}
                )
                async with ProcessorRegistry(
                    REDIS_URL, ns, heartbeat_timeout=60, poll_interval=3600
                ) as registry:
                    await registry.wait_for_processor("cap", timeout=10)
                    await redis.hset(Keys(ns).proc("doomed"), "state", "dead")
                    await registry._reaper.tick()
                assert await redis.xlen(doomed) == 0
                [(_mid, moved)] = await redis.xrange(Keys(ns).frames("alive"))
                assert text(moved[b"frame_id"]) == "moved"
                assert await snapshot(redis, victim) == before
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_health_watch_and_its_rerouting_have_one_registry_and_keep_their_names() -> None:
    """The health watch's registry is one attribute shared with the re-routing it does (a
    registry given to it later is the one reaped through), ``Reaper.reap`` is what the watch
    calls (a subclass's override runs), and the Lua scripts' names are still importable from
    ``reaper``."""
    from framepipe.processors.fleet import reaper as reaper_module
    from framepipe.processors.fleet.breaker import CircuitBreaker
    from framepipe.processors.fleet.keys import Keys, ProcessorState
    from framepipe.processors.fleet.registry import Registration
    from framepipe.processors.fleet.rerouting import MOVE_LUA, REAPER, TAKE_NEW_LUA

    first = ProcessorRegistry("redis://127.0.0.1:6379/0")
    second = ProcessorRegistry("redis://127.0.0.1:6379/0")
    watch = first._reaper
    watch.registry = second
    assert watch.rerouter.registry is second
    assert (reaper_module.REAPER, reaper_module.TAKE_NEW_LUA, reaper_module.MOVE_LUA) == (
        REAPER,
        TAKE_NEW_LUA,
        MOVE_LUA,
    )
    reaped: list[str] = []

    class Counting(reaper_module.Reaper):
        async def reap(self, proc: Registration) -> None:
            reaped.append(proc.id)

    stopped = Registration("p", Keys(), CircuitBreaker.__new__(CircuitBreaker))
    stopped.state = ProcessorState.STOPPED
    asyncio.run(Counting(second).check(None, stopped, 0.0))  # type: ignore[arg-type]
    assert reaped == ["p"]
