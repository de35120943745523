"""The circuit breaker across a Redis restart, on a redis-server of the test's own: frames lost
with Redis's data are not counted against the processor they were sent to, so a healthy
processor's circuit stays closed.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

redis_sync = pytest.importorskip("redis")

from fleet_processes import Processor, entry, processor_script  # noqa: E402
from framepipe.errors import ResultTimeoutError  # noqa: E402
from framepipe.processors import ProcessorRegistry  # noqa: E402
from waiting import wait_until_async  # noqa: E402

if TYPE_CHECKING:
    from redis_servers import PrivateRedis

pytestmark = pytest.mark.slow


def test_frames_lost_in_a_redis_restart_do_not_open_a_healthy_processors_circuit(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """Eight frames wait in the processor's stream, not read yet (the processor is held with
    SIGSTOP), when Redis restarts without persistence and loses them. Their calls time out
    (more than ``circuit_failures``, 5); those timeouts are not the processor's: its circuit
    stays closed, and the next frame is answered once the processor is back."""

    async def main() -> None:
        ns = "fptest:"
        solo = Processor(processor_script(tmp_path), ns, capacity=10)
        solo.cfg["url"] = private_redis.url
        await solo.start()
        stream = f"{ns}proc:solo:frames"
        client = redis_sync.Redis.from_url(private_redis.url)
        try:
            async with ProcessorRegistry(
                private_redis.url,
                ns,
                heartbeat_timeout=60,
                circuit_failures=5,
                poll_interval=0.2,
            ) as registry:
                await registry.wait_for_processor("cap", timeout=15)
                assert solo.proc is not None
                solo.proc.send_signal(signal.SIGSTOP)  # it reads nothing more for now
                calls = [
                    asyncio.ensure_future(registry.call(entry(f"lost-{n}"), "cap", timeout=4.0))
                    for n in range(8)
                ]
                await wait_until_async("eight frames wait", lambda: client.xlen(stream) == 8, 10)
                await asyncio.to_thread(private_redis.restart)  # its data is gone
                solo.proc.send_signal(signal.SIGCONT)
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                # (one may have reached the processor's socket before it stopped: answered)
                timeouts = [o for o in outcomes if isinstance(o, ResultTimeoutError)]
                assert len(timeouts) >= 6, outcomes
                assert [(p.processor_id, p.circuit) for p in registry.processors()] == [
                    ("solo", "closed")
                ]
                await registry.wait_for_processor("cap", timeout=15)  # registered again
                result = await registry.call(entry("after"), "cap", timeout=10)
                assert result.ok and result.processor_id == "solo"
        finally:
            client.close()
            await solo.finish()

    asyncio.run(asyncio.wait_for(main(), 90))
