"""The detector relay (a service's detectors reached from ``framepipe worker`` processes through
Redis) with Redis going away and a service that does not answer: one warning for an outage,
however long, one line when Redis is back, and requests relayed again after it; a
``send_sync`` that waits at most its ``wait``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_sync

from conftest import REDIS_URL, redis_namespace
from framepipe.errors import DetectorUnavailableError
from framepipe.server.detector import DetectorHub
from framepipe.server.detector_relay import Relay, RemoteDetectorHub
from redis_servers import PrivateRedis

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


def _send_sync_outcome(remote: RemoteDetectorHub, wait: float) -> BaseException | bool:
    """What ``remote.send_sync(..., wait=wait)`` returned or raised, from a thread joined for
    60 s at most: a bound for a hang, not a measure of the wait."""
    outcome: list[BaseException | bool] = []

    def send() -> None:
        try:
            outcome.append(remote.send_sync("session-1", {"type": "status"}, wait=wait))
        except BaseException as exc:
            outcome.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    sender.join(60)
    assert not sender.is_alive(), f"send_sync did not return within 60 s for wait={wait}"
    [result] = outcome
    return result


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


@pytest.mark.redis
def test_send_sync_waits_at_most_its_wait_for_a_service_that_does_not_answer() -> None:
    """A service whose heartbeat is there but that takes no request (a stuck one):
    ``send_sync(wait=...)`` raises TimeoutError once ``wait`` has passed, as
    :meth:`DetectorHub.send_sync` does, instead of waiting its own 150 s."""
    with redis_namespace("fp-relay-") as namespace:
        remote = RemoteDetectorHub("stuck", REDIS_URL, namespace)
        client = redis_sync.Redis.from_url(REDIS_URL)
        client.set(remote.alive, "1", ex=120)
        try:
            raised = _send_sync_outcome(remote, wait=0.3)
        finally:
            client.delete(remote.alive)
            client.close()
        assert isinstance(raised, TimeoutError), raised
        assert "0.3" in str(raised) and "status" in str(raised)


@pytest.mark.slow  # a redis-server of its own, stopped under a request in flight
def test_an_answer_redis_refuses_is_one_warning_and_the_request_task_ends_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis goes away while the service works on a worker's request: the answer cannot be
    pushed. That is one warning naming the request; the relay's task for it ends without an
    exception (before, it raised from its error path and was never retrieved)."""
    caplog.set_level(logging.INFO, logger="framepipe")
    server = PrivateRedis(tmp_path, password=PASSWORD)
    server.start()

    async def scenario() -> None:
        hub = DetectorHub("inflight")
        release = asyncio.Event()
        entered = asyncio.Event()

        async def slow_send(session_id: str, message: object) -> bool:
            entered.set()
            await release.wait()
            return True

        hub.send = slow_send  # type: ignore[method-assign]
        relay = Relay(hub, server.url, "relaytest")
        remote = RemoteDetectorHub(hub.id, server.url, "relaytest")
        await relay.start()
        asking = asyncio.create_task(_sent_once_alive(remote))
        try:
            await asyncio.wait_for(entered.wait(), 30)
            [serving] = list(relay._tasks)
            await asyncio.to_thread(server.stop)
            release.set()
            await asyncio.wait_for(asyncio.shield(serving), 30)
            assert serving.exception() is None
            [warning] = [
                line
                for line in _relay_lines(caplog, logging.WARNING)
                if "could not be sent" in line
            ]
            assert "the answer of status could not be sent to the worker" in warning
        finally:
            asking.cancel()
            with contextlib.suppress(BaseException):
                await asking
            await relay.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert not [r for r in caplog.records if PASSWORD in r.getMessage()]


def test_send_sync_keeps_its_wait_with_a_redis_that_accepts_and_never_answers() -> None:
    """A hung Redis (a half-open connection after a network cut): ``send_sync(wait=...)``
    raises TimeoutError and returns, its clean-up bounded, instead of hanging for as long as
    the connection lasts."""
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # the kernel accepts the connections; nothing ever answers
    try:
        remote = RemoteDetectorHub("hung", f"redis://127.0.0.1:{hung.getsockname()[1]}/0", "ns")
        raised = _send_sync_outcome(remote, wait=0.3)
        assert isinstance(raised, TimeoutError), raised
    finally:
        hung.close()


def _crash(relay: Relay) -> list[asyncio.Task[None]]:
    """What a SIGKILL leaves of ``relay``: its loops and requests stop, its heartbeat key stays
    until it expires (no clean stop deletes it). The tasks to await."""
    tasks = [*relay._main, *relay._tasks]
    for task in tasks:
        task.cancel()
    return tasks


