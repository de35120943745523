"""Replies matched to the request that produced them, on the real Redis: a caller that reuses a
frame id after a timeout gets its own result, never the late reply of the earlier request under
that id; a processor from before reply tokens (its reply does not echo ``reply_token``) is
matched by the entry it answered, so its current replies are taken and its late ones dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import numpy as np
import pytest

from conftest import REDIS_URL, redis_namespace

redis_sync = pytest.importorskip("redis")

from redis.asyncio import Redis  # noqa: E402

from framepipe.errors import ResultTimeoutError  # noqa: E402
from framepipe.frames import encode_jpeg  # noqa: E402
from framepipe.processors import ProcessorClient, ProcessorRegistry  # noqa: E402
from framepipe.processors.fleet.protocol import GROUP, Keys, Outcome, result_fields  # noqa: E402
from framepipe.processors.fleet.registry import register  # noqa: E402
from waiting import wait_until_async  # noqa: E402

JPEG = encode_jpeg(np.zeros((8, 8, 3), np.uint8))


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh namespace on the real Redis; its keys are deleted afterwards."""
    with redis_namespace("fptest:") as namespace:
        yield namespace


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
            redis_url=REDIS_URL,
            namespace=ns,
            health_interval=0.2,
            image_encoding="raw",
            result_stream=f"{ns}results",
            environ={},
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
    ``reply_token``: its late reply to request 1 (another entry of its stream) is dropped, its
    reply to request 2 resolves request 2."""

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
