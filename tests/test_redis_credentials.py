"""A wrong Redis password (or ACL user's password) for the clients that wait Redis out in the
background: the jobs' Redis Streams delivery, the Redis event sink and the detector relay, each
on a redis-server of the test's own that takes only those credentials.

At start, credentials refused fail at once with a ``ConfigError`` naming the component and the
URL, the password masked (each retried them for ever, as a Redis that is away). Refused later
(the password changed on the server, every connection closed), they are said in one error
line as refused credentials, not as a Redis that does not answer; the component goes on
retrying, and says once that it works again when the password is set back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from framepipe.backoff import Backoff
from framepipe.errors import BrokerError, ConfigError
from framepipe.event_sinks import RedisEventSink
from framepipe.jobs.delivery.redis_streams import RedisStreamsDelivery
from framepipe.jobs.rounds import Delivery
from framepipe.server.detector import DetectorHub
from framepipe.server.detector_relay import Relay, RemoteDetectorHub
from redis_servers import PrivateRedis, running
from test_detector_relay import _sent_once_alive, _until
from waiting import free_port, wait_until_async

pytestmark = pytest.mark.slow

RIGHT, WRONG, OTHER = "right-secret-7c2", "wrong-secret-9d4", "other-secret-1a8"
FAST = Backoff(0.05, 2.0, 0.2, 0)


@pytest.fixture(params=["password", "acl user"])
def locked(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PrivateRedis]:
    """A private redis-server taking only ``RIGHT``: the default user's password, or an ACL
    user's (the default user disabled)."""
    user = "fp-app" if request.param == "acl user" else None
    with running(PrivateRedis(tmp_path, password=RIGHT, user=user)) as server:
        yield server


def wrong(server: PrivateRedis) -> str:
    return server.url.replace(RIGHT, WRONG)


def masked(server: PrivateRedis) -> str:
    """The server's URL as errors and logs show it."""
    return server.url.replace(server.password or "", "***")


def said(logs: pytest.LogCaptureFixture, logger: str, about: str = "") -> list[tuple[int, str]]:
    """(level, message) of each line of ``logger`` (``framepipe.<logger>``) above debug level,
    starting with ``about``."""
    name = f"framepipe.{logger}"
    return [
        (r.levelno, r.getMessage())
        for r in logs.records
        if r.name == name and r.levelno > logging.DEBUG and r.getMessage().startswith(about)
    ]


def no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (RIGHT, WRONG, OTHER):
            assert secret not in text, text


def a_start_error(error: BaseException, component: str, server: PrivateRedis) -> None:
    """``error`` fails a start for refused credentials, naming ``component`` and the URL."""
    assert type(error) is ConfigError, repr(error)
    text = str(error)
    assert text.startswith(component), text
    assert f"Redis at {masked(server)} refuses the credentials" in text, text
    assert "check the password (and user) in the URL" in text
    no_secret(text)


# -- the jobs' Redis Streams delivery -----------------------------------------------------------


def test_a_wrong_password_fails_the_job_brokers_start_at_once(locked: PrivateRedis) -> None:
    delivery = RedisStreamsDelivery(wrong(locked), "fpcreds")
    try:
        with pytest.raises(ConfigError) as refused:
            delivery.prepare()  # a worker's start
        a_start_error(refused.value, "job broker: ", locked)
        with pytest.raises(ConfigError):
            delivery.publish([Delivery("e", "k")])  # nothing went through yet: still a start
    finally:
        delivery.close()


def test_credentials_refused_under_a_running_job_broker_are_said_once(
    locked: PrivateRedis, logs: pytest.LogCaptureFixture
) -> None:
    """Retried as a lost broker (a ``BrokerError``, which the worker retries), saying the
    credentials are refused; one error line, one line once they are accepted again."""
    delivery = RedisStreamsDelivery(locked.url, "fpcreds")
    try:
        delivery.prepare()
        delivery.publish([Delivery("e", "k1")])
        locked.change_password(OTHER)
        for _ in range(3):
            with pytest.raises(BrokerError) as refused:
                delivery.take("c1", 1, wait=0.1, window=1)
            assert type(refused.value) is BrokerError
            assert f"Redis at {masked(locked)} refuses the credentials" in str(refused.value)
        with pytest.raises(BrokerError, match="refuses the credentials"):
            delivery.publish([Delivery("e", "k2")])
        locked.change_password(RIGHT)
        [taken] = delivery.take("c1", 1, wait=0.1, window=1)
        assert taken.delivery == Delivery("e", "k1")
        delivery.ack([taken])
    finally:
        delivery.close()
    lines = said(logs, "jobs.delivery")
    assert [level for level, _ in lines] == [logging.ERROR, logging.INFO], lines
    (_, error), (_, back) = lines
    assert error.startswith(f"job broker {masked(locked)}: Redis at {masked(locked)} refuses")
    assert "unreachable" not in error
    assert back == f"job broker {masked(locked)}: Redis accepts the credentials again; delivering"
    no_secret(error, back)


