"""Results and registrations written to Redis by hand, or by a processor in another language,
that do not follow the wire format, against the real Redis.

A result entry whose ``result`` is not a JSON object (not JSON, not UTF-8, an array, a string)
ends the request it answers at once with an ``output`` error naming what was wrong, instead of
leaving its caller waiting for the result timeout; one nested too deeply for the JSON parser
does so too, and the registry goes on taking results (its reply reader survives whatever an
entry holds). A ``duration_ms`` that is not a number does not cost a good result; a record
whose capabilities are nested too deeply is not routed to and stops nothing. A registration
whose heartbeat period is not a finite number, or is above ``MAX_PERIOD``, is declared dead by
the registry's ``heartbeat_timeout`` like one that gives none, its id is taken over by a
newcomer after three default periods (not watched forever), and a client refuses such a period
before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from conftest import REDIS_URL
from waiting import wait_until_async

pytest.importorskip("redis")

from redis.asyncio import Redis

from framepipe.frames import Frame
from framepipe.processors import ProcessorClient, ProcessorRegistry
from framepipe.processors.fleet import replies
from framepipe.processors.fleet.field_values import MAX_PERIOD
from framepipe.processors.fleet.keys import GROUP, Keys
from framepipe.processors.fleet.registry import register


@contextlib.asynccontextmanager
async def foreign_processor(
    ns: str, result: bytes, duration_ms: bytes = b"1.5", then: bytes | None = None
) -> AsyncIterator[None]:
    """A processor written without framepipe's client: it registers with the record's fields
    and answers the first frame on its reply stream with ``result`` as its ``result`` field,
    every later one with ``then`` (default: ``result`` again)."""
    redis = Redis.from_url(REDIS_URL)
    keys = Keys(ns)
    stream = keys.frames("foreign")
    await register(
        redis,
        keys,
        "foreign",
        capabilities=["x"],
        capacity=4,
        stream=stream,
        result_stream=f"{ns}results",
        in_flight=0,
        processed=0,
        failed=0,
    )

    async def answer() -> None:
        answers = [result]
        while True:
            reply = await redis.xreadgroup(GROUP, "foreign", {stream: ">"}, count=4, block=200)
            for _stream, entries in reply or []:
                for mid, fields in entries:
                    sent = answers.pop() if answers else (result if then is None else then)
                    await redis.xadd(
                        fields[b"reply_to"],
                        {
                            b"frame_id": fields[b"frame_id"],
                            b"status": b"ok",
                            b"processor_id": b"foreign",
                            b"reply_token": fields[b"reply_token"],
                            b"entry_id": mid,
                            b"result": sent,
                            b"duration_ms": duration_ms,
                        },
                    )
                    await redis.xack(stream, GROUP, mid)

    task = asyncio.create_task(answer())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await redis.aclose()


def frame() -> Frame:
    return Frame(image=np.zeros((16, 16, 3), np.uint8), source_id="cam", seq=1)


async def register_by_hand(
    redis: Redis, ns: str, processor_id: str, fields: dict[bytes, bytes], instance: str = ""
) -> None:
    """A record of ``processor_id`` (capability ``x``) with ``fields`` written over it, as a
    hand or another language might leave it; nothing beats for it afterwards."""
    keys = Keys(ns)
    await register(
        redis,
        keys,
        processor_id,
        capabilities=["x"],
        capacity=1,
        stream=keys.frames(processor_id),
        result_stream=f"{ns}results",
        in_flight=0,
        processed=0,
        failed=0,
        instance=instance,
    )
    await redis.hset(keys.proc(processor_id), mapping=fields)


class Idle(ProcessorClient):
    """A processor that answers nothing."""

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        return None


@pytest.mark.parametrize(
    ("result", "said"),
    [
        (b"{not json", "its result is not JSON"),
        (b'{"name": "\xff\xfe"}', "its result is not UTF-8 text"),
        (b"[1, 2]", "its result is a JSON array, not an object"),
        (b'"faces"', "its result is a JSON string, not an object"),
        (b"17", "its result is a JSON number, not an object"),
        (b"[" * 100_000, "its result is JSON nested too deeply to be read"),
    ],
)
def test_a_result_that_is_not_a_json_object_ends_its_call_with_an_output_error(
    ns: str, result: bytes, said: str
) -> None:
    async def main() -> None:
        async with (
            foreign_processor(ns, result),
            ProcessorRegistry(REDIS_URL, ns, result_timeout=120) as registry,
        ):
            await registry.wait_for_processor("x", timeout=15)
            answered = await registry.call(frame(), "x")
            assert not answered.ok
            assert answered.error_kind == "output"
            assert answered.error is not None and said in answered.error
            assert answered.processor_id == "foreign"
            assert answered.data is None

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_result_nested_too_deeply_leaves_the_registry_taking_results(ns: str) -> None:
    async def main() -> None:
        async with (
            foreign_processor(ns, b"[" * 100_000, then=b'{"faces": 1}'),
            ProcessorRegistry(REDIS_URL, ns, result_timeout=120) as registry,
        ):
            await registry.wait_for_processor("x", timeout=15)
            first = await registry.call(frame(), "x")
            assert first.error_kind == "output" and "nested too deeply" in (first.error or "")
            second = await registry.call(frame(), "x")
            assert second.ok and second.data == {"faces": 1}

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_reply_entry_whose_taking_fails_is_logged_not_the_end_of_the_registry(
    ns: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever taking one reply entry raises (here: tracing the result, made to fail once),
    the reader logs it and goes on: the call it answers gets its result, and later calls too."""
    failures = [RuntimeError("tracing exploded")]
    traced = replies.received

    def received_once(*args: Any) -> None:
        if failures:
            raise failures.pop()
        traced(*args)

    monkeypatch.setattr(replies, "received", received_once)

    async def main() -> None:
        async with (
            foreign_processor(ns, b'{"faces": 1}'),
            ProcessorRegistry(REDIS_URL, ns, result_timeout=120) as registry,
        ):
            await registry.wait_for_processor("x", timeout=15)
            for _ in range(2):
                answered = await registry.call(frame(), "x")
                assert answered.ok and answered.data == {"faces": 1}

    asyncio.run(asyncio.wait_for(main(), 30))
    assert not failures
    assert "taking it failed" in caplog.text and "tracing exploded" in caplog.text


