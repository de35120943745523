"""The RabbitMQ delivery and a quorum queue's delivery limit, on the real RabbitMQ: a message
given back often enough to near the limit (its ``x-delivery-count``) is said once, naming the
queue and the policy that raises the limit, and that policy, run as said, applies to the
queue."""

from __future__ import annotations

import json
import logging
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from brokers import broker_namespace
from framepipe.jobs.delivery import Delivery, Received, amqp_consuming, open_delivery
from framepipe.jobs.delivery.amqp import AmqpDelivery
from framepipe.jobs.delivery.amqp_consuming import policy_command, policy_target
from framepipe.jobs.delivery.amqp_wire import Taken, delivery_count

pytestmark = [pytest.mark.rabbitmq]


@pytest.fixture
def delivery() -> Iterator[AmqpDelivery]:
    with broker_namespace("rabbitmq", "fp-limit-") as (url, namespace):
        d = open_delivery(url, namespace, timeout=5.0)
        assert isinstance(d, AmqpDelivery)
        try:
            d.prepare()
            yield d
        finally:
            d.close()


def take_one(d: AmqpDelivery) -> Received:
    """The next step delivered (bounded wait)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = d.take("a", 1, wait=0.2, window=1)
        if got:
            return got[0]
    raise AssertionError("no step delivered within 10 s")


def limit_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "delivery-limit" in r.getMessage()]


def count_of(r: Received) -> int:
    """The ``x-delivery-count`` RabbitMQ gave the message ``r`` came in."""
    assert isinstance(r.receipt, Taken)
    return delivery_count(r.receipt.message)


def give_back_until(d: AmqpDelivery, count: int, caplog: pytest.LogCaptureFixture) -> Received:
    """Take the one step and hand it back until it comes with an ``x-delivery-count`` of
    ``count`` or more (nothing said about the limit before); the step as it came then."""
    for _ in range(3 * count):
        r = take_one(d)
        if count_of(r) >= count:
            return r
        assert limit_warnings(caplog) == [], f"said at a count of {count_of(r)}"
        d.hand_back([r])
    raise AssertionError(f"the count did not reach {count}")


def test_a_message_given_back_often_is_said_once_with_the_policy_that_raises_the_limit(
    delivery: AmqpDelivery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="framepipe")
    step = Delivery(uuid.uuid4().hex[:8], "work")
    delivery.publish([step])
    nearing = give_back_until(delivery, amqp_consuming.DELIVERY_COUNT_WARN, caplog)
    assert nearing.delivery == step
    warned = limit_warnings(caplog)
    assert len(warned) == 1, warned
    said = warned[0]
    assert f"quorum queue {delivery.queue}" in said
    assert f"came back {count_of(nearing)} time(s)" in said
    assert re.search(r"rabbitmqctl set_policy .* --apply-to (quorum_queues|queues)$", said), said
    for _ in range(3):
        delivery.hand_back([nearing])
        nearing = take_one(delivery)
    assert count_of(nearing) > amqp_consuming.DELIVERY_COUNT_WARN
    assert limit_warnings(caplog) == warned, "said more than once"
    delivery.ack([nearing])
    assert delivery.backlog().waiting == 0


def rabbitmqctl(*args: str) -> str:
    """rabbitmqctl's output; fails the test when the command fails."""
    ctl = shutil.which("rabbitmqctl")
    assert ctl is not None
    done = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr.strip()[:500]}"
    return done.stdout


@pytest.fixture
def ctl_usable() -> None:
    """rabbitmqctl is installed and may talk to the node (it needs the node's cookie)."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        pytest.skip("rabbitmqctl is not installed here")
    done = subprocess.run(
        [ctl, "list_policies"], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"rabbitmqctl is not usable here: {done.stderr.strip()[:200]}")


@pytest.mark.usefixtures("ctl_usable")
def test_the_policy_said_applies_to_the_queue(
    delivery: AmqpDelivery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="framepipe")
    delivery.publish([Delivery(uuid.uuid4().hex[:8], "work")])
    delivery.ack([give_back_until(delivery, amqp_consuming.DELIVERY_COUNT_WARN, caplog)])
    (said,) = limit_warnings(caplog)
    found = re.search(r"rabbitmqctl set_policy .*--apply-to \w+$", said)
    assert found is not None, said
    command = shlex.split(found.group(0))
    assert command[:3] == ["rabbitmqctl", "set_policy", "framepipe-steps"]
    policy = f"fp-test-limit-{uuid.uuid4().hex[:8]}"  # its own name: nothing shared is touched
    rabbitmqctl("set_policy", policy, *command[3:])  # as said, on this server's version
    try:
        (defined,) = [
            p
            for p in json.loads(rabbitmqctl("list_policies", "--formatter", "json"))
            if p["name"] == policy
        ]
        definition = defined["definition"]
        if isinstance(definition, str):
            definition = json.loads(definition)
        assert definition == {"delivery-limit": 1000}
        deadline = time.monotonic() + 10
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            rows = json.loads(rabbitmqctl("list_queues", "name", "policy", "--formatter", "json"))
            if any(r["name"] == delivery.queue and r["policy"] == policy for r in rows):
                break
            time.sleep(0.2)
        matched = [r["name"] for r in rows if r["policy"] == policy]
        assert matched == [delivery.queue], f"the policy applies to {matched}"
    finally:
        rabbitmqctl("clear_policy", policy)


@pytest.mark.parametrize(
    ("version", "target"),
    [
        ("3.10.8", "queues"),
        ("3.11.28", "queues"),
        ("3.12.0", "quorum_queues"),
        ("3.13.7", "quorum_queues"),
        ("4.1.2", "quorum_queues"),
        (None, "quorum_queues"),
    ],
)
def test_the_policy_said_targets_what_the_server_knows(version: str | None, target: str) -> None:
    # --apply-to quorum_queues came with RabbitMQ 3.12; older servers refuse it.
    assert policy_target(version) == target


@pytest.mark.parametrize(
    ("queue", "vhost"),
    [
        ("framepipe.steps", "/"),
        ("team's steps (prod)", "/"),
        ("framepipe.steps", "prod vhost"),
        ("a$b|c", "x'y"),
    ],
)
def test_the_policy_command_names_the_virtual_host_and_survives_any_queue_name(
    queue: str, vhost: str
) -> None:
    """The command said is pasted into a shell: a queue or virtual host name with quotes,
    spaces or regular-expression characters still gives one policy on that queue of that
    virtual host (a policy set on ``/`` does nothing for a queue of another one)."""
    command = shlex.split(policy_command(queue, vhost, "4.1.0"))
    assert command[:2] == ["rabbitmqctl", "set_policy"]
    if vhost == "/":
        assert "-p" not in command
        name, pattern, definition, *rest = command[2:]
    else:
        assert command[2:4] == ["-p", vhost]
        name, pattern, definition, *rest = command[4:]
    assert name == "framepipe-steps" and rest == ["--apply-to", "quorum_queues"]
    assert re.fullmatch(pattern, queue) and not re.fullmatch(pattern, queue + "x")
    assert json.loads(definition) == {"delivery-limit": 1000}
