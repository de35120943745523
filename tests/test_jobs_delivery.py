"""The delivery seam (``framepipe.jobs.delivery``): one contract, run on the real Redis and the
real RabbitMQ. Deliveries are published and taken with acknowledgement, handed back, taken
again when their consumer went away, never held back by a paused consumer nor read further
ahead than its window; malformed messages are dropped with an error; a broker that is down or
a URL of another kind is refused clearly."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from brokers import BROKERS, amqp_delete, broker_namespace, queue_of
from framepipe.errors import BrokerError
from framepipe.jobs.delivery import Delivery, Received, StepDelivery, open_delivery
from waiting import free_port, wait_until

Factory = Callable[[], StepDelivery]


@pytest.fixture(params=[pytest.param(b, marks=getattr(pytest.mark, b)) for b in BROKERS])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, str, str]]:
    """(kind, URL, namespace) on the real broker ``kind``, cleaned up afterwards."""
    with broker_namespace(request.param, "fp-delivery-") as (url, namespace):
        yield request.param, url, namespace


@pytest.fixture
def deliveries(broker: tuple[str, str, str]) -> Iterator[Factory]:
    """Opens deliveries on the test's namespace; closes them all at the end."""
    _kind, url, namespace = broker
    made: list[StepDelivery] = []

    def make() -> StepDelivery:
        made.append(open_delivery(url, namespace, timeout=5.0))
        return made[-1]

    yield make
    for d in made:
        d.close()


def steps(n: int) -> list[Delivery]:
    run = uuid.uuid4().hex[:8]
    return [Delivery(run, f"work:{i}") for i in range(n)]


def take_all(
    d: StepDelivery, consumer: str, n: int, *, window: int = 16, timeout: float = 10.0
) -> list[Received]:
    """Take until ``n`` deliveries came, acknowledging none."""
    got: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += d.take(consumer, n - len(got), wait=0.2, window=window)
    return got


def settle_backlog(d: StepDelivery, check: Callable[[int], bool], timeout: float = 5.0) -> None:
    """Wait until ``check`` holds for the backlog's ``waiting`` (Redis counts entries, one step
    each; RabbitMQ messages, up to 16 steps each)."""
    wait_until(
        "the backlog to settle",
        lambda: check(d.backlog().waiting),
        timeout,
        explain=lambda: f"backlog {d.backlog()}",
    )


def test_published_steps_are_taken_once_and_acknowledged(deliveries: Factory) -> None:
    a, b = deliveries(), deliveries()
    a.prepare()
    sent = steps(40)
    a.publish(sent)
    settle_backlog(a, lambda waiting: waiting > 0)
    got: list[Received] = []
    for consumer, d, n in (("a", a, 25), ("b", b, 15)):
        mine: list[Received] = []
        while len(mine) < n:
            batch = take_all(d, consumer, min(8, n - len(mine)), window=8)
            assert batch
            d.ack(batch)  # as a worker does once its claim is committed
            mine += batch
        got += mine
        d.pause()  # gives back what it was sent ahead (RabbitMQ)
    assert sorted(r.delivery for r in got) == sorted(sent)  # each once, whoever took it
    assert a.take("a", 5, wait=0.3, window=8) == []
    assert b.take("b", 5, wait=0.3, window=8) == []
    assert a.backlog().waiting == 0


def test_handed_back_steps_go_to_another_consumer(deliveries: Factory) -> None:
    a, b = deliveries(), deliveries()
    a.prepare()
    sent = steps(3)
    a.publish(sent)
    got = take_all(a, "a", 3, window=3)
    a.pause()  # a takes nothing more; what it holds is its own until handed back
    a.hand_back(got[1:])
    a.ack(got[:1])
    again = take_all(b, "b", 2, window=4)
    assert sorted(r.delivery for r in again) == sorted(r.delivery for r in got[1:])
    b.ack(again)


def test_what_a_vanished_consumer_held_is_delivered_again(deliveries: Factory) -> None:
    # Redis: the entries stay pending and another consumer takes them over once idle;
    # RabbitMQ: closing the connection requeues them, and they are delivered again.
    a, b = deliveries(), deliveries()
    a.prepare()
    sent = steps(4)
    a.publish(sent)
    held = take_all(a, "a", 4, window=4)
    assert len(held) == 4
    a.close()
    deadline = time.monotonic() + 10
    again: list[Received] = []
    while len(again) < 4 and time.monotonic() < deadline:
        again += b.take_over("b", 0.2, 4 - len(again))
        again += b.take("b", 4 - len(again), wait=0.2, window=4)
    assert sorted(r.delivery for r in again) == sorted(sent)
    b.ack(again)


@pytest.mark.slow
def test_a_consumer_holds_at_most_its_window_and_a_paused_one_holds_nothing(
    deliveries: Factory,
) -> None:
    # Redis reads nothing ahead; RabbitMQ pushes whole messages (up to 16 steps), as many as
    # hold the window and one more.
    a, b = deliveries(), deliveries()
    a.prepare()
    a.publish(steps(100))
    first = take_all(a, "a", 1, window=3)
    time.sleep(0.3)  # let a broker that pushes send what it will
    ahead = take_all(b, "b", 99, window=128, timeout=2.0)
    assert len(ahead) >= 99 - 2 * 16
    a.pause()
    rest = take_all(b, "b", 99 - len(ahead), window=128)
    assert len(ahead) + len(rest) == 99  # nothing stuck behind the paused consumer
    a.ack(first)
    b.ack(ahead + rest)
    assert a.take("a", 1, wait=0.3, window=3) == []  # resumed, and nothing is left
    settle_backlog(a, lambda waiting: waiting == 0)


