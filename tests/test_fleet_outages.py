"""The fleet against a Redis that refuses for a while, on a redis-server of the test's own: a
server busy running a script (``BUSY``, the refusal a ``LOADING`` server after a restart
with persistence, one at ``maxmemory`` (``OOM``) or a demoted master (``READONLY``) give in the
same way) is waited out by the processor (its reads, its heartbeats and the publishing of a
result it finished meanwhile) and by the registry (its reply reader, its health watch): both
go on once the server serves again, where the refusal killed the processor and failed the
registry for good. A processor whose stream is deleted under its blocking read (a registry
removed it as dead) registers again. A processor whose reconnection backoff grew while Redis
was away reads its stream again as soon as a heartbeat goes through, not at the end of its
backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

redis_sync = pytest.importorskip("redis")

from framepipe.backoff import Backoff  # noqa: E402
from framepipe.errors import ConfigError, NoProcessorError, RegistryConnectionError  # noqa: E402
from framepipe.processors import ProcessorClient, ProcessorRegistry  # noqa: E402
from redis_servers import PrivateRedis  # noqa: E402
from test_processors_remote import FAST, Detector, make_frame  # noqa: E402
from waiting import wait_until_async  # noqa: E402

pytestmark = pytest.mark.slow


class Gated(ProcessorClient):
    """Holds each frame in ``process_frame`` until :attr:`release` is set."""

    def __init__(self, url: str, ns: str) -> None:
        super().__init__(
            "gated",
            ["cap"],
            capacity=2,
            redis_url=url,
            namespace=ns,
            health_interval=0.2,
            poll_interval=0.1,
            image_encoding="raw",
            backoff=FAST,
            environ={},
        )
        self.release = asyncio.Event()
        self.entered = 0

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        self.entered += 1
        await self.release.wait()
        return {"ok": True}


class Busy:
    """A script that keeps the server busy (every other client is answered ``BUSY``) until
    :meth:`end` kills it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = redis_sync.Redis.from_url(self.url, socket_timeout=120)
        with contextlib.suppress(redis_sync.ResponseError):  # "script killed by user"
            client.eval("while true do end", 0)
        client.close()

    def start(self) -> None:
        probe = redis_sync.Redis.from_url(self.url)
        probe.config_set("busy-reply-threshold", 50)
        self.thread.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                probe.ping()
            except redis_sync.ResponseError as exc:
                if "BUSY" in str(exc):
                    break
                raise
            assert time.monotonic() < deadline, "the server never got busy"
            time.sleep(0.02)
        probe.close()

    def end(self) -> None:
        probe = redis_sync.Redis.from_url(self.url)
        probe.script_kill()
        probe.close()
        self.thread.join(10)


def told(logs: pytest.LogCaptureFixture, logger: str, word: str) -> bool:
    return any(r.name.startswith(logger) and word in r.getMessage() for r in logs.records)


