"""``/metrics`` reads the job broker's backlog at each scrape: ``framepipe_broker_backlog``
(lag, pending) and ``framepipe_broker_backlog_up``, 0 when it could not be read, so an
autoscaler tells "cannot see" from "empty"; that is said once in the log, and once when the
backlog is read again."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REDIS_URL, redis_namespace
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.jobs.delivery import open_delivery
from framepipe.jobs.rounds import Delivery
from framepipe.server.metrics import jobs_registry
from redis_servers import PrivateRedis

pytestmark = pytest.mark.redis


def _broker_samples(registry: object) -> dict[str, float]:
    text = generate_latest(registry).decode()  # type: ignore[arg-type]
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("framepipe_broker_backlog"):
                kind = sample.labels.get("kind")
                found[sample.name + (f"[{kind}]" if kind else "")] = sample.value
    return found


def test_the_backlog_is_read_at_each_scrape(tmp_path: Path) -> None:
    with redis_namespace("fp-metrics-") as namespace:
        settings = Settings(
            home=tmp_path,
            database_url=f"sqlite:///{tmp_path / 'state.db'}",
            broker_url=REDIS_URL,
            broker_namespace=namespace,
        )
        delivery = open_delivery(REDIS_URL, namespace)
        delivery.prepare()
        delivery.publish([Delivery("e1", "a"), Delivery("e1", "b"), Delivery("e2", "a")])
        delivery.close()
        with StateStore(settings.resolved_database_url) as store:
            found = _broker_samples(jobs_registry(store, settings))
    assert found == {
        "framepipe_broker_backlog[lag]": 3.0,
        "framepipe_broker_backlog[pending]": 0.0,
        "framepipe_broker_backlog_up": 1.0,
    }


def test_a_backlog_that_cannot_be_read_is_not_shown_as_empty(
    tmp_path: Path, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="framepipe")
    settings = Settings(
        home=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        broker_url=private_redis.url,
        broker_namespace="fp-metrics",
    )
    with StateStore(settings.resolved_database_url) as store:
        registry = jobs_registry(store, settings)
        private_redis.stop()
        for _ in range(3):
            assert _broker_samples(registry) == {"framepipe_broker_backlog_up": 0.0}
        said = [r for r in caplog.records if "backlog cannot be read" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING
        assert f"127.0.0.1:{private_redis.port}" in said[0].getMessage()
        private_redis.start()
        found = _broker_samples(registry)
    assert found["framepipe_broker_backlog_up"] == 1.0
    assert found["framepipe_broker_backlog[lag]"] == 0.0
    assert [r for r in caplog.records if "backlog is read again" in r.getMessage()]
