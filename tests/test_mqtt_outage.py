"""A long MQTT broker outage in the sink's log: one warning when it begins, one line when the
broker answers again, whatever the number of reconnect tries between (a broker down for a day
must not write a warning every few seconds). A private ``mosquitto`` is stopped and started.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from framepipe.backoff import Backoff
from framepipe.mqtt import MqttEventSink
from test_mqtt import PrivateMosquitto, unique_prefix
from waiting import wait_until_async


@pytest.mark.slow
def test_a_broker_outage_is_one_warning_and_one_line_when_it_ends(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    broker = PrivateMosquitto(tmp_path / "mosquitto")
    broker.start()
    logs.set_level(logging.DEBUG, logger="framepipe")
    url = f"mqtt://door:MqttPw0rd@127.0.0.1:{broker.port}/{unique_prefix('outage')}"

    def tries() -> list[logging.LogRecord]:
        return [r for r in logs.records if "reconnecting in" in r.getMessage()]

    async def main() -> MqttEventSink:
        sink = MqttEventSink(url, backoff=Backoff(0.01, 1.0, 0.01, 0))
        sink("visitor.known", {"camera": "front_door"})
        await wait_until_async("connected", lambda: sink.connected)
        broker.stop()
        sink("visitor.known", {"camera": "front_door"})
        await wait_until_async("20 failed tries", lambda: len(tries()) >= 20, 60)
        broker.start()
        await wait_until_async("connected again", lambda: sink.connects >= 2, 60)
        await wait_until_async("the queued event published", lambda: sink.published >= 2)
        await sink.aclose()
        return sink

    try:
        sink = asyncio.run(main())
    finally:
        broker.stop()
    assert sink.dropped == 0
    warnings = [r for r in tries() if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    again = [r.getMessage() for r in logs.records if "reachable again" in r.getMessage()]
    assert len(again) == 1 and "failed tries" in again[0]
    assert "MqttPw0rd" not in logs.text
