"""The detector relay (a service's detectors reached from ``framepipe worker`` processes through
Redis) with Redis going away: one warning for an outage, however long, one line when Redis is
back, and requests relayed again after it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from framepipe.errors import DetectorUnavailableError
from framepipe.server.detector import DetectorHub
from framepipe.server.detector_relay import Relay, RemoteDetectorHub
from test_processors_remote import PrivateRedis

PASSWORD = "relay-secret-5e1f"


def _relay_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and "detector relay" in r.getMessage()
    ]


async def _until(what: str, condition: Callable[[], object]) -> None:
    """Poll ``condition`` every 0.05 s until true, at most 30 s; fail naming ``what``."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _sent_once_alive(remote: RemoteDetectorHub) -> bool:
    """``remote.send`` once the relay's heartbeat is there (the relay answers it)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await remote.send("session-1", {"type": "status"})
        except DetectorUnavailableError:
            assert time.monotonic() < deadline, "the relay's heartbeat never appeared"
            await asyncio.sleep(0.05)


@pytest.mark.slow  # a redis-server of its own, stopped and started again
def test_a_redis_outage_is_logged_once_and_the_relay_answers_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framepipe")
    server = PrivateRedis(tmp_path, password=PASSWORD)
    server.start()

    async def scenario() -> None:
        hub = DetectorHub("relayed")
        relay = Relay(hub, server.url, "relaytest")
        remote = RemoteDetectorHub(hub.id, server.url, "relaytest")
        await relay.start()
        try:
            # No detector holds the session: the hub's answer, relayed, is "not sent".
            assert await _sent_once_alive(remote) is False
            assert _relay_lines(caplog, logging.WARNING) == []

            await asyncio.to_thread(server.stop)
            await _until("the outage warning", lambda: _relay_lines(caplog, logging.WARNING) != [])
            # Both loops keep trying (every 0.5, 1, 2 s...); the outage is not told again.
            await asyncio.sleep(4)
            [warning] = _relay_lines(caplog, logging.WARNING)
            assert f"Redis at redis://:***@127.0.0.1:{server.port}/0 does not answer" in warning
            assert "Error" in warning  # the error itself is named
            assert _relay_lines(caplog, logging.INFO) == []

            await asyncio.to_thread(server.start)
            await _until("the 'answers again' line", lambda: _relay_lines(caplog, logging.INFO))
            [back] = _relay_lines(caplog, logging.INFO)
            assert f"127.0.0.1:{server.port}/0 answers again" in back
            assert await _sent_once_alive(remote) is False  # relayed again
            assert len(_relay_lines(caplog, logging.WARNING)) == 1
        finally:
            await relay.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert not [r for r in caplog.records if PASSWORD in r.getMessage()]
