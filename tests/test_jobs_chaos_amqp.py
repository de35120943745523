"""Chaos on RabbitMQ itself, through the delivery (``framepipe.jobs.delivery.amqp``): a private
node under a resource alarm (its disk limit raised above the free space, as a full disk does)
blocks every connection that publishes. A worker's publications then fail after the timeout,
but the steps it took stay its own to settle: consuming and acknowledging go on. A node that
stops, or freezes, and comes back leaves no connection for aio-pika's finaliser to close."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from brokers import PrivateRabbitMQ
from framepipe.errors import BrokerError
from framepipe.jobs.delivery import Delivery, Received, StepDelivery, open_delivery
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


def rabbitmqctl(node: PrivateRabbitMQ, *args: str) -> str:
    ctl = Path(node.binary).with_name("rabbitmqctl")
    done = subprocess.run(
        [str(ctl), "-n", node.env["RABBITMQ_NODENAME"], *args],
        env=node.env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return done.stdout.decode()


def connections(node: PrivateRabbitMQ) -> dict[str, list[str]]:
    """The node's client connections: their addresses (``host:port -> host:port``) by the
    connection name the client gave."""
    found: dict[str, list[str]] = {}
    for conn in json.loads(
        rabbitmqctl(
            node, "-q", "list_connections", "name", "client_properties", "--formatter", "json"
        )
    ):
        props = {p[0]: p[2] for p in conn["client_properties"]}
        found.setdefault(props.get("connection_name", ""), []).append(conn["name"])
    return found


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


def test_consuming_leaves_the_publishing_connection_open(rabbit: PrivateRabbitMQ) -> None:
    # Opening the consuming connection (a worker's first take, or one after it was lost)
    # closed the publishing connection too: a publication under way was cut off ("the
    # connection closed") and the next one connected again.
    namespace = f"fp-conns-{uuid.uuid4().hex[:6]}:"
    run = uuid.uuid4().hex[:8]
    worker = open_delivery(rabbit.url, namespace, timeout=3.0)
    try:
        worker.publish([Delivery(run, "a")])
        publishing = connections(rabbit)["framepipe-publish"]
        wait_until(
            "the worker to take a step", lambda: bool(worker.take("w", 1, wait=0.2, window=1))
        )
        worker.publish([Delivery(run, "b")])
        now = connections(rabbit)
        assert now["framepipe-publish"] == publishing
        assert len(now["framepipe"]) == 1
    finally:
        worker.close()


@pytest.mark.parametrize("outage", ["stopped", "frozen"])
def test_an_outage_leaves_no_connection_to_aio_pikas_finaliser(
    rabbit: PrivateRabbitMQ, outage: str
) -> None:
    # An outage ends both connections under the delivery: RabbitMQ closes them (stopped), or
    # closing them is cut short by the timeout (frozen). One not closed here is closed later by
    # aio-pika's finaliser, in whichever thread collects it: no event loop runs there, and
    # Python prints "RuntimeWarning: coroutine 'Connection.close' was never awaited".
    namespace = f"fp-outage-{uuid.uuid4().hex[:6]}:"
    run = uuid.uuid4().hex[:8]
    worker = open_delivery(rabbit.url, namespace, timeout=2.0)
    try:
        worker.publish([Delivery(run, "a")])
        wait_until(
            "the worker to take a step", lambda: bool(worker.take("w", 1, wait=0.2, window=1))
        )
        worker.publish([Delivery(run, "b")])  # both connections open when the outage starts
        assert rabbit.proc is not None
        if outage == "stopped":
            rabbit.shutdown()
        else:
            os.killpg(rabbit.proc.pid, signal.SIGSTOP)
        with pytest.raises(BrokerError):
            worker.publish([Delivery(run, "c")])
        with pytest.raises(BrokerError):
            worker.backlog()
        if outage == "stopped":
            rabbit.start()
        else:
            os.killpg(rabbit.proc.pid, signal.SIGCONT)
        wait_until("publishing to work again", lambda: publishes(worker, Delivery(run, "c")))
        keys: list[str] = []
        wait_until(
            "the worker to take the step published after the outage",
            lambda: "c" in takes(worker, keys),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            collector = threading.Thread(target=gc.collect)  # a thread with no event loop
            collector.start()
            collector.join()
        assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
    finally:
        if rabbit.proc is not None:
            os.killpg(rabbit.proc.pid, signal.SIGCONT)
        worker.close()


def publishes(delivery: StepDelivery, step: Delivery) -> bool:
    try:
        delivery.publish([step])
    except BrokerError:
        return False
    return True


def takes(delivery: StepDelivery, keys: list[str]) -> list[str]:
    """``keys`` with those of the steps ``delivery`` takes now added (and acknowledged)."""
    taken = delivery.take("w", 3, wait=0.2, window=3)
    delivery.ack(taken)
    keys.extend(r.delivery.key for r in taken)
    return keys


def test_pausing_under_a_resource_alarm_keeps_the_consuming_connection(
    rabbit: PrivateRabbitMQ, caplog: pytest.LogCaptureFixture
) -> None:
    # Pausing gives back what was sent ahead: the steps left of a message partly taken are
    # published again, which the alarm blocks. That publication failing gives their whole
    # message back instead (no step lost), on the consuming connection, which stays: what the
    # worker took is still its own to settle. It was closed with the publishing one after the
    # call's timeout, and the pause failed.
    namespace = f"fp-alarm-{uuid.uuid4().hex[:6]}:"
    run = uuid.uuid4().hex[:8]
    feeder = open_delivery(rabbit.url, namespace, timeout=3.0)
    worker = open_delivery(rabbit.url, namespace, timeout=3.0)
    try:
        feeder.publish([Delivery(f"{run}-1", "first")])  # a message of its own
        feeder.publish([Delivery(run, f"k{i}") for i in range(4)])  # one message of 4 steps
        taken: list[Received] = []
        wait_until(
            "the worker to take 2 steps",
            lambda: (
                taken.extend(worker.take("w", 2 - len(taken), wait=0.2, window=16))
                or len(taken) == 2
            ),
        )
        assert [r.delivery.key for r in taken] == ["first", "k0"]
        consuming = connections(rabbit)["framepipe"]
        rabbitmqctl(rabbit, "set_disk_free_limit", "1000000GB")
        worker.pause()  # k1..k3 cannot be published again: their message goes back whole
        assert "3 step(s) handed back could not be published again" in caplog.text
        assert connections(rabbit)["framepipe"] == consuming
        worker.ack(taken)  # settled on the connection it was taken on
        rabbitmqctl(rabbit, "set_disk_free_limit", "50MB")
        probe = open_delivery(rabbit.url, namespace, timeout=3.0)
        try:
            keys: list[str] = []
            wait_until(
                "the message handed back whole to be taken again",
                lambda: set(takes(probe, keys)) >= {"k0", "k1", "k2", "k3"},
                timeout=15,
            )
            assert "first" not in keys  # acknowledged: not delivered again
        finally:
            probe.close()
    finally:
        feeder.close()
        worker.close()


def test_closing_a_delivery_whose_node_froze_says_what_it_left(
    rabbit: PrivateRabbitMQ, caplog: pytest.LogCaptureFixture
) -> None:
    # A frozen node answers no close. close() waited one timeout for the two closes, which
    # take up to four, then stopped the loop under them: it said nothing, and the client's
    # tasks were destroyed pending ("Task was destroyed but it is pending", "coroutine
    # 'Base.__closer' was never awaited" once collected).
    caplog.set_level(logging.WARNING)
    namespace = f"fp-close-{uuid.uuid4().hex[:6]}:"
    run = uuid.uuid4().hex[:8]
    worker = open_delivery(rabbit.url, namespace, timeout=2.0)
    assert rabbit.proc is not None
    try:
        worker.publish([Delivery(run, "a")])
        wait_until(
            "the worker to take a step", lambda: bool(worker.take("w", 1, wait=0.2, window=1))
        )
        os.killpg(rabbit.proc.pid, signal.SIGSTOP)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            worker.close()
            collector = threading.Thread(target=gc.collect)  # a thread with no event loop
            collector.start()
            collector.join()
        said = [r.getMessage() for r in caplog.records if "closed, leaving" in r.getMessage()]
        assert len(said) == 1, caplog.text
        assert "the consuming connection" in said[0] and "the publishing connection" in said[0]
        assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []
        assert "Task was destroyed" not in caplog.text
    finally:
        os.killpg(rabbit.proc.pid, signal.SIGCONT)
        worker.close()