def test_a_server_refusing_for_a_while_is_waited_out_by_processor_and_registry(
    private_redis: PrivateRedis, logs: pytest.LogCaptureFixture
) -> None:
    logs.set_level(logging.DEBUG, logger="framepipe")

    async def main() -> None:
        processor = Gated(private_redis.url, "fpchaos:")
        serving = asyncio.create_task(processor.start())
        await wait_until_async("the processor never registered", processor._registered.is_set, 10)
        async with ProcessorRegistry(
            private_redis.url, "fpchaos:", heartbeat_timeout=60, backoff=FAST, poll_interval=0.1
        ) as registry:
            held = asyncio.create_task(registry.call(make_frame(1), "cap", timeout=60))
            await wait_until_async("the frame never started", lambda: processor.entered == 1, 10)
            busy = Busy(private_redis.url)
            await asyncio.to_thread(busy.start)
            try:
                processor.release.set()  # its result is published while the server is busy
                for what, met in (
                    (  # its health watch
                        "the registry",
                        lambda: (
                            registry._failed is not None
                            or told(logs, "framepipe.processors.registry", "health watch")
                        ),
                    ),
                    (  # its blocking XREADGROUP
                        "the processor's reads",
                        lambda: (
                            serving.done()
                            or told(logs, "framepipe.processors.client", "reconnecting in")
                        ),
                    ),
                    (  # the result of the frame it finished
                        "the processor's publishing",
                        lambda: (
                            serving.done() or told(logs, "framepipe.processors.client", "result of")
                        ),
                    ),
                    (
                        "the processor's heartbeat",
                        lambda: (
                            serving.done() or told(logs, "framepipe.processors.client", "heartbeat")
                        ),
                    ),
                ):
                    await wait_until_async(f"{what} never met the busy server", met, 20)
            finally:
                await asyncio.to_thread(busy.end)
            assert registry._failed is None, f"the registry failed: {registry._failed}"
            assert not serving.done(), f"the processor ended: {serving.exception()}"
            result = await held
            assert result.ok and result.data == {"ok": True}
            deadline = time.monotonic() + 20
            while True:  # the registry routes again once it has the server back
                try:
                    again = await registry.call(make_frame(2), "cap", timeout=20)
                    break
                except (RegistryConnectionError, NoProcessorError):
                    assert time.monotonic() < deadline, "the registry never routed again"
                    await asyncio.sleep(0.1)
            assert again.ok
        processor.stop()
        await asyncio.wait_for(serving, 20)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_processor_reads_again_once_redis_is_back_not_at_the_end_of_its_backoff(
    private_redis: PrivateRedis,
) -> None:
    """Its reconnection backoff grows while Redis is away (to 30 s by default); the first
    heartbeat that goes through cuts it short, since that heartbeat registers it again and
    routers send it frames at once."""

    async def main() -> None:
        detector = Detector(
            "face-1",
            ["face_detection"],
            "fpchaos:",
            url=private_redis.url,
            backoff=Backoff(300.0, 2.0, 300.0, 0.0),  # an outage long enough for the maximum
        )
        serving = asyncio.create_task(detector.start())
        await wait_until_async("the processor never registered", detector._registered.is_set, 10)
        async with ProcessorRegistry(
            private_redis.url, "fpchaos:", heartbeat_timeout=60, backoff=FAST, poll_interval=0.1
        ) as registry:
            assert (await registry.call(make_frame(1), "face_detection")).ok
            await asyncio.to_thread(private_redis.stop)
            await wait_until_async(
                "the processor never noticed", lambda: detector.state == "reconnecting", 20
            )
            await asyncio.to_thread(private_redis.start)  # empty: it registers again by heartbeat
            deadline = time.monotonic() + 20
            while True:
                try:
                    result = await registry.call(make_frame(2), "face_detection", timeout=60)
                    break
                except (RegistryConnectionError, NoProcessorError):
                    assert time.monotonic() < deadline, "the processor never registered again"
                    await asyncio.sleep(0.1)
            assert result.ok
            assert not serving.done()
        detector.stop()
        await asyncio.wait_for(serving, 20)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_processor_whose_stream_is_deleted_under_its_blocking_read_registers_again(
    private_redis: PrivateRedis,
) -> None:
    """A registry that declared the processor dead (its event loop held too long, say) and
    found its stream empty deletes it, while the processor's XREADGROUP blocks on it: Redis
    answers that read ``UNBLOCKED``, which ended the processor's start()."""

    async def main() -> None:
        detector = Detector("face-1", ["face_detection"], "fpchaos:", url=private_redis.url)
        detector.poll_interval = 5.0  # each read blocks for long
        serving = asyncio.create_task(detector.start())
        await wait_until_async("the processor never registered", detector._registered.is_set, 10)
        client = redis_sync.Redis.from_url(private_redis.url)
        try:
            await wait_until_async(
                "its XREADGROUP never blocked",
                lambda: any(c.get("cmd") == "xreadgroup" for c in client.client_list()),
                10,
            )
            client.delete(detector.stream)  # as the registry's removal of a dead one does
            async with ProcessorRegistry(private_redis.url, "fpchaos:", backoff=FAST) as registry:
                deadline = time.monotonic() + 20
                while True:
                    assert not serving.done(), f"the processor ended: {serving.exception()}"
                    try:
                        result = await registry.call(make_frame(1), "face_detection", timeout=20)
                        break
                    except NoProcessorError:
                        assert time.monotonic() < deadline, "it never registered again"
                        await asyncio.sleep(0.1)
                assert result.ok
        finally:
            client.close()
        detector.stop()
        await asyncio.wait_for(serving, 40)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_a_wrong_password_fails_the_start_of_processor_and_registry_at_once(
    tmp_path: Path,
) -> None:
    """A wrong password is a setting to fix, not an outage to wait out: the start of a
    processor and of a registry fails with a ConfigError saying the credentials were refused
    (the password not in it), where both retried it as "unreachable", ``connect_retries``
    times."""
    server = PrivateRedis(tmp_path, password="right-secret")
    server.start()
    wrong = server.url.replace("right-secret", "wrong-secret")
    try:

        async def main() -> None:
            processor = Detector("locked-out", ["cap"], "fpauth:", url=wrong, connect_retries=10**6)
            with pytest.raises(ConfigError, match="refuses the credentials") as refused:
                await asyncio.wait_for(processor.start(), 20)
            assert "wrong-secret" not in str(refused.value)
            registry = ProcessorRegistry(wrong, "fpauth:", backoff=FAST, connect_retries=10**6)
            with pytest.raises(ConfigError, match="refuses the credentials") as refused:
                await asyncio.wait_for(registry.start(), 20)
            assert "wrong-secret" not in str(refused.value)

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        server.stop()


