"""``Wire`` error replies are redis-py's exceptions, as redis-py's own client raises them for
the same command on the same server (a private redis-server: ``WRONGTYPE``, ``NOGROUP``,
``NOSCRIPT``, ``OOM`` at ``maxmemory``, ``READONLY`` on a replica, ``BUSY`` under a long
script); ``LOADING``, which a server answers only while it reads its data back, comes from a
socket answering that one line. Every ``Wire`` error was a plain ``ResponseError``: code
catching redis-py's ``BusyLoadingError``, ``OutOfMemoryError`` or ``ReadOnlyError`` missed
them, and a refusal looked like any other error.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

redis_sync = pytest.importorskip("redis")

import redis.asyncio as aioredis  # noqa: E402
from redis.exceptions import (  # noqa: E402
    AuthenticationError,
    BusyLoadingError,
    MaxClientsReachedError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from framepipe.processors.fleet.outages import denied, refusal, unavailable  # noqa: E402
from framepipe.redis.wire import Wire  # noqa: E402
from redis_servers import PrivateRedis  # noqa: E402
from test_fleet_outages import Busy  # noqa: E402
from waiting import free_port  # noqa: E402

pytestmark = pytest.mark.slow


async def both(url: str, *command: Any) -> tuple[BaseException, BaseException, BaseException]:
    """The error of ``command`` from redis-py, from ``Wire.execute`` and from
    ``Wire.execute_many``."""
    client = aioredis.Redis.from_url(url)
    wire = Wire(client)
    assert wire.lean
    try:
        with pytest.raises(redis_sync.RedisError) as theirs:
            await client.execute_command(*command)
        with pytest.raises(redis_sync.RedisError) as ours:
            await wire.execute(*command)
        [in_many] = await wire.execute_many([command])
        assert isinstance(in_many, BaseException)
        return theirs.value, ours.value, in_many
    finally:
        await wire.close()
        await client.aclose()


def same(errors: tuple[BaseException, ...], kind: type[BaseException]) -> str:
    theirs, *ours = errors
    assert type(theirs) is kind
    for error in ours:
        assert type(error) is kind
        assert str(error) == str(theirs)
    return str(theirs)


def test_error_replies_are_redis_pys_exceptions(private_redis: PrivateRedis) -> None:
    admin = redis_sync.Redis.from_url(private_redis.url)

    async def main() -> None:
        admin.hset("h", "f", "v")
        wrongtype = same(await both(private_redis.url, "GET", "h"), ResponseError)
        assert wrongtype.startswith("WRONGTYPE")
        assert same(
            await both(
                private_redis.url, "XREADGROUP", "GROUP", "g", "c", "STREAMS", "nothing", ">"
            ),
            ResponseError,
        ).startswith("NOGROUP")
        same(await both(private_redis.url, "EVALSHA", "0" * 40, 0), NoScriptError)

        admin.config_set("maxmemory", 1)
        admin.config_set("maxmemory-policy", "noeviction")
        errors = await both(private_redis.url, "SET", "k", "v")
        same(errors, OutOfMemoryError)
        assert all(refusal(e) == "OOM" for e in errors)
        admin.config_set("maxmemory", 0)

        admin.replicaof("127.0.0.1", free_port())  # a master that is not there
        errors = await both(private_redis.url, "SET", "k", "v")
        same(errors, ReadOnlyError)
        assert all(refusal(e) == "READONLY" and unavailable(e) for e in errors)
        admin.replicaof("NO", "ONE")

        busy = Busy(private_redis.url)
        await asyncio.to_thread(busy.start)
        try:
            errors = await both(private_redis.url, "GET", "k")
        finally:
            await asyncio.to_thread(busy.end)
        assert same(errors, ResponseError).startswith("BUSY")
        assert all(refusal(e) == "BUSY" for e in errors)

    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        admin.close()


def test_loading_is_busy_loading_error() -> None:
    line = b"-LOADING Redis is loading the dataset in memory\r\n"

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # one reply a command (each comes in one piece here)
            writer.write(line)
            await writer.drain()
        writer.close()

    async def main() -> None:
        port = free_port()
        loading = await asyncio.start_server(answer, "127.0.0.1", port)
        async with loading:
            errors = await both(f"redis://127.0.0.1:{port}/0", "GET", "k")
        same(errors, BusyLoadingError)
        assert all(refusal(e) == "LOADING" and unavailable(e) for e in errors)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_server_at_maxclients_is_no_wrong_password(tmp_path: Path) -> None:
    """A server at its ``maxclients`` answers a new connection's first command (``AUTH``
    when the URL has a password) with "max number of clients reached": Wire raises it as
    redis-py does (``MaxClientsReachedError``, waited out by the fleet), not as an
    ``AuthenticationError`` (a wrong password, which fails a start), and a wrong password
    is still one."""
    server = PrivateRedis(tmp_path, password="right-secret")
    server.extra += ["--maxclients", "1"]
    server.start()

    async def main() -> None:
        holder = aioredis.Redis.from_url(server.url)
        await holder.ping()  # the one client the server takes
        client = aioredis.Redis.from_url(server.url)
        wire = Wire(client)
        try:
            with pytest.raises(MaxClientsReachedError):
                await client.ping()
            with pytest.raises(MaxClientsReachedError) as full:
                await wire.execute("PING")
            assert unavailable(full.value) and not denied(full.value)
            await holder.aclose()
            wrong = aioredis.Redis.from_url(server.url.replace("right-secret", "wrong-secret"))
            with pytest.raises(AuthenticationError) as refused:
                await Wire(wrong).execute("PING")
            assert denied(refused.value)
            await wrong.aclose()
        finally:
            await wire.close()
            await client.aclose()

    try:
        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        server.stop()