@pytest.mark.redis
def test_a_worker_waiting_on_a_service_restarted_at_once_is_told_at_once() -> None:
    """The service dies while it serves a worker's request and starts again within the
    heartbeat's expiry (the same hub id, its heartbeat set again): the worker's request fails
    at once with DetectorUnavailableError naming the restart, instead of waiting for the
    answer timeout (+120 s) for an answer nobody will give. A request the earlier run never
    took is dropped by the new one, not served for a worker that has given up on it."""

    async def scenario(namespace: str) -> None:
        hub = DetectorHub("restarted")
        asked: list[str] = []
        entered = asyncio.Event()

        async def never_answers(session_id: str, message: object, **_: object) -> dict[str, str]:
            asked.append(session_id)
            entered.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        hub.request = never_answers  # type: ignore[method-assign]
        first = Relay(hub, REDIS_URL, namespace)
        remote = RemoteDetectorHub(hub.id, REDIS_URL, namespace)
        await first.start()
        beat = redis_sync.Redis.from_url(REDIS_URL)
        try:
            await _until("the first run's heartbeat", lambda: beat.exists(remote.alive))
        finally:
            beat.close()
        waiting = asyncio.create_task(
            remote.request("s1", {"type": "sd:copy_request"}, answer_timeout=600, what="copy 1")
        )
        second: Relay | None = None
        try:
            await asyncio.wait_for(entered.wait(), 30)
            for task in _crash(first):
                with contextlib.suppress(BaseException):
                    await task
            await first._client.aclose()
            second = Relay(hub, REDIS_URL, namespace)
            await second.start()
            started = time.monotonic()
            with pytest.raises(DetectorUnavailableError, match="was restarted while waiting"):
                await asyncio.wait_for(waiting, 30)
            assert time.monotonic() - started < 10  # not the 720 s of the answer timeout
            assert asked == ["s1"]

            # A request pushed for an earlier run and taken by the next one: dropped.
            await second.stop()
            client = redis_sync.Redis.from_url(REDIS_URL)
            try:
                client.set(remote.alive, "an-earlier-run", ex=30)
                late = asyncio.create_task(
                    remote.request("s2", {"type": "sd:copy_request"}, what="copy 2")
                )
                await _until("the request in the list", lambda: client.llen(remote.requests))
                second = Relay(hub, REDIS_URL, namespace)
                await second.start()
                with pytest.raises(DetectorUnavailableError, match="was restarted"):
                    await asyncio.wait_for(late, 30)
                await _until("the list emptied", lambda: not client.llen(remote.requests))
                assert asked == ["s1"]  # s2 was never asked of the detectors
            finally:
                client.close()
        finally:
            waiting.cancel()
            with contextlib.suppress(BaseException):
                await waiting
            if second is not None:
                await second.stop()

    with redis_namespace("fp-relay-") as namespace:
        asyncio.run(scenario(namespace))


@pytest.mark.slow  # a redis-server of its own, paused for longer than a command's timeout
def test_a_redis_that_stops_answering_is_said_by_the_relay_and_told_to_workers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis paused (SIGSTOP: connections stay open, nothing answers, as behind a network
    cut): the relay says so within its commands' timeout and the service's answers come back
    once Redis does; a worker's request fails as DetectorUnavailableError naming Redis, where
    both used to wait without a word for as long as the connection lasted."""
    caplog.set_level(logging.INFO, logger="framepipe")
    server = PrivateRedis(tmp_path, password=PASSWORD)
    server.start()

    async def scenario() -> None:
        hub = DetectorHub("paused")
        relay = Relay(hub, server.url, "relaytest")
        remote = RemoteDetectorHub(hub.id, server.url, "relaytest")
        await relay.start()
        try:
            assert await _sent_once_alive(remote) is False
            server.pause()
            try:
                with pytest.raises(DetectorUnavailableError) as raised:
                    await asyncio.wait_for(remote.send("session-1", {"type": "status"}), 40)
                assert f"Redis at redis://:***@127.0.0.1:{server.port}/0 does not answer" in str(
                    raised.value
                )
                assert "status" in str(raised.value)
                await _until(
                    "the relay's outage warning",
                    lambda: any(
                        "does not answer" in m for m in _relay_lines(caplog, logging.WARNING)
                    ),
                )
            finally:
                server.resume()
            await _until("the 'answers again' line", lambda: _relay_lines(caplog, logging.INFO))
            assert await _sent_once_alive(remote) is False
        finally:
            await relay.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert not [r for r in caplog.records if PASSWORD in r.getMessage()]


def test_a_worker_with_a_wrong_password_is_told_so(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path, password=PASSWORD)
    server.start()
    try:
        wrong = f"redis://:not-{PASSWORD}@127.0.0.1:{server.port}/0"
        remote = RemoteDetectorHub("locked", wrong, "relaytest")
        with pytest.raises(DetectorUnavailableError, match="refuses the credentials") as raised:
            asyncio.run(remote.send("session-1", {"type": "status"}))
        assert PASSWORD not in str(raised.value)
    finally:
        server.stop()