def test_a_record_whose_capabilities_are_nested_too_deeply_is_not_routed_to(ns: str) -> None:
    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        await register_by_hand(redis, ns, "deep", {b"capabilities": b"[" * 100_000})
        try:
            async with (
                foreign_processor(ns, b'{"faces": 1}'),
                ProcessorRegistry(REDIS_URL, ns, result_timeout=30) as registry,
            ):
                await registry.wait_for_processor("x", timeout=15)
                for _ in range(3):
                    answered = await registry.call(frame(), "x")
                    assert answered.ok and answered.processor_id == "foreign"
                shown = {i.processor_id: i.capabilities for i in registry.processors()}
                assert shown.get("deep", ()) == () and shown["foreign"] == ("x",)
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 40))


def test_a_duration_that_is_not_a_number_does_not_cost_the_result(ns: str) -> None:
    async def main() -> None:
        async with (
            foreign_processor(ns, b'{"faces": 1}', duration_ms=b"fast"),
            ProcessorRegistry(REDIS_URL, ns, result_timeout=120) as registry,
        ):
            await registry.wait_for_processor("x", timeout=15)
            answered = await registry.call(frame(), "x")
            assert answered.ok
            assert answered.data == {"faces": 1}
            assert answered.duration_ms == 0.0

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("period", [b"inf", b"1e999", b"nan", b"-inf", b"1e300", b"301"])
def test_a_registration_whose_heartbeat_period_is_not_finite_is_declared_dead(
    ns: str, period: bytes
) -> None:
    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        await register_by_hand(redis, ns, "stuck", {b"health_interval": period})
        try:
            async with ProcessorRegistry(REDIS_URL, ns, heartbeat_timeout=1.0) as registry:
                await registry.wait_for_processor("x", timeout=15)
                await wait_until_async(
                    "the silent processor was never declared dead",
                    lambda: (
                        {i.processor_id: i.state for i in registry.processors()}.get("stuck")
                        == "dead"
                    ),
                    20,
                )
        finally:
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 40))


@pytest.mark.parametrize("period", [math.inf, math.nan, 0.0, -1.0])
def test_a_client_refuses_a_heartbeat_period_that_is_not_a_positive_number(period: float) -> None:
    with pytest.raises(ValueError, match="health_interval and poll_interval must be positive"):
        Idle("idle", ["x"], health_check_interval=period, environ={})
    with pytest.raises(ValueError, match="health_interval and poll_interval must be positive"):
        Idle("idle", ["x"], poll_interval=period, environ={})


def test_a_client_refuses_a_heartbeat_period_a_record_could_not_state() -> None:
    with pytest.raises(ValueError, match="health_interval at most 300"):
        Idle("idle", ["x"], health_check_interval=MAX_PERIOD + 1, environ={})
    Idle("idle", ["x"], health_check_interval=MAX_PERIOD, environ={})


@pytest.mark.slow
@pytest.mark.parametrize("period", [b"inf", b"1e300"])
def test_an_id_whose_record_has_a_heartbeat_period_that_is_not_finite_is_taken_over(
    ns: str, period: bytes
) -> None:
    """A record of the id, on another host, that never beats and says its period is infinite
    (or above ``MAX_PERIOD``): a client starting under the id takes it over after watching it
    for three default periods and a second (16 s), instead of watching it forever."""

    async def main() -> None:
        redis = Redis.from_url(REDIS_URL)
        fields = {b"health_interval": period, b"host": b"elsewhere", b"pid": b"4242"}
        await register_by_hand(redis, ns, "held", fields, instance="another-process")
        client = Idle("held", ["x"], redis_url=REDIS_URL, namespace=ns, environ={})
        serving = asyncio.create_task(client.start())
        try:
            await asyncio.wait_for(client.wait_registered(), 40)
            record = Keys(ns).proc("held")
            assert await redis.hget(record, b"instance") == client._instance.encode()
        finally:
            await client.stop()
            await asyncio.wait_for(serving, 30)
            await redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 90))
