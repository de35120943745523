"""``Wire``: a Redis connection of its own for one hot path, speaking RESP2 through hiredis.

The processor fleet's hot path runs on Wire connections, one per path: the router's route
script and its blocking read of the reply stream, a processor's blocking ``XREADGROUP`` and its
publish script. Everything else uses redis-py clients made by :mod:`framepipe.redis.connection`.

Kept because it still pays. ``benchmarks/processors.py --quick --hops-only`` against
``--hot-path redis-py`` (the same Wire interface on a redis-py connection, as without hiredis),
two alternating runs each on 2026-12-04, 2 shared CPUs at load 3-6, ``registry.call(entry)`` to
a processor in another process:

================  ====================  ======================  ==========================
entry             p50 on Wire           p50 on redis-py         CPU/call caller+processor
================  ====================  ======================  ==========================
16x16 JPEG        0.45 / 0.73 ms        0.80 / 0.72 ms          450-510 us vs 660-710 us
640x360 JPEG      0.65 / 0.72 ms        1.07 / 0.92 ms          470-490 us vs 790 us
================  ====================  ======================  ==========================

About a third less CPU per call on each side (caller 184-237 us against 324-386 us, processor
250-283 us against 333-433 us), the gain it was written for (see
``docs/processor-benchmarks.md``: p50 1.34-1.60 -> 0.72-0.77 ms, caller 660 -> 310 us); on a
loaded machine the p50s are noisier than the CPU figures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
from collections.abc import Sequence
from typing import Any, cast

from framepipe.errors import MissingDependencyError
from framepipe.redis.scripts import Script

try:
    import redis.asyncio as aioredis
    from redis.exceptions import (
        AuthenticationError,
        NoScriptError,
        RedisError,
        ResponseError,
    )
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("redis", "redis", "Talking to Redis") from _exc

_parse_error: Any
try:
    from redis._parsers import BaseParser

    _parse_error = BaseParser.parse_error
except ImportError:  # pragma: no cover - a redis-py without its parsers package
    _parse_error = ResponseError

_hiredis: Any
try:
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - part of the redis extra; Wire falls back to redis-py
    _hiredis = None

__all__ = ["Wire"]

_BIG = 4096


def _pack(args: Sequence[Any]) -> bytes:
    """One command in RESP. hiredis packs small commands fastest, but copies a large value
    byte by byte (about 100 us for an 80 KB JPEG): those are joined here, in one copy."""
    for arg in args:
        if type(arg) is bytes and len(arg) > _BIG:
            break
    else:
        return cast(bytes, _hiredis.pack_command(tuple(args)))
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        data = (
            arg
            if kind is bytes
            else arg.encode()
            if kind is str
            else str(arg).encode()
            if kind is int or kind is float
            else bytes(arg)
        )
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def _copy_error(error: BaseException) -> BaseException:
    return type(error)(*error.args)


class _Resp(asyncio.Protocol):
    """One Redis connection speaking RESP2 through hiredis. A request is written at once (so
    concurrent ones pipeline by themselves), or held, in order, until the connection is made
    and its handshake done; each reply resolves the oldest waiting future directly from
    ``data_received``: no reader task, no lock, no pool."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reader = _hiredis.Reader(replyError=_parse_error)
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.held: list[bytes] | None = []  # requests made before the handshake was done
        self.error: BaseException | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = reader.gets()
            except Exception as exc:  # hiredis.ProtocolError
                self.fail(RedisConnectionError(f"Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiting:
                self.fail(RedisConnectionError("a reply from Redis that nothing asked for"))
                return
            future = waiting.popleft()[0]
            if not future.done():  # done: its caller was cancelled; the reply is dropped
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(
            RedisConnectionError(
                f"Connection to Redis lost: {exc}"
                if exc is not None
                else "Connection closed by Redis."
            )
        )

    def request(
        self, payload: bytes, count: int, limit: float | None, *, handshake: bool = False
    ) -> list[asyncio.Future[Any]]:
        """Write ``payload`` (``count`` packed commands), or hold it until the handshake is
        done; a future per reply. ``limit``: seconds for all of them to be answered, else the
        connection is dropped. ``handshake``: written first, ahead of what is held."""
        if self.error is not None:
            raise _copy_error(self.error)
        futures = [self.loop.create_future() for _ in range(count)]
        deadline = math.inf if limit is None else self.loop.time() + limit
        if handshake:
            assert self.transport is not None
            self.waiting.extendleft((future, deadline) for future in reversed(futures))
            self.transport.write(payload)
        else:
            self.waiting.extend((future, deadline) for future in futures)
            if self.held is None:
                assert self.transport is not None
                self.transport.write(payload)
            else:
                self.held.append(payload)
        if self.watchdog is None:
            self._arm()
        return futures

    def ready(self) -> None:
        """The handshake is done: write the held requests, in order."""
        held, self.held = self.held, None
        if held:
            assert self.transport is not None
            self.transport.write(b"".join(held))

    def _arm(self) -> None:
        deadline = self.waiting[0][1] if self.waiting else math.inf
        if deadline != math.inf:
            self.watchdog = self.loop.call_at(deadline, self._check)

    def _check(self) -> None:
        """The oldest request's deadline (replies come in order: if it has no reply, Redis
        or the network is stuck)."""
        self.watchdog = None
        if self.waiting and self.waiting[0][1] <= self.loop.time():
            self.fail(RedisTimeoutError("Timeout reading from Redis"))
        else:
            self._arm()

    def fail(self, error: BaseException) -> None:
        """Close the connection; every waiting request gets ``error``."""
        if self.error is None:
            self.error = error
        self.held = None
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future = self.waiting.popleft()[0]
            if not future.done():
                future.set_exception(_copy_error(error))


class Wire:
    """A Redis connection of its own for one hot path (routing, results, a processor's
    stream): commands go out pipelined, in the order they were made (also while the
    connection is being made), and come back as raw RESP2 replies (bytes, ints, nested
    lists, None) without redis-py's per-command machinery (pool, retry wrapper, response
    callbacks, pure-Python command packing), which costs about three times the CPU of the
    command itself. Error replies are redis-py's exceptions, as redis-py's own parser makes
    them (``LOADING`` as ``BusyLoadingError``, ``OOM`` as ``OutOfMemoryError``, ``READONLY``
    as ``ReadOnlyError``, ``NOSCRIPT`` as ``NoScriptError``, ... with the code stripped from
    the message; any other, such as ``BUSY`` or ``WRONGTYPE``, a :class:`ResponseError`
    whose message starts with its code), so code catching redis-py's errors catches these;
    a lost connection raises redis-py's ``ConnectionError`` (``TimeoutError`` after
    ``socket_timeout``) and the next command connects again. Opened from a redis-py client's
    settings (host and port or Unix socket, username, password, db); with TLS, a custom
    connection class or a credential provider, or without ``hiredis``, the same interface
    runs on a redis-py connection of its own (where a ``LOADING`` reply, as in redis-py,
    fails the connection and every command pipelined with it).

    Still worth its code (measured 2026-12-04 against that redis-py fallback, see the module
    docstring): a 640x360 JPEG entry's round trip through a processor in another process
    takes 0.65-0.72 ms p50 instead of 0.92-1.07 ms, and about a third less CPU on each side
    (caller 222-237 us instead of 354-386 us per call)."""

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        self._kwargs: dict[str, Any] = dict(pool.connection_kwargs)
        self._class: type[Any] = pool.connection_class
        timeout = self._kwargs.get("socket_timeout")
        self._timeout: float | None = float(timeout) if timeout else None
        self._connect_timeout = float(self._kwargs.get("socket_connect_timeout") or 10.0)
        self.lean = (
            _hiredis is not None
            and self._class in (aioredis.Connection, aioredis.UnixDomainSocketConnection)
            and self._kwargs.get("credential_provider") is None
        )
        self._proto: _Resp | None = None
        self._conn: Any = None  # the redis-py connection when not lean
        self._lock: asyncio.Lock | None = None
        self._closed = False

    def _limit(self, block: float) -> float | None:
        return None if self._timeout is None else self._timeout + block

    async def execute(self, *args: Any, block: float = 0.0) -> Any:
        """One command's reply. ``block``: seconds it may block in Redis (XREAD BLOCK)."""
        if not self.lean:
            [reply] = await self._execute_py([args], block)
        else:
            proto = self._proto
            if proto is None or proto.error is not None:
                proto = self._connection()
            reply = await proto.request(_pack(args), 1, self._limit(block))[0]
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def execute_many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Pipelined commands; their replies in order, error replies as redis-py's exceptions
        (see :class:`Wire`)."""
        if not commands:
            return []
        if not self.lean:
            return await self._execute_py(commands, 0.0)
        proto = self._proto
        if proto is None or proto.error is not None:
            proto = self._connection()
        payload = (
            _pack(commands[0]) if len(commands) == 1 else b"".join([_pack(c) for c in commands])
        )
        futures = proto.request(payload, len(commands), self._limit(0.0))
        try:
            await futures[-1]  # answered in order: the last one done, all are
        except BaseException:
            for future in futures:
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: one error raised for all
                else:
                    future.cancel()
            raise
        return [future.result() for future in futures]

    async def run(self, script: Script, *args: Any, keys: int) -> Any:
        """``EVALSHA`` ``script``; ``EVAL`` (which caches it again) when Redis lost it."""
        try:
            return await self.execute("EVALSHA", script.sha, keys, *args)
        except NoScriptError:
            pass
        return await self.execute("EVAL", script.text, keys, *args)

    async def run_many(
        self, script: Script, calls: Sequence[Sequence[Any]], *, keys: int
    ) -> list[Any]:
        """:meth:`run` for each argument list, pipelined; replies or redis-py's exceptions."""
        replies = await self.execute_many([("EVALSHA", script.sha, keys, *c) for c in calls])
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if lost:
            again = await self.execute_many([("EVAL", script.text, keys, *calls[i]) for i in lost])
            for index, reply in zip(lost, again, strict=True):
                replies[index] = reply
        return replies

    async def close(self) -> None:
        """Close the connection; waiting commands fail, later ones raise ConnectionError."""
        self._closed = True
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.fail(RedisConnectionError("Connection closed by framepipe."))
            if proto.connecting is not None and not proto.connecting.done():
                proto.connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await proto.connecting
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    def _where(self) -> str:
        kw = self._kwargs
        if "path" in kw:
            return str(kw["path"])
        return f"{kw.get('host') or 'localhost'}:{kw.get('port') or 6379}"

    def _connection(self) -> _Resp:
        """A new connection, being made: requests wait in it, in order, until it is ready."""
        if self._closed:
            raise RedisConnectionError("Connection closed by framepipe.")
        proto = self._proto = _Resp(asyncio.get_running_loop())
        proto.connecting = asyncio.get_running_loop().create_task(self._connect(proto))
        return proto

    async def _connect(self, proto: _Resp) -> None:
        """Connect ``proto``, authenticate, select the database, then release its requests;
        on failure, fail them (never raises)."""
        loop = asyncio.get_running_loop()
        kw = self._kwargs
        try:
            async with asyncio.timeout(self._connect_timeout):
                if "path" in kw:
                    await loop.create_unix_connection(lambda: proto, kw["path"])
                else:
                    await loop.create_connection(
                        lambda: proto, kw.get("host") or "localhost", int(kw.get("port") or 6379)
                    )
            hello: list[tuple[Any, ...]] = []
            if kw.get("password"):
                user = kw.get("username")
                hello.append(("AUTH", user, kw["password"]) if user else ("AUTH", kw["password"]))
            if kw.get("db"):
                hello.append(("SELECT", kw["db"]))
            if kw.get("client_name"):
                hello.append(("CLIENT", "SETNAME", kw["client_name"]))
            if hello:
                futures = proto.request(
                    b"".join(_pack(c) for c in hello),
                    len(hello),
                    self._timeout or self._connect_timeout,
                    handshake=True,
                )
                for command, future in zip(hello, futures, strict=True):
                    reply = await future
                    if isinstance(reply, RedisError):
                        # A refusal of the connection itself ("max number of clients
                        # reached": MaxClientsReachedError) answers the first command,
                        # whichever it is, and keeps its class: it is no wrong password.
                        error = (
                            reply
                            if isinstance(reply, RedisConnectionError)
                            else AuthenticationError(str(reply))
                            if command[0] == "AUTH"
                            else RedisConnectionError(f"{command[0]} failed: {reply}")
                        )
                        proto.fail(error)
                        return
            proto.ready()
        except asyncio.CancelledError:
            proto.fail(RedisConnectionError("Connection closed by framepipe."))
            raise
        except TimeoutError:
            proto.fail(RedisTimeoutError(f"Timeout connecting to {self._where()}"))
        except OSError as exc:
            proto.fail(RedisConnectionError(f"Error connecting to {self._where()}: {exc}"))
        except Exception as exc:  # the connection was lost meanwhile: already failed
            proto.fail(RedisConnectionError(f"Error connecting to {self._where()}: {exc}"))

    async def _execute_py(self, commands: Sequence[Sequence[Any]], block: float) -> list[Any]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._closed:
                raise RedisConnectionError("Connection closed by framepipe.")
            conn = self._conn
            if conn is None:  # RESP2: the replies framepipe parses
                conn = self._conn = self._class(**{**self._kwargs, "protocol": 2})
            try:
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(
                            await conn.read_response(
                                disable_decoding=True, timeout=self._limit(block)
                            )
                        )
                    except ResponseError as exc:  # (LOADING: raised, as redis-py raises it)
                        replies.append(exc)
                return replies
            except BaseException:
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                raise
