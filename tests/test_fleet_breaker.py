"""A processor's circuit breaker counts each request once, by how it ended, with an in-process
processor on the real Redis: a request that timed out counted as a failure, and its result
arriving afterwards (late) counts for nothing. So a processor that answers every frame, but
each after the caller gave up, has its circuit opened by its timeouts; and a late error does
not count a second failure for a request whose timeout counted already.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest

from conftest import REDIS_URL

pytest.importorskip("redis")

from framepipe.errors import CircuitOpenError, ResultTimeoutError
from framepipe.processors import ProcessorClient, ProcessorRegistry
from test_fleet_recovery import in_process
from test_fleet_replies import dropped, entry, serving
from waiting import wait_until_async


class Late(ProcessorClient):
    """An in-process processor that holds request ``n`` until ``release(n)``, then answers it:
    ``{"n": n}``, or an error when ``release(n, fail=True)``."""

    def __init__(self, ns: str) -> None:
        super().__init__("late", ["cap"], capacity=4, **in_process(ns), shutdown_timeout=2.0)
        self.gates: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.failing: set[int] = set()
        self.started: list[int] = []

    def release(self, n: int, *, fail: bool = False) -> None:
        if fail:
            self.failing.add(n)
        self.gates[n].set()

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        n = int(self.metadata(frame_data)["n"])
        self.started.append(n)
        await self.gates[n].wait()
        if n in self.failing:
            raise RuntimeError(f"request {n} failed")
        return {"n": n}


def circuit(registry: ProcessorRegistry) -> tuple[str, int]:
    """The processor's circuit state and the consecutive failures its breaker counted."""
    [info] = registry.processors(include_departed=False)
    return info.circuit, info.consecutive_failures


async def time_out_then_answer(
    registry: ProcessorRegistry, late: Late, n: int, *, fail: bool = False
) -> None:
    """Request ``n`` times out (the processor holds it), then its late result is read."""
    with pytest.raises(ResultTimeoutError):
        await registry.call(entry(f"F{n}", n), "cap", timeout=0.3)
    await wait_until_async(f"request {n} started", lambda: n in late.started, 10)
    before = dropped(registry)
    late.release(n, fail=fail)
    await wait_until_async(
        f"request {n}'s late result read", lambda: dropped(registry) == before + 1, 10
    )


def test_late_successes_do_not_keep_the_circuit_of_a_processor_that_times_out_closed(
    ns: str,
) -> None:
    """circuit_failures=2: two requests time out, each answered successfully afterwards. The
    late successes count for nothing: the two timeouts open the circuit, and the next call is
    refused at once."""

    async def main() -> None:
        late = Late(ns)
        async with (
            serving(late),
            ProcessorRegistry(
                REDIS_URL,
                ns,
                heartbeat_timeout=60,
                circuit_failures=2,
                circuit_reset=3600,
                poll_interval=3600,
            ) as registry,
        ):
            await registry.wait_for_processor("cap", timeout=10)
            await time_out_then_answer(registry, late, 1)
            assert circuit(registry) == ("closed", 1)
            await time_out_then_answer(registry, late, 2)
            assert circuit(registry) == ("open", 2)
            with pytest.raises(CircuitOpenError):
                await registry.call(entry("F3", 3), "cap", timeout=10)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_late_error_does_not_count_a_second_failure_for_a_request_that_timed_out(
    ns: str,
) -> None:
    """circuit_failures=2: one request times out (one failure) and then reports an error. Its
    failure was counted once: the circuit stays closed, and the next request is answered."""

    async def main() -> None:
        late = Late(ns)
        async with (
            serving(late),
            ProcessorRegistry(
                REDIS_URL,
                ns,
                heartbeat_timeout=60,
                circuit_failures=2,
                circuit_reset=3600,
                poll_interval=3600,
            ) as registry,
        ):
            await registry.wait_for_processor("cap", timeout=10)
            await time_out_then_answer(registry, late, 1, fail=True)
            assert circuit(registry) == ("closed", 1)
            late.release(2)
            result = await registry.call(entry("F2", 2), "cap", timeout=30)
            assert (result.ok, result.data) == (True, {"n": 2})
            assert circuit(registry) == ("closed", 0)

    asyncio.run(asyncio.wait_for(main(), 60))