def _publish_malformed(kind: str, url: str, namespace: str) -> None:
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(url)
        client.xadd(queue_of(namespace), {"bogus": "1"})
        client.close()
        return
    import aio_pika

    async def main() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            for body in (b"bogus", b'{"e": "x"}', b'["e", "k"]', b'{"e": 1, "k": "k"}'):
                await channel.default_exchange.publish(
                    aio_pika.Message(body), routing_key=queue_of(namespace)
                )

    asyncio.run(main())


def test_malformed_messages_are_dropped_with_an_error(
    deliveries: Factory, broker: tuple[str, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    d = deliveries()
    d.prepare()
    _publish_malformed(*broker)
    good = steps(1)
    d.publish(good)
    got = take_all(d, "a", 1)
    assert [r.delivery for r in got] == good
    d.ack(got)
    assert d.take("a", 5, wait=0.5, window=5) == []  # dropped, not delivered again
    assert "is malformed" in caplog.text
    settle_backlog(d, lambda waiting: waiting == 0)


def _delete(kind: str, url: str, namespace: str) -> None:
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(url)
        client.delete(queue_of(namespace))
        client.close()
    else:
        amqp_delete(url, queue_of(namespace))


@pytest.mark.slow
def test_a_deleted_queue_is_made_again(deliveries: Factory, broker: tuple[str, str, str]) -> None:
    # A publish racing the deletion may land in the dying queue and be lost with it: the
    # sweep publishes a ready step again, which the loop stands for.
    d = deliveries()
    d.prepare()
    assert take_all(d, "a", 1, timeout=0.5) == []  # consuming
    _delete(*broker)
    sent = steps(2)
    got: list[Received] = []
    deadline = time.monotonic() + 30
    while {r.delivery for r in got} != set(sent):
        assert time.monotonic() < deadline, f"got {got}"
        with contextlib.suppress(BrokerError):
            d.publish(sent)
        got += take_all(d, "a", 2, timeout=2.0)
    d.ack(got)


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:{port}/0", "amqp://guest:hunter2@127.0.0.1:{port}/"]
)
def test_an_unreachable_broker_fails_each_call_clearly(url: str) -> None:
    url = url.format(port=free_port())  # nothing listens there
    d = open_delivery(url, "fp-delivery-down", timeout=2.0)
    try:
        calls: list[Callable[[], object]] = [
            d.prepare,
            lambda: d.publish(steps(1)),
            lambda: d.take("a", 1, wait=0.1, window=1),
            d.backlog,
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(BrokerError, match=r"job broker \S+127\.0\.0\.1") as caught:
                call()
            assert time.monotonic() - started < 5
            assert "hunter2" not in str(caught.value)
            assert "hunter2" not in caught.value.url
    finally:
        d.close()


@pytest.mark.parametrize("url", ["memory://", "http://127.0.0.1/", "kafka://h:9092"])
def test_a_url_of_no_broker_is_refused(url: str) -> None:
    with pytest.raises(BrokerError, match=r"names neither Redis .* nor RabbitMQ"):
        open_delivery(url)


@pytest.mark.redis
def test_stopped_workers_consumers_are_forgotten_and_no_other() -> None:
    """Every worker process is a new consumer of the Redis group (RabbitMQ forgets a consumer
    when its channel closes): one that holds nothing and read nothing for the idle time is
    forgotten, so the group does not grow with every restart; one with a step pending (it
    died holding it: take_over needs it) and the caller are kept."""
    with broker_namespace("redis", "fp-delivery-") as (url, namespace):
        d = open_delivery(url, namespace, timeout=5.0)
        try:
            _forget_stopped_consumers(d)
        finally:
            d.close()


def _forget_stopped_consumers(d: StepDelivery) -> None:
    d.prepare()
    for consumer in ("died-holding-one", "stopped", "me"):
        d.publish(steps(1))
        got = take_all(d, consumer, 1)
        assert len(got) == 1
        if consumer == "died-holding-one":
            held = got
        else:
            d.ack(got)  # settled: the consumer holds nothing
    time.sleep(0.3)
    assert d.forget_consumers(0.2, keep="me") == 1
    names = {c["name"] for c in d.redis.xinfo_consumers(d.stream, d.GROUP)}  # type: ignore[attr-defined]
    assert names == {b"died-holding-one", b"me"}
    assert d.forget_consumers(0.2, keep="me") == 0
    taken = d.take_over("me", 0.2, 10)  # the pending step is still there to take over
    assert [r.delivery for r in taken] == [r.delivery for r in held]


@pytest.mark.rabbitmq
def test_rabbitmq_refusing_the_virtual_host_or_the_login_says_which() -> None:
    # The machine's RabbitMQ: a virtual host that is not there, then a password that is wrong.
    # Each error says what RabbitMQ refused, and never the password.
    with broker_namespace("rabbitmq", "fp-delivery-") as (url, namespace):
        for bad, expected in (
            (url.rstrip("/") + "/fp-no-such-vhost", "virtual host 'fp-no-such-vhost'"),
            (url.replace("guest:guest@", "guest:hunter2@"), "ACCESS_REFUSED"),
        ):
            d = open_delivery(bad, namespace, timeout=5.0)
            try:
                with pytest.raises(BrokerError) as caught:
                    d.prepare()
            finally:
                d.close()
            assert expected in str(caught.value), str(caught.value)
            assert "hunter2" not in str(caught.value)
