"""The RabbitMQ delivery's consumer (``framepipe.jobs.delivery.amqp_consuming``) on the real
RabbitMQ: one whose prefetch is full of messages it took and has not settled is neither taken
for stuck nor sent more, however long it holds them; one that RabbitMQ delivers nothing to
though it has room is consumed again, and a new consumer never raises what it holds past its
prefetch."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator

import pytest

from brokers import broker_namespace
from framepipe.errors import BrokerError
from framepipe.jobs.delivery import Delivery, Received, amqp_consuming, open_delivery
from framepipe.jobs.delivery.amqp import AmqpDelivery
from waiting import wait_until

pytestmark = [pytest.mark.rabbitmq]

CHECK = 0.3
"""The check's interval here (``CHECK_AFTER``, 5 s in a worker)."""


@pytest.fixture
def delivery(monkeypatch: pytest.MonkeyPatch) -> Iterator[AmqpDelivery]:
    monkeypatch.setattr(amqp_consuming, "CHECK_AFTER", CHECK)
    with broker_namespace("rabbitmq", "fp-consumer-") as (url, namespace):
        d = open_delivery(url, namespace, timeout=5.0)
        assert isinstance(d, AmqpDelivery)
        try:
            d.prepare()
            yield d
        finally:
            d.close()


def one_step_messages(n: int) -> list[Delivery]:
    """``n`` steps of ``n`` executions: a message each."""
    return [Delivery(uuid.uuid4().hex[:8], "work") for _ in range(n)]


def take_until(d: AmqpDelivery, count: int, *, window: int, within: float = 10.0) -> list[Received]:
    """What ``d`` takes until it has ``count`` (or ``within`` seconds passed), holding all of
    it unsettled: more than a prefetch's worth never comes."""
    got: list[Received] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got += d.take("a", count - len(got), wait=0.1, window=window)
    return got


def take_for(d: AmqpDelivery, seconds: float, *, count: int, window: int) -> list[Received]:
    """Everything ``d`` takes in ``seconds``, asking for ``count`` at a time."""
    got: list[Received] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += d.take("a", count, wait=0.1, window=window)
    return got


def test_a_consumer_with_its_prefetch_held_unsettled_is_not_taken_for_stuck(
    delivery: AmqpDelivery, caplog: pytest.LogCaptureFixture
) -> None:
    # A window of 2 steps: a prefetch of 2 one-step messages. With 2 taken and held
    # unsettled, RabbitMQ sends nothing more while 4 wait: that is the prefetch at work, not
    # a consumer lost. Taking it for one warned and consumed again under a new tag, with a
    # fresh prefetch: 2 more messages, then 2 more...
    caplog.set_level(logging.WARNING, logger="framepipe")
    sent = one_step_messages(6)
    delivery.publish(sent)
    held = take_for(delivery, 1.0, count=2, window=2)
    assert len(held) == 2
    more = take_for(delivery, 8 * CHECK, count=2, window=2)
    assert more == [], f"given {len(more)} more while holding its prefetch's worth"
    assert "receives nothing" not in caplog.text
    assert delivery.backlog().waiting == 4
    delivery.ack(held)  # room again: the rest comes, 2 messages at a time
    rest: list[Received] = []
    deadline = time.monotonic() + 10
    while len(rest) < 4 and time.monotonic() < deadline:
        got = delivery.take("a", 2, wait=0.1, window=2)
        delivery.ack(got)
        rest += got
    assert sorted(r.delivery for r in held + rest) == sorted(sent)
    assert "receives nothing" not in caplog.text


def test_a_consumer_rabbitmq_delivers_nothing_to_though_it_has_room_consumes_again(
    delivery: AmqpDelivery, caplog: pytest.LogCaptureFixture
) -> None:
    # Its consumer gone without the delivery being told (as one left on a queue deleted and
    # declared again at once), while it holds one message of its prefetch of 2 (a window of
    # 2 one-step messages): the check finds messages waiting though there is room, says so,
    # and consumes again, with a prefetch of the one message it has room for, then the full
    # 2 once it holds nothing.
    caplog.set_level(logging.WARNING, logger="framepipe")
    sent = one_step_messages(6)
    delivery.publish(sent[:1])
    held = take_for(delivery, 0.5, count=2, window=2)
    assert len(held) == 1
    consuming = delivery._consuming

    async def lose_the_consumer() -> None:
        assert consuming._sub is not None and consuming._tag is not None
        raw = await consuming._sub.get_underlay_channel()
        await raw.basic_cancel(consuming._tag)  # RabbitMQ forgets it; the delivery does not

    delivery._call(lose_the_consumer, "losing the consumer")
    delivery.publish(sent[1:])
    got = take_for(delivery, 6 * CHECK, count=2, window=2)
    assert "receives nothing" in caplog.text
    assert len(got) == 1, "consumed again with room for one message only"
    delivery.ack(held + got)
    rest: list[Received] = []
    deadline = time.monotonic() + 10
    while len(rest) < 4 and time.monotonic() < deadline:
        taken = delivery.take("a", 2, wait=0.1, window=2)
        assert len(taken) <= 2
        delivery.ack(taken)
        rest += taken
    assert sorted(r.delivery for r in held + got + rest) == sorted(sent)


def test_a_grown_window_is_given_the_room_it_has_beside_what_was_taken(
    delivery: AmqpDelivery,
) -> None:
    # A window of 2 one-step messages, both taken and held; the window grows to 3: the
    # consumer made for it may hold one more message, not 3 more.
    sent = one_step_messages(6)
    delivery.publish(sent)
    held = take_for(delivery, 1.0, count=2, window=2)
    assert len(held) == 2
    more = take_for(delivery, 1.0, count=1, window=3)
    assert len(more) == 1
    delivery.ack(held + more)
    rest = take_for(delivery, 1.0, count=3, window=3)
    assert len(rest) == 3  # holds nothing: a full prefetch of 3
    delivery.ack(rest)


