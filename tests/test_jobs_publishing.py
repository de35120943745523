"""The job engine hands ready steps to the broker as it submits them; while the broker is away
the steps stay ready in the state store (the workers' sweep publishes them later), and the
engine says so once per outage, not once per submission, and once when the broker is back."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

import worker_pipelines as wp
from framepipe.config import Settings
from framepipe.jobs import JobEngine
from redis_servers import PrivateRedis

pytestmark = pytest.mark.redis


def test_a_broker_away_is_said_once_per_outage_and_once_when_back(
    tmp_path: Path, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        broker_url=private_redis.url,
        broker_namespace="fp-publishing",
    )
    caplog.set_level(logging.DEBUG, logger="framepipe")

    def said(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage()]

    async def main() -> None:
        async with JobEngine(settings=settings) as engine:
            private_redis.stop()
            for _ in range(4):
                await engine.submit(wp.chain, {"dir": str(tmp_path)})
            away = said("publish them again")
            assert len(away) == 1, [r.getMessage() for r in caplog.records]
            assert away[0].levelno == logging.WARNING
            assert "127.0.0.1" in away[0].getMessage()  # names the broker
            private_redis.start()
            for _ in range(2):
                await engine.submit(wp.chain, {"dir": str(tmp_path)})
            assert len(said("publish them again")) == 1
            assert len(said("the job broker takes steps again after")) == 1

    asyncio.run(main())


def test_a_bus_and_settings_given_to_the_engine_later_are_what_a_workers_submit_uses(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    """The hand-off to the workers reads the engine's bus and settings at each call: an
    engine given another bus (or settings, also after a first publish) submits with them."""
    import redis

    from framepipe.events import EventBus

    def settings(namespace: str) -> Settings:
        return Settings(
            home=tmp_path / "home",
            database_url=f"sqlite:///{tmp_path / 'state.db'}",
            broker_url=private_redis.url,
            broker_namespace=namespace,
        )

    heard: list[str] = []

    async def main() -> None:
        async with JobEngine(settings=settings("fp-first")) as engine:
            engine.bus = EventBus()
            engine.bus.add_listener(lambda event: heard.append(event.type))
            engine.settings = settings("fp-second")
            await engine.submit(wp.chain, {"dir": str(tmp_path)})
            engine.settings = settings("fp-third")  # after a first publish too
            await engine.submit(wp.chain, {"dir": str(tmp_path)})

    asyncio.run(main())
    assert "execution.created" in heard
    client = redis.Redis.from_url(private_redis.url)
    assert client.exists("fp-second:jobs:steps") and not client.exists("fp-first:jobs:steps")
    assert client.exists("fp-third:jobs:steps")