# -- the Redis event sink -------------------------------------------------------------------------


def test_a_wrong_password_fails_the_redis_event_sinks_start_at_once(
    locked: PrivateRedis,
) -> None:
    async def main() -> BaseException:
        sink = RedisEventSink(wrong(locked), "events", backoff=FAST)
        try:
            with pytest.raises(ConfigError) as refused:
                await sink.start()
            return refused.value
        finally:
            await sink.aclose()

    error = asyncio.run(asyncio.wait_for(main(), 30))
    a_start_error(error, f"event sink redis ({masked(locked)} stream events): ", locked)


def test_a_redis_event_sink_starts_with_the_right_password_or_redis_away(
    locked: PrivateRedis,
) -> None:
    """``start`` fails only for a wrong setting: Redis away is an outage the writer waits
    out, as before."""
    away = f"redis://:{RIGHT}@127.0.0.1:{free_port()}/0"  # nothing listens there

    async def main() -> None:
        for url in (locked.url, away):
            sink = RedisEventSink(url, "events", backoff=FAST, connect_timeout=1)
            assert await sink.start() is sink
            await sink.aclose(timeout=0.5)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_credentials_refused_under_a_running_redis_event_sink_are_said_once(
    locked: PrivateRedis, logs: pytest.LogCaptureFixture
) -> None:
    import redis

    async def main() -> RedisEventSink:
        sink = await RedisEventSink(locked.url, "events", backoff=FAST).start()
        sink("order.completed", {"n": 0})
        await wait_until_async("the first event written", lambda: sink.written == 1)
        locked.change_password(OTHER)
        for i in range(1, 11):
            sink("order.completed", {"n": i})
            await asyncio.sleep(0.05)
        await wait_until_async(
            "the refusal said",
            lambda: any(lv == logging.ERROR for lv, _ in said(logs, "events.redis")),
        )
        await asyncio.sleep(1)  # retried, every 0.2 s
        assert sink.written == 1 and sink.pending == 10 and sink.failing_since is not None
        locked.change_password(RIGHT)
        await wait_until_async("the queue written", lambda: sink.written == 11, 30)
        await sink.aclose()
        return sink

    sink = asyncio.run(asyncio.wait_for(main(), 60))
    assert sink.dropped == 0
    with redis.Redis.from_url(locked.url) as client:
        assert client.xlen("events") == 11
    lines = said(logs, "events.redis")
    assert [level for level, _ in lines] == [logging.ERROR, logging.INFO], lines
    (_, error), (_, back) = lines
    named = f"event sink redis ({masked(locked)} stream events)"
    assert error.startswith(
        f"{named} cannot write: Redis at {masked(locked)} refuses the credentials"
    ), error
    assert back.startswith(f"{named} writes again after "), back
    no_secret(error, back)


# -- the detector relay ---------------------------------------------------------------------------


def test_a_wrong_password_fails_the_detector_relays_start_at_once(locked: PrivateRedis) -> None:
    async def main() -> BaseException:
        relay = Relay(DetectorHub("relayed"), wrong(locked), "fpcreds")
        try:
            with pytest.raises(ConfigError) as refused:
                await relay.start()
            return refused.value
        finally:
            await relay.stop()

    error = asyncio.run(asyncio.wait_for(main(), 30))
    a_start_error(error, "detector relay: ", locked)


