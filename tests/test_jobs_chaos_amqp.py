"""Chaos on RabbitMQ itself, through the delivery (``framepipe.jobs.delivery.amqp``): a private
node under a resource alarm (its disk limit raised above the free space, as a full disk does)
blocks every connection that publishes. A worker's publications then fail after the timeout,
but the steps it took stay its own to settle: consuming and acknowledging go on."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokers import PrivateRabbitMQ
from framepipe.errors import BrokerError
from framepipe.jobs.delivery import Delivery, Received, open_delivery
from waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]


@pytest.fixture
def rabbit() -> Iterator[PrivateRabbitMQ]:
    node = PrivateRabbitMQ()
    try:
        node.start()
        yield node
    finally:
        node.stop()


def rabbitmqctl(node: PrivateRabbitMQ, *args: str) -> None:
    ctl = Path(node.binary).with_name("rabbitmqctl")
    subprocess.run(
        [str(ctl), "-n", node.env["RABBITMQ_NODENAME"], *args],
        env=node.env,
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_a_resource_alarm_blocks_publishing_not_consuming(rabbit: PrivateRabbitMQ) -> None:
    namespace = f"fp-alarm-{uuid.uuid4().hex[:6]}:"
    run = uuid.uuid4().hex[:8]
    feeder = open_delivery(rabbit.url, namespace, timeout=3.0)
    worker = open_delivery(rabbit.url, namespace, timeout=3.0)
    try:
        feeder.publish([Delivery(run, "a")])
        feeder.publish([Delivery(f"{run}-2", "b")])  # a message of its own
        taken: list[Received] = []
        wait_until(
            "the worker to take both steps",
            lambda: taken.extend(worker.take("w", 2, wait=0.2, window=2)) or len(taken) == 2,
        )
        rabbitmqctl(rabbit, "set_disk_free_limit", "1000000GB")
        with pytest.raises(BrokerError, match="publishing 1 step"):
            worker.publish([Delivery(run, "spawned")])  # held by the alarm until the timeout
        worker.ack(taken)  # what it took is still its own to settle
        rabbitmqctl(rabbit, "set_disk_free_limit", "50MB")
        probe = open_delivery(rabbit.url, namespace, timeout=3.0)
        try:
            # Nothing was given back to the queue: both were acknowledged, none redelivered.
            wait_until(
                "the queue to hold nothing (unacknowledged messages would be requeued)",
                lambda: probe.backlog().waiting == 0 and not probe.take("p", 1, wait=0.5, window=1),
                timeout=15,
            )
        finally:
            probe.close()
    finally:
        feeder.close()
        worker.close()
