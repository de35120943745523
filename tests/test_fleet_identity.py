"""One process per processor id, on the real Redis: a second client under the id of a running
one (in this process, or another process) fails its start with a ConfigError naming the
holder, and the first goes on (they shared one stream and one consumer name, and the first to
stop removed the other's registration); a client under the id of a processor that was killed
without deregistering takes the id over.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from conftest import REDIS_URL

redis_sync = pytest.importorskip("redis")
redis_async = pytest.importorskip("redis.asyncio")

from framepipe.errors import ConfigError  # noqa: E402
from framepipe.processors import ProcessorRegistry  # noqa: E402
from test_processors_remote import Detector, ProcessorProcess, make_frame, serving  # noqa: E402
from waiting import wait_until_async  # noqa: E402

pytestmark = pytest.mark.slow


def registered(ns: str, processor_id: str) -> dict[bytes, bytes]:
    client = redis_sync.Redis.from_url(REDIS_URL)
    try:
        return client.hgetall(f"{ns}proc:{processor_id}")  # type: ignore[no-any-return]
    finally:
        client.close()


def test_a_second_client_under_a_running_clients_id_is_refused(ns: str) -> None:
    first = Detector("face-1", ["face_detection"], ns)
    second = Detector("face-1", ["face_detection"], ns)

    async def main() -> None:
        async with serving(first), ProcessorRegistry(REDIS_URL, ns) as registry:
            with pytest.raises(ConfigError, match=r"'face-1' is in use by pid \d+"):
                await asyncio.wait_for(second.start(), 20)
            result = await registry.call(make_frame(1), "face_detection")
            assert result.ok and result.processor_id == "face-1"
            assert registered(ns, "face-1")[b"instance"] == first._instance.encode()
        assert first.processed == 1 and second.processed == 0

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_client_under_the_id_of_another_live_process_is_refused(ns: str, tmp_path: Path) -> None:
    other = ProcessorProcess(tmp_path, ns, "face-1", capacity=1, delay=0.0)
    mine = Detector("face-1", ["face_detection"], ns)

    async def main() -> None:
        await other.start()
        try:
            await wait_until_async(
                "the other process never registered",
                lambda: registered(ns, "face-1").get(b"state") == b"ready",
                20,
            )
            assert other.proc is not None
            with pytest.raises(ConfigError, match=rf"in use by pid {other.proc.pid} "):
                await asyncio.wait_for(mine.start(), 20)
            assert registered(ns, "face-1")[b"pid"] == str(other.proc.pid).encode()
        finally:
            await other.finish()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_id_of_a_killed_processor_is_taken_over(ns: str, tmp_path: Path) -> None:
    killed = ProcessorProcess(tmp_path, ns, "face-1", capacity=1, delay=0.0)
    successor = Detector("face-1", ["face_detection"], ns)

    async def main() -> None:
        await killed.start()
        await wait_until_async(
            "the process never registered",
            lambda: registered(ns, "face-1").get(b"state") == b"ready",
            20,
        )
        assert killed.proc is not None
        killed.proc.send_signal(signal.SIGKILL)
        await killed.exited()
        assert registered(ns, "face-1")[b"state"] == b"ready"  # it could not deregister
        async with serving(successor), ProcessorRegistry(REDIS_URL, ns) as registry:
            assert (await registry.call(make_frame(1), "face_detection")).ok
        assert successor.processed == 1

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_process_whose_id_was_taken_over_while_it_was_away_gives_way(
    ns: str, tmp_path: Path
) -> None:
    """A processor frozen (SIGSTOP: as cut off from Redis as a partitioned one) long enough for
    a new client to take its id over: when it runs again, its first heartbeat finds the record
    held by the other instance, and it stops (its start raises), without marking the record
    draining or removing it and the stream; the new holder goes on serving."""
    frozen = ProcessorProcess(tmp_path, ns, "face-1", capacity=1, delay=0.0)
    successor = Detector("face-1", ["face_detection"], ns)

    async def main() -> None:
        await frozen.start()
        await wait_until_async(
            "the process never registered",
            lambda: registered(ns, "face-1").get(b"state") == b"ready",
            20,
        )
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        try:
            async with serving(successor), ProcessorRegistry(REDIS_URL, ns) as registry:
                mine = successor._instance.encode()
                assert registered(ns, "face-1")[b"instance"] == mine
                frozen.proc.send_signal(signal.SIGCONT)
                assert await asyncio.wait_for(frozen.exited(), 20) != 0
                record = registered(ns, "face-1")
                assert (record[b"instance"], record[b"state"]) == (mine, b"ready")
                result = await registry.call(make_frame(1), "face_detection")
                assert result.ok and result.processor_id == "face-1"
            assert successor.processed == 1
        finally:
            with contextlib.suppress(ProcessLookupError):  # exited: nothing to resume
                frozen.proc.send_signal(signal.SIGCONT)
            await frozen.finish()

    asyncio.run(asyncio.wait_for(main(), 90))


def test_a_live_process_of_another_pid_namespace_with_this_host_name_and_pid_is_refused(
    ns: str,
) -> None:
    """Containers sharing a host name (``network_mode: host``, a compose ``hostname:`` with
    replicas) each run in a pid namespace of their own, all as pid 1: a record with this host
    name and this very pid, written in another pid namespace by another client whose
    heartbeat goes on, is a live process, not an earlier life of this one; the start fails
    and the record stays the other's."""
    mine = Detector("face-1", ["face_detection"], ns)
    key = f"{ns}proc:face-1"

    async def beating(client: redis_async.Redis) -> None:
        while True:
            await client.hset(key, "last_heartbeat", repr(time.time()))
            await asyncio.sleep(0.05)

    async def main() -> None:
        client = redis_async.Redis.from_url(REDIS_URL)
        await client.hset(
            key,
            mapping={
                "id": "face-1",
                "state": "ready",
                "instance": "another-container",
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "pidns": "pid:[1]",
                "health_interval": "0.2",
                "last_heartbeat": repr(time.time()),
            },
        )
        await client.sadd(f"{ns}processors", "face-1")
        beats = asyncio.create_task(beating(client))
        try:
            with pytest.raises(ConfigError, match=rf"in use by pid {os.getpid()} "):
                await asyncio.wait_for(mine.start(), 20)
            assert await client.hget(key, "instance") == b"another-container"
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
            await client.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_processors_record_names_its_pid_namespace(ns: str) -> None:
    """The record carries the pid namespace its pid is to be read in."""
    first = Detector("face-1", ["face_detection"], ns)

    async def main() -> None:
        async with serving(first):
            record = registered(ns, "face-1")
            assert record[b"pidns"] == os.readlink("/proc/self/ns/pid").encode()
            assert record[b"pid"] == str(os.getpid()).encode()

    asyncio.run(asyncio.wait_for(main(), 60))