def test_credentials_refused_under_a_running_detector_relay_are_said_once(
    locked: PrivateRedis, logs: pytest.LogCaptureFixture
) -> None:
    right = locked.url

    async def main() -> None:
        hub = DetectorHub("relayed")
        relay = Relay(hub, right, "fpcreds")
        await relay.start()
        try:
            assert await _sent_once_alive(RemoteDetectorHub(hub.id, right, "fpcreds")) is False
            locked.change_password(OTHER)
            await _until(
                "the refusal said",
                lambda: any(
                    lv == logging.ERROR for lv, _ in said(logs, "server.detector", "detector relay")
                ),
            )
            await asyncio.sleep(3)  # both loops retry (0.5, 1, 2 s): not said again
            locked.change_password(RIGHT)
            await _until(
                "the 'answers again' line",
                lambda: any(
                    lv == logging.INFO for lv, _ in said(logs, "server.detector", "detector relay")
                ),
            )
            assert await _sent_once_alive(RemoteDetectorHub(hub.id, right, "fpcreds")) is False
        finally:
            await relay.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
    lines = said(logs, "server.detector", "detector relay")
    # The connections the server closed may be said first, as a Redis that does not answer.
    lost = [m for level, m in lines if level == logging.WARNING]
    assert len(lost) <= 1 and not any("AuthenticationError" in m for m in lost), lines
    assert [level for level, _ in lines if level != logging.WARNING] == [
        logging.ERROR,
        logging.INFO,
    ], lines
    error, back = (m for level, m in lines if level != logging.WARNING)
    assert error.startswith(f"detector relay: Redis at {masked(locked)} refuses the credentials")
    assert "does not answer" not in error
    assert back.startswith(f"detector relay: Redis at {masked(locked)} answers again after ")
    no_secret(error, back, *lost)


# -- the rule all three share ---------------------------------------------------------------------


class _Broker:
    """The jobs' delivery, driven by hand as a worker drives it: each poke is one read."""

    logger, about = "jobs.delivery", "job broker"

    async def start(self, url: str) -> None:
        self.delivery = RedisStreamsDelivery(url, "fpcreds")
        await asyncio.to_thread(self.delivery.prepare)

    async def poke(self) -> None:
        with contextlib.suppress(BrokerError):
            await asyncio.to_thread(self.delivery.take, "c1", 1, wait=0.05, window=1)

    async def stop(self) -> None:
        self.delivery.close()


class _Sink:
    """The Redis event sink: each poke is one more event; its writer retries by itself."""

    logger, about = "events.redis", "event sink"

    async def start(self, url: str) -> None:
        self.sink = await RedisEventSink(url, "events", backoff=FAST).start()

    async def poke(self) -> None:
        self.sink("order.completed", {})

    async def stop(self) -> None:
        await self.sink.aclose()


class _Relay:
    """The detector relay: its loops retry by themselves; a poke only lets them run."""

    logger, about = "server.detector", "detector relay"

    async def start(self, url: str) -> None:
        self.relay = Relay(DetectorHub("relayed"), url, "fpcreds")
        await self.relay.start()

    async def poke(self) -> None:
        await asyncio.sleep(0)

    async def stop(self) -> None:
        await self.relay.stop()


@pytest.mark.parametrize("user", [_Broker, _Sink, _Relay], ids=["broker", "sink", "relay"])
def test_refused_credentials_are_said_once_and_once_back_in_every_outage(
    user: type[_Broker | _Sink | _Relay], locked: PrivateRedis, logs: pytest.LogCaptureFixture
) -> None:
    """Twice over: the password changed under the running user is said once however many
    tries it refuses, and once more when it is set back; the next change is said again."""
    component = user()

    def lines(level: int) -> list[str]:
        return [m for lv, m in said(logs, component.logger, component.about) if lv == level]

    async def until(what: str, level: int, count: int) -> None:
        async def poked() -> bool:
            await component.poke()
            return len(lines(level)) == count

        await wait_until_async(what, poked, 30, interval=0.05)

    async def main() -> None:
        await component.start(locked.url)
        try:
            for outage in (1, 2):
                locked.change_password(OTHER)
                await until("the refusal said", logging.ERROR, outage)
                for _ in range(3):  # more refused tries (the relay's retry in 0.5, 1 s)
                    await component.poke()
                    await asyncio.sleep(0.5)
                locked.change_password(RIGHT)
                await until("the 'back' line", logging.INFO, outage)
        finally:
            await component.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
    shown = [lv for lv, _ in said(logs, component.logger, component.about) if lv != logging.WARNING]
    assert shown == [logging.ERROR, logging.INFO] * 2, said(logs, component.logger)
    errors = lines(logging.ERROR)
    assert all("refuses the credentials" in m for m in errors), errors
    no_secret(*errors, *lines(logging.INFO))