def test_the_prefetch_follows_the_window_in_steps(delivery: AmqpDelivery) -> None:
    # A window of 16 steps holds 16 one-step messages (steps made ready one by one), and one
    # message of 16 steps (a fan-out), as a worker pulling from Redis takes 16 steps. It held
    # 2 one-step messages (the prefetch counted messages of 16 steps, and one more).
    singles = one_step_messages(32)
    delivery.publish(singles)
    held = take_until(delivery, 16, window=16)
    assert len(held) == 16, "the window's worth of one-step messages, held at once"
    wait_until("the 16 others to wait in the queue", lambda: delivery.backlog().waiting == 16)
    delivery.ack(held)
    rest = take_until(delivery, 16, window=16)
    assert len(rest) == 16  # room again: the 16 others
    delivery.ack(rest)
    assert sorted(r.delivery for r in held + rest) == sorted(singles)
    # Then 16-step messages, larger than the recent ones: the prefetch of 16 messages brings
    # more than the window, once; the next take gives back what nobody touched and consumes
    # for messages of 16 steps: one at a time.
    fan_out = [Delivery("run-f", f"f{i}") for i in range(48)]
    delivery.publish(fan_out)
    first = take_until(delivery, 16, window=16)  # takes again once it has them
    assert len(first) == 16
    assert take_for(delivery, 0.5, count=16, window=16) == []  # the window is full: no more
    wait_until(
        "the 2 messages sent ahead and not touched to be back in the queue",
        lambda: delivery.backlog().waiting == 2,
    )
    delivery.ack(first)
    for _ in range(2):
        more = take_until(delivery, 16, window=16)
        assert len(more) == 16
        delivery.ack(more)
        first += more
    assert sorted(r.delivery for r in first) == sorted(fan_out)


def test_a_grown_window_keeps_the_steps_left_of_a_message_partly_taken(
    delivery: AmqpDelivery,
) -> None:
    # Consuming again gives back the messages sent ahead of which nothing was taken (a nack);
    # the steps left of one partly taken stay to be taken from it, not published again (a
    # resource alarm blocks publishing).
    a = [Delivery("run-a", f"a{i}") for i in range(16)]
    b = [Delivery("run-b", f"b{i}") for i in range(16)]
    delivery.publish(a)
    delivery.publish(b)
    first: list[Received] = []
    deadline = time.monotonic() + 5
    while len(first) < 2 and time.monotonic() < deadline:
        first += delivery.take("a", 2 - len(first), wait=0.1, window=16)
    assert [r.delivery for r in first] == a[:2]
    time.sleep(0.3)  # b's message is sent ahead too
    rest = take_for(delivery, 1.0, count=30, window=32)
    assert sorted(r.delivery for r in first + rest) == sorted(a + b)
    assert {id(r.receipt) for r in first + rest if r.delivery in a} == {id(first[0].receipt)}
    delivery.ack(first + rest)
    assert delivery.backlog().waiting == 0


@pytest.mark.parametrize("error", ["unknown delivery tag", "inequivalent declaration"])
def test_a_channel_error_costs_only_the_consuming_channel(
    delivery: AmqpDelivery, caplog: pytest.LogCaptureFixture, error: str
) -> None:
    # RabbitMQ closes a channel for a channel-level error (406 PRECONDITION_FAILED for an
    # acknowledgement of a tag it does not know, or a queue declared with other arguments),
    # sent on its own or answering a call. Only that channel is lost: the two connections stay,
    # the warning names the queue and the reply, and the messages the channel held come back
    # on a new channel. Before, an answered one closed both connections, and one sent on its
    # own left the consumer waiting on the closed channel for good.
    caplog.set_level(logging.WARNING, logger="framepipe")
    sent = one_step_messages(6)
    delivery.publish(sent)
    held = take_for(delivery, 1.0, count=1, window=2)
    assert held
    consuming, publishing = delivery._consuming.link.conn, delivery._publishing.link.conn
    sub = delivery._consuming._sub
    assert consuming is not None and publishing is not None and sub is not None

    async def provoke() -> None:
        raw = await sub.get_underlay_channel()
        if error == "unknown delivery tag":
            await raw.basic_ack(999_999, wait=False)
        else:
            await raw.queue_declare(delivery.queue, durable=False)

    if error == "unknown delivery tag":
        delivery._call(provoke, "acknowledging a tag RabbitMQ does not know")
    else:
        with pytest.raises(BrokerError, match=r"406 PRECONDITION_FAILED.*the connection stays"):
            delivery._call(provoke, "declaring the queue with other arguments")
    got: list[Received] = []
    deadline = time.monotonic() + 10
    while {r.delivery for r in got} != set(sent) and time.monotonic() < deadline:
        taken = delivery.take("a", 2, wait=0.1, window=2)
        delivery.ack(taken)
        got += taken
    assert {r.delivery for r in got} == set(sent), "the channel's messages came back"
    assert {r.delivery for r in held} <= {r.delivery for r in got}
    assert delivery._consuming.link.conn is consuming
    assert delivery._publishing.link.conn is publishing
    warned = [r.getMessage() for r in caplog.records if "closed the channel" in r.getMessage()]
    assert len(warned) == 1, warned
    assert delivery.queue in warned[0] and "406 PRECONDITION_FAILED" in warned[0]
    delivery.ack(held)  # their channel is gone: settles nothing, raises nothing
    assert delivery.backlog().waiting == 0