def test_a_password_changed_under_a_running_processor_is_said_plainly_and_waited_out(
    tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """The server's password changed while a processor runs: its loops say, at error level,
    that Redis refuses the credentials (not that it is unreachable), and it goes on once the
    password is set back."""
    logs.set_level(logging.DEBUG, logger="framepipe")
    server = PrivateRedis(tmp_path, password="right-secret")
    server.start()
    admin = redis_sync.Redis.from_url(server.url)
    try:

        async def main() -> None:
            processor = Detector("changed", ["cap"], "fpauth:", url=server.url)
            serving = asyncio.create_task(processor.start())
            await wait_until_async("never registered", processor._registered.is_set, 10)
            admin.config_set("requirepass", "other-secret")
            admin.execute_command("AUTH", "other-secret")
            admin.client_kill_filter(_type="normal", skipme=True)

            def said() -> bool:
                return serving.done() or any(
                    r.levelno == logging.ERROR
                    and "refuses the credentials" in r.getMessage()
                    and "reconnecting in" in r.getMessage()
                    for r in logs.records
                )

            await wait_until_async("the refused credentials were never said", said, 20)
            assert not serving.done(), f"the processor ended: {serving.exception()}"
            assert not any(
                "unreachable" in r.getMessage() and "AuthenticationError" in r.getMessage()
                for r in logs.records
            )
            admin.config_set("requirepass", "right-secret")
            async with ProcessorRegistry(server.url, "fpauth:", backoff=FAST) as registry:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        result = await registry.call(make_frame(1), "cap", timeout=20)
                        break
                    except NoProcessorError:
                        assert time.monotonic() < deadline, "the processor never came back"
                        await asyncio.sleep(0.1)
                assert result.ok
            refused = [r for r in logs.records if "refuses the credentials" in r.getMessage()]
            assert [r.levelno for r in refused if r.levelno > logging.DEBUG] == [logging.ERROR]
            processor.stop()
            await asyncio.wait_for(serving, 20)

        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        admin.close()
        server.stop()
