"""``ProcessorClient``: the base class of a frame-processing service that registers on Redis.

A service subclasses :class:`ProcessorClient` and implements only
``async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict | None``; ``frame_data``
holds the raw fields of one frame entry (see *Wire format*). ``await client.start()`` registers
the processor, consumes its dedicated stream and returns once the client was stopped
(``await client.stop()``, or SIGTERM/SIGINT after :meth:`ProcessorClient.install_signal_handlers`).

Guarantees:

* At most ``capacity`` frames are inside ``process_frame`` at any moment (XREADGROUP asks for
  no more than the free capacity).
* A frame entry is acknowledged only after its result was published, in one Lua script with
  the acknowledgement, to ``result_stream`` and to the router's reply stream. A frame whose handling
  is interrupted (the process killed, Redis lost for good, the shutdown timeout) stays pending in
  the processor's stream; the :class:`~framepipe.processors.registry.ProcessorRegistry`
  re-routes it to another processor. Delivery is at least once.
* A malformed entry (missing field, image that is not JPEG/PNG bytes or base64 of them, bad
  metadata JSON), a ``process_frame`` that raises (or exceeds ``frame_timeout``) and a result
  that is not a JSON-serialisable dict each give an error result for that frame (``status``
  ``error``, ``error_kind`` ``input``/``processor``/``output``, the error text), are acked and
  logged; the consumer goes on.
* Redis unreachable at start: :class:`~framepipe.errors.RegistryConnectionError` naming the URL
  after ``connect_retries`` retries; never a hang. Redis lost later: the client reconnects with
  exponential backoff (for as long as it runs), registers again, takes back the entries it held
  and publishes the results it finished meanwhile.
* Heartbeats every ``health_interval`` (``last_heartbeat``, ``in_flight``, ``processed``,
  ``failed`` in the processor's hash). A processor declared dead by the registry (silent too
  long) that turns out alive registers again at its next heartbeat.
* ``stop()`` / SIGTERM: the state becomes ``draining`` at once (routers send nothing more), the
  client takes no new frame, finishes the frames in flight (bounded by ``shutdown_timeout``;
  unfinished ones stay pending and are re-routed), deregisters and ``start()`` returns.

Wire format (stream fields, bytes): ``frame_id``, ``camera_id``, ``timestamp`` (ISO 8601),
``image_data`` (raw JPEG bytes; base64 accepted), ``width``, ``height``, ``format`` (``jpeg``),
``metadata`` (JSON object), ``trace_context`` (W3C ``traceparent``; a JSON object holding one
is accepted) and, from the router, ``capability``, ``reply_to``, ``attempt``. Results carry
``frame_id``, ``camera_id``, ``processor_id``, ``capability``, ``status`` (``ok``/``error``),
``result`` (JSON), ``error``, ``error_kind``, ``trace_context`` (the frame's, unchanged),
``duration_ms``, ``processed_at``, ``entry_id``.

Keys (``namespace`` default ``framepipe:``): ``<ns>processors`` (set of ids),
``<ns>proc:<id>`` (hash), ``<ns>proc:<id>:frames`` (the processor's stream, consumer group
``processors``); result streams are named by the processor, without the namespace.

Connections: the hot path of a frame (the processor's blocking ``XREADGROUP``, its publish
script, the router's route script and its blocking read of the replies) runs on
:class:`Wire` connections, one per path, which speak RESP2 through hiredis without redis-py's
per-command machinery; registration, heartbeats and the registry's health watch use redis-py.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import collections
import contextlib
import functools
import hashlib
import importlib
import json
import math
import os
import re
import secrets
import signal
import socket
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from framepipe.backoff import Backoff
from framepipe.errors import MissingDependencyError, RegistryConnectionError
from framepipe.logs import get_logger
from framepipe.redis import safe_url

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("redis", "redis", "Remote processors") from _exc

_hiredis: Any
try:
    import hiredis as _hiredis
except ImportError:  # pragma: no cover - part of the redis extra; Wire falls back to redis-py
    _hiredis = None

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_REDIS_URL",
    "GROUP",
    "Keys",
    "ProcessorClient",
    "ProcessorState",
    "decode_image_data",
    "new_traceparent",
    "parse_traceparent",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "framepipe:"
GROUP = "processors"
"""The consumer group on every processor stream."""

REDIS_DOWN: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError,
                                               ConnectionError)
"""Exceptions that mean "Redis is not reachable right now" (retry later)."""

Fields = dict[bytes, bytes]


class ProcessorState:
    """Values of the ``state`` field of a processor's hash."""

    READY = "ready"
    """Registered and taking frames."""
    DRAINING = "draining"
    """Stopping: finishing its frames, takes no new one."""
    STOPPED = "stopped"
    """Stopped with entries left in its stream; the registry re-routes them and removes it."""
    DEAD = "dead"
    """Declared dead by the registry (no heartbeat for ``heartbeat_timeout``)."""


@dataclass(frozen=True)
class Keys:
    """The Redis key names of one namespace."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def processors(self) -> str:
        """The set of registered processor ids."""
        return f"{self.namespace}processors"

    def proc(self, processor_id: str) -> str:
        """The hash describing one processor."""
        return f"{self.namespace}proc:{processor_id}"

    def frames(self, processor_id: str) -> str:
        """The dedicated frame stream of one processor."""
        return f"{self.namespace}proc:{processor_id}:frames"

    def replies(self, registry_id: str) -> str:
        """The reply stream of one registry (router)."""
        return f"{self.namespace}replies:{registry_id}"


# -- Lua: atomic checks shared by the client and the registry ---------------------------------

class Script:
    """A Lua script run by its SHA1 (``EVALSHA``, see :meth:`Wire.run`), sent as text again
    when Redis lost it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


HEARTBEAT_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == false or state == 'dead' or state == 'stopped' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
"""KEYS: hash, set. ARGV: id, field, value, ... Writes the heartbeat unless the processor is
unknown or was deregistered (returns 0: register again)."""

ROUTE_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'ready' then return false end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV))
"""
"""KEYS: hash, stream. ARGV: field, value, ... Adds the entry only while the processor is
``ready``, so nothing lands in the stream of a processor that is stopping or dead."""

CLEANUP_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
local allowed = false
for i = 2, #ARGV do if state == ARGV[i] then allowed = true end end
if state ~= false and not allowed then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 and redis.call('XLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""
"""KEYS: hash, stream, set. ARGV: id, allowed state, ... Removes the processor when its state
is one of those given and its stream holds nothing (1); 0: entries left; -1: state changed."""

PUBLISH_LUA = """
local fields = {unpack(ARGV, 6)}
if ARGV[4] == '1' then
  if ARGV[3] ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
  else
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
end
if ARGV[5] == '1' then redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', unpack(fields)) end
local ok, acked = pcall(redis.call, 'XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if ok then return acked end
return -1
"""
"""KEYS: frame stream, result stream, reply stream. ARGV: group, entry id, result maxlen ('' =
none), publish to the result stream ('1'/'0'), reply ('1'/'0'), field, value, ... Publishes,
then acknowledges and deletes the entry: an error while publishing stops the script before the
acknowledgement, so nothing is acknowledged that was not published. -1: the group is gone."""

PUBLISH = Script(PUBLISH_LUA)
ROUTE = Script(ROUTE_LUA)

MARK_DEAD_LUA = """
local hb = redis.call('HGET', KEYS[1], 'last_heartbeat')
if hb == false then redis.call('SREM', KEYS[2], ARGV[1]) return 0 end
if hb ~= ARGV[2] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'ready' and state ~= 'draining' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'dead')
return 1
"""
"""KEYS: hash, set. ARGV: id, the heartbeat value last seen. Marks the processor dead unless a
heartbeat arrived meanwhile."""


# -- trace context ------------------------------------------------------------------------------

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_otel_modules: tuple[Any, Any, Any] | Literal[False] | None = False


def _otel() -> tuple[Any, Any, Any] | None:
    """``(opentelemetry.propagate, opentelemetry.context, opentelemetry.trace)`` when
    installed, else None."""
    global _otel_modules  # noqa: PLW0603 - a once-only import cache
    if _otel_modules is False:
        try:
            _otel_modules = (importlib.import_module("opentelemetry.propagate"),
                             importlib.import_module("opentelemetry.context"),
                             importlib.import_module("opentelemetry.trace"))
        except ImportError:
            _otel_modules = None
    return _otel_modules


def new_traceparent() -> str:
    """A fresh W3C ``traceparent``: the current OpenTelemetry span's when one is active,
    otherwise ``00-<32 hex trace id>-<16 hex span id>-01``."""
    otel = _otel()
    if otel is not None:
        carrier: dict[str, str] = {}
        otel[0].inject(carrier)
        value = carrier.get("traceparent")
        if value and _TRACEPARENT.match(value):
            return value
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def parse_traceparent(value: bytes | str | None) -> str | None:
    """The ``traceparent`` in ``value``: a traceparent string, or a JSON object holding one
    (the seed's format). None when there is none."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if text.startswith("{"):
        try:
            carrier = json.loads(text)
        except ValueError:
            return None
        found = carrier.get("traceparent") if isinstance(carrier, dict) else None
        return found if isinstance(found, str) and _TRACEPARENT.match(found) else None
    return text if _TRACEPARENT.match(text) else None


def _attach_trace(traceparent: str | None) -> object | None:
    """Make ``traceparent`` (a valid W3C traceparent, or None) the current OpenTelemetry
    context when OpenTelemetry is installed: its span context, remote, as the W3C
    propagator's ``extract`` gives it (built directly: a third of the cost). Returns the
    token for :func:`_detach_trace`, or None."""
    if traceparent is None:
        return None
    otel = _otel()
    if otel is None:
        return None
    trace_id, span_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
    if not trace_id or not span_id or traceparent.startswith("ff"):
        return None  # invalid: extract() would give no context either
    api = otel[2]
    span = api.NonRecordingSpan(api.SpanContext(
        trace_id=trace_id, span_id=span_id, is_remote=True,
        trace_flags=api.TraceFlags(int(traceparent[53:55], 16))))
    return cast(object, otel[1].attach(api.set_span_in_context(span)))


def _detach_trace(token: object | None) -> None:
    if token is not None:
        otel = _otel()
        assert otel is not None
        otel[1].detach(token)


# -- entries ----------------------------------------------------------------------------------

_MAGIC: dict[str, tuple[bytes, ...]] = {
    "jpeg": (b"\xff\xd8\xff",), "jpg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",),
}


class BadEntryError(ValueError):
    """A frame entry that cannot be handled (reported as an ``input`` error)."""


def decode_image_data(data: bytes, fmt: str = "jpeg") -> bytes:
    """The raw image bytes of an ``image_data`` field: raw bytes pass, base64 is decoded.

    For ``jpeg``/``png`` the bytes must start with the format's signature, raw or after base64
    decoding; otherwise :class:`ValueError` says what was found. Other formats pass unchecked
    (base64 is decoded when the whole field is valid base64)."""
    fmt = fmt.lower()
    if not data:
        raise BadEntryError("image_data is empty")
    magic = _MAGIC.get(fmt)
    if magic is not None and data.startswith(magic):
        return data
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        decoded = None
    if magic is None:
        return decoded if decoded else data
    if decoded is not None and decoded.startswith(magic):
        return decoded
    raise BadEntryError(f"image_data is not a {fmt} image, raw or base64 ({len(data)} bytes, "
                        f"starts {data[:8].hex()})")


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


def connect(url: str, *, retries: int = 0, connect_timeout: float = 2.0,
            socket_timeout: float | None = 10.0) -> aioredis.Redis:
    """An asyncio Redis client for ``url`` with framepipe's timeouts. ``retries`` is redis-py's
    own transparent retry count on a broken connection (callers do their own backoff)."""
    return aioredis.Redis.from_url(url, socket_connect_timeout=connect_timeout,
                                   socket_timeout=socket_timeout,
                                   retry=Retry(NoBackoff(), retries))


async def ping_with_retries(client: aioredis.Redis, url: str, *, retries: int,
                            backoff: Backoff, what: str) -> None:
    """PING until it answers, at most ``retries`` retries; then a
    :class:`RegistryConnectionError` naming ``url``."""
    attempt = 0
    while True:
        try:
            await client.ping()
            return
        except REDIS_DOWN as exc:
            attempt += 1
            if attempt > retries:
                raise RegistryConnectionError(
                    f"{what}: cannot reach Redis at {safe_url(url)} after {attempt} attempts: "
                    f"{type(exc).__name__}: {exc}", url=safe_url(url)) from exc
            await asyncio.sleep(backoff.delay(attempt))


# -- the hot path's own connections -------------------------------------------------------------


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
        data = (arg if kind is bytes else arg.encode() if kind is str
                else str(arg).encode() if kind is int or kind is float else bytes(arg))
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
        self.reader = _hiredis.Reader(replyError=ResponseError)
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = (
            collections.deque())
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
        self.fail(RedisConnectionError(f"Connection to Redis lost: {exc}" if exc is not None
                                       else "Connection closed by Redis."))

    def request(self, payload: bytes, count: int, limit: float | None, *,
                handshake: bool = False) -> list[asyncio.Future[Any]]:
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
    command itself. Error replies raise :class:`ResponseError`; a lost connection raises
    redis-py's ``ConnectionError`` (``TimeoutError`` after ``socket_timeout``) and the next
    command connects again. Opened from a redis-py client's settings (host and port or Unix
    socket, username, password, db); with TLS, a custom connection class or a credential
    provider, or without ``hiredis``, the same interface runs on a redis-py connection of
    its own."""

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        self._kwargs: dict[str, Any] = dict(pool.connection_kwargs)
        self._class: type[Any] = pool.connection_class
        timeout = self._kwargs.get("socket_timeout")
        self._timeout: float | None = float(timeout) if timeout else None
        self._connect_timeout = float(self._kwargs.get("socket_connect_timeout") or 10.0)
        self.lean = (_hiredis is not None
                     and self._class in (aioredis.Connection,
                                         aioredis.UnixDomainSocketConnection)
                     and self._kwargs.get("credential_provider") is None)
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
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def execute_many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Pipelined commands; their replies in order, error replies as ResponseError."""
        if not commands:
            return []
        if not self.lean:
            return await self._execute_py(commands, 0.0)
        proto = self._proto
        if proto is None or proto.error is not None:
            proto = self._connection()
        payload = (_pack(commands[0]) if len(commands) == 1
                   else b"".join([_pack(c) for c in commands]))
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
        except ResponseError as exc:
            if not _is_noscript(exc):
                raise
        return await self.execute("EVAL", script.text, keys, *args)

    async def run_many(self, script: Script, calls: Sequence[Sequence[Any]], *,
                       keys: int) -> list[Any]:
        """:meth:`run` for each argument list, pipelined; replies or ResponseErrors."""
        replies = await self.execute_many([("EVALSHA", script.sha, keys, *c) for c in calls])
        lost = [i for i, reply in enumerate(replies) if _is_noscript(reply)]
        if lost:
            again = await self.execute_many([("EVAL", script.text, keys, *calls[i])
                                             for i in lost])
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
                    await loop.create_connection(lambda: proto, kw.get("host") or "localhost",
                                                 int(kw.get("port") or 6379))
            hello: list[tuple[Any, ...]] = []
            if kw.get("password"):
                user = kw.get("username")
                hello.append(("AUTH", user, kw["password"]) if user
                             else ("AUTH", kw["password"]))
            if kw.get("db"):
                hello.append(("SELECT", kw["db"]))
            if kw.get("client_name"):
                hello.append(("CLIENT", "SETNAME", kw["client_name"]))
            if hello:
                futures = proto.request(b"".join(_pack(c) for c in hello), len(hello),
                                        self._timeout or self._connect_timeout, handshake=True)
                for command, future in zip(hello, futures, strict=True):
                    reply = await future
                    if isinstance(reply, ResponseError):
                        error = (AuthenticationError(str(reply)) if command[0] == "AUTH"
                                 else RedisConnectionError(f"{command[0]} failed: {reply}"))
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
                await conn.send_packed_command(conn.pack_commands(commands),
                                               check_health=False)
                replies: list[Any] = []
                for _ in commands:
                    try:
                        replies.append(await conn.read_response(
                            disable_decoding=True, timeout=self._limit(block)))
                    except ResponseError as exc:
                        replies.append(exc)
                return replies
            except BaseException:
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.disconnect(nowait=True)
                raise


def _is_noscript(reply: Any) -> bool:
    """An error reply saying Redis does not know the script (redis-py strips the prefix)."""
    return isinstance(reply, NoScriptError) or (isinstance(reply, ResponseError)
                                                and str(reply).startswith("NOSCRIPT"))


def stream_entries(reply: Any) -> list[tuple[bytes, Fields | None]]:
    """The entries of a raw ``XREAD``/``XREADGROUP`` reply (one or more streams): ``(id,
    fields)``, fields None for an entry deleted while pending."""
    out: list[tuple[bytes, Fields | None]] = []
    for _stream, entries in reply or ():
        for mid, flat in entries:
            if flat is None:
                out.append((mid, None))
            else:
                pairs = iter(flat)
                out.append((mid, dict(zip(pairs, pairs, strict=True))))
    return out


@dataclass
class _Outcome:
    ok: bool
    result: dict[str, Any] | None = None
    result_json: str | None = None
    error: str | None = None
    kind: str | None = None


class _StopWaiter:
    """What :meth:`ProcessorClient.stop` returns: await it to wait for the end, or ignore it."""

    def __init__(self, client: ProcessorClient) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, None]:
        return self._client._wait_stopped().__await__()


class ProcessorClient(abc.ABC):
    """A frame-processing service registered on Redis. Subclass it and implement
    :meth:`process_frame`; see the module docstring for the guarantees.

    ``processor_id`` must be unique in the namespace (one process per id). ``capabilities`` are
    the names a router matches (``["face_detection", "face_recognition"]``). ``capacity`` is the
    number of frames processed at once. ``result_stream`` (default ``<ns>results``) receives
    every result, trimmed to about ``result_maxlen`` entries (None: never trimmed).
    ``health_interval`` is the heartbeat period in seconds (the registry's ``heartbeat_timeout``
    must be a few times longer). ``image_encoding`` chooses what ``frame_data[b"image_data"]``
    holds: ``raw`` bytes, or ``base64`` (for code written against the seed's services).
    ``frame_timeout`` bounds one ``process_frame`` call. ``redis_client`` is used instead of
    ``redis_url`` when given (not closed by the client). ``orchestrator_url`` is accepted for
    the seed's services and ignored: registration goes through Redis.
    """

    def __init__(self, processor_id: str, capabilities: Sequence[str], capacity: int = 1,
                 result_stream: str | None = None, redis_url: str = DEFAULT_REDIS_URL,
                 health_interval: float = 5.0, namespace: str = DEFAULT_NAMESPACE, *,
                 image_encoding: Literal["raw", "base64"] = "raw",
                 frame_timeout: float | None = None, shutdown_timeout: float = 30.0,
                 connect_retries: int = 3, backoff: Backoff | None = None,
                 poll_interval: float = 0.5, result_maxlen: int | None = 10_000,
                 redis_client: aioredis.Redis | None = None,
                 orchestrator_url: str | None = None) -> None:
        if not processor_id or any(c.isspace() for c in processor_id):
            raise ValueError(f"processor_id must be a non-empty name without spaces, "
                             f"not {processor_id!r}")
        if isinstance(capabilities, str) or not capabilities or not all(
                isinstance(c, str) and c for c in capabilities):
            raise ValueError(f"processor {processor_id!r}: capabilities must be a non-empty "
                             f"list of names, not {capabilities!r}")
        if capacity < 1:
            raise ValueError(f"processor {processor_id!r}: capacity must be >= 1, not {capacity}")
        if health_interval <= 0 or poll_interval <= 0:
            raise ValueError(f"processor {processor_id!r}: health_interval and poll_interval "
                             "must be positive")
        if image_encoding not in ("raw", "base64"):
            raise ValueError(f"image_encoding must be 'raw' or 'base64', not {image_encoding!r}")
        self.processor_id = processor_id
        self.capabilities = tuple(dict.fromkeys(capabilities))
        self.capacity = capacity
        self.namespace = namespace
        self.keys = Keys(namespace)
        self.result_stream = result_stream or f"{namespace}results"
        self.redis_url = redis_url
        self.health_interval = health_interval
        self.image_encoding = image_encoding
        self.frame_timeout = frame_timeout
        self.shutdown_timeout = shutdown_timeout
        self.connect_retries = connect_retries
        self.backoff = backoff or Backoff(0.5, 2.0, 30.0, 0.1)
        self.poll_interval = poll_interval
        self.result_maxlen = result_maxlen
        self.orchestrator_url = orchestrator_url
        self.stream = self.keys.frames(processor_id)
        self.log = get_logger(f"processor:{processor_id}", "framepipe.processors.client")
        self.processed = 0
        """Frames handled with an ``ok`` result."""
        self.failed = 0
        """Frames reported as errors."""
        self.max_in_flight = 0
        """The most frames that were inside ``process_frame`` at once."""
        self._external = redis_client
        self._redis: aioredis.Redis | None = redis_client
        self._inflight: dict[bytes, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stopped_event: asyncio.Event | None = None
        self._stop_requested = False
        self._registered = asyncio.Event()
        self._draining_task: asyncio.Task[None] | None = None
        self._slot: asyncio.Future[None] | None = None
        self._reads: Wire | None = None  # XREADGROUP (blocks)
        self._writes: Wire | None = None  # publish + acknowledge
        self._running = False

    # -- what a subclass implements ---------------------------------------------------------

    @abc.abstractmethod
    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        """Handle one frame. ``frame_data`` holds the entry's raw fields (bytes keys and
        values; ``image_data`` as chosen by ``image_encoding``). Return a JSON-serialisable
        dict (published as the result), or None (no result to publish). Raising reports an
        error result for this frame; the client goes on."""

    # -- helpers for subclasses -------------------------------------------------------------

    def decode_image(self, frame_data: Mapping[bytes, bytes]) -> npt.NDArray[np.uint8]:
        """The frame's image as a BGR array (OpenCV); raises :class:`FrameError` on bad data."""
        from framepipe.frames import decode_jpeg

        data = frame_data[b"image_data"]
        if self.image_encoding == "base64":
            data = base64.b64decode(data)
        return decode_jpeg(data)

    @staticmethod
    def metadata(frame_data: Mapping[bytes, bytes]) -> dict[str, Any]:
        """The entry's ``metadata`` JSON object ({} when absent)."""
        raw = frame_data.get(b"metadata")
        return dict(json.loads(raw)) if raw else {}

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Frames being processed now."""
        return len(self._inflight)

    @property
    def running(self) -> bool:
        """True from :meth:`start` until it returns."""
        return self._running

    async def wait_registered(self) -> None:
        """Wait until the processor is registered (bound it with ``asyncio.timeout``)."""
        await self._registered.wait()

    def install_signal_handlers(self, signals: Sequence[int] = (signal.SIGTERM,
                                                                 signal.SIGINT)) -> None:
        """Stop gracefully on ``signals`` (call inside the running loop, before ``start``)."""
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)

    def stop(self) -> _StopWaiter:
        """Ask the client to stop (see the module docstring). Safe from a signal handler or
        another thread; ``await client.stop()`` also waits until ``start()`` has finished."""
        self._stop_requested = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_stop)
        return _StopWaiter(self)

    def _on_stop(self) -> None:
        """In the loop: take no new frame; tell the routers at once (``draining``)."""
        if self._stop_event is None or self._stop_event.is_set():
            return
        self._stop_event.set()
        if self._registered.is_set() and self._draining_task is None:
            self._draining_task = asyncio.ensure_future(self._set_draining())
        self._wake()

    def _wake(self) -> None:
        """Wake the consumer waiting for a free slot (a frame finished, or stopping)."""
        slot = self._slot
        if slot is not None and not slot.done():
            slot.set_result(None)

    async def _wait_stopped(self) -> None:
        if self._stopped_event is not None and self._running:
            await self._stopped_event.wait()

    async def run(self) -> None:
        """:meth:`start` with SIGTERM/SIGINT handlers installed (the service's main)."""
        self.install_signal_handlers()
        await self.start()

    async def start(self) -> None:
        """Connect, register, and process frames until stopped; returns after the graceful
        shutdown. Raises :class:`RegistryConnectionError` when Redis cannot be reached at
        start (after ``connect_retries`` retries)."""
        if self._running:
            raise RuntimeError(f"processor {self.processor_id!r} is already running")
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._stopped_event = asyncio.Event()
        self._registered.clear()
        if self._stop_requested:
            self._stop_event.set()
        self._running = True
        try:
            if self._redis is None:
                self._redis = connect(self.redis_url)
            what = f"processor {self.processor_id!r}"
            await ping_with_retries(self._redis, self.redis_url, retries=self.connect_retries,
                                    backoff=self.backoff, what=what)
            try:
                await self._register()
            except REDIS_DOWN as exc:
                raise RegistryConnectionError(
                    f"{what}: lost Redis at {safe_url(self.redis_url)} while registering: "
                    f"{type(exc).__name__}: {exc}", url=safe_url(self.redis_url)) from exc
            self._reads, self._writes = Wire(self._redis), Wire(self._redis)
            beat_done = asyncio.Event()
            heartbeat = asyncio.create_task(self._heartbeat_loop(beat_done),
                                            name=f"{self.processor_id}:heartbeat")
            try:
                await self._serve()
            finally:
                await self._shutdown(heartbeat, beat_done)
        finally:
            for wire in (self._reads, self._writes):
                if wire is not None:
                    await wire.close()
            self._reads = self._writes = None
            if self._external is None and self._redis is not None:
                await self._redis.aclose()
                self._redis = None
            self._running = False
            self._stop_requested = False
            self._stopped_event.set()

    # -- registration and heartbeats -------------------------------------------------------

    def _hash_fields(self) -> dict[Any, Any]:
        return {"id": self.processor_id, "capabilities": json.dumps(list(self.capabilities)),
                "capacity": self.capacity, "result_stream": self.result_stream,
                "stream": self.stream, "group": GROUP, "state": ProcessorState.READY,
                "last_heartbeat": repr(time.time()), "in_flight": self.in_flight,
                "processed": self.processed, "failed": self.failed,
                "registered_at": repr(time.time()), "pid": os.getpid(),
                "host": socket.gethostname()}

    async def _register(self) -> None:
        """Create the stream and group, then (atomically) the hash and set membership."""
        redis = self._require_redis()
        try:
            await redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.proc(self.processor_id), mapping=self._hash_fields())
            pipe.sadd(self.keys.processors, self.processor_id)
            await pipe.execute()
        if not self._registered.is_set():
            self.log.info("Registered: capabilities=%s capacity=%d stream=%s results=%s",
                          ",".join(self.capabilities), self.capacity, self.stream,
                          self.result_stream)
        self._registered.set()

    async def _heartbeat_loop(self, done: asyncio.Event) -> None:
        redis = self._require_redis()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.health_interval)
            if done.is_set():
                return
            try:
                alive = await redis.eval(
                    HEARTBEAT_LUA, 2, self.keys.proc(self.processor_id), self.keys.processors,
                    self.processor_id, "last_heartbeat", repr(time.time()),
                    "in_flight", self.in_flight, "processed", self.processed,
                    "failed", self.failed, "max_in_flight", self.max_in_flight)
                if not alive and not self._stopping:
                    self.log.warning("Found itself deregistered (declared dead or Redis lost "
                                     "its data); registering again")
                    await self._register()
            except REDIS_DOWN as exc:
                self.log.debug("heartbeat failed: %s", exc)
            except Exception as exc:  # keep beating: a dead heartbeat would get it reaped
                self.log.exception("heartbeat failed: %s", type(exc).__name__)

    # -- consuming --------------------------------------------------------------------------

    @property
    def _stopping(self) -> bool:
        return self._stop_event is None or self._stop_event.is_set()

    def _require_redis(self) -> aioredis.Redis:
        if self._redis is None:
            raise RuntimeError(f"processor {self.processor_id!r} is not running")
        return self._redis

    async def _serve(self) -> None:
        """Consume until stopped; reconnect with backoff while Redis is away."""
        failures = 0
        need_register = False
        while not self._stopping:
            try:
                if need_register:
                    await self._register()
                    need_register = False
                    if failures:
                        self.log.info("Reconnected to Redis after %d attempts", failures)
                    failures = 0
                await self._consume()
            except REDIS_DOWN as exc:
                failures += 1
                need_register = True
                delay = self.backoff.delay(failures)
                log = self.log.warning if failures == 1 else self.log.info
                log("Redis at %s unreachable (%s: %s); reconnecting in %.1fs (attempt %d)",
                    safe_url(self.redis_url), type(exc).__name__, exc, delay, failures)
                await self._sleep_unless_stopping(delay)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                self.log.warning("Its stream or group disappeared (deregistered as dead, or "
                                 "Redis lost its data); registering again")
                need_register = True

    async def _sleep_unless_stopping(self, delay: float) -> None:
        assert self._stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), delay)

    async def _recover(self) -> list[tuple[bytes, Fields]]:
        """Claim every entry pending in the stream (this processor's earlier life, or handed
        back by the registry) that is not being processed here now."""
        redis = self._require_redis()
        backlog: list[tuple[bytes, Fields]] = []
        start: bytes | str = "0-0"
        while True:
            reply = await redis.xautoclaim(self.stream, GROUP, self.processor_id, 0,
                                           start_id=start, count=100)
            start, entries = reply[0], reply[1]
            backlog += [(mid, fields) for mid, fields in entries
                        if fields is not None and mid not in self._inflight]
            if start in (b"0-0", "0-0"):
                break
        if backlog:
            self.log.info("Took back %d pending frame(s)", len(backlog))
        return backlog

    async def _consume(self) -> None:
        reads = self._reads
        assert reads is not None
        loop = asyncio.get_running_loop()
        backlog = await self._recover()
        block_ms = max(1, int(self.poll_interval * 1000))
        while not self._stopping:
            free = self.capacity - len(self._inflight)
            if free <= 0:  # wait for a frame to finish (or stop())
                self._slot = loop.create_future()
                try:
                    await self._slot
                finally:
                    self._slot = None
                continue
            if backlog:
                for mid, fields in backlog[:free]:
                    self._spawn(mid, fields)
                del backlog[:free]
                continue
            # stop() marks the processor draining at once; the read ends within poll_interval
            reply = await reads.execute(
                "XREADGROUP", "GROUP", GROUP, self.processor_id, "COUNT", free, "BLOCK",
                block_ms, "STREAMS", self.stream, ">", block=self.poll_interval)
            if reply:
                for mid, entry in stream_entries(reply):
                    self._spawn(mid, entry)

    def _spawn(self, mid: bytes, fields: Fields | None) -> None:
        if fields is None:  # deleted while pending
            return
        task = asyncio.create_task(self._handle(mid, fields), name=f"{self.processor_id}:{mid!r}")
        self._inflight[mid] = task
        self.max_in_flight = max(self.max_in_flight, len(self._inflight))
        task.add_done_callback(functools.partial(self._finished, mid))

    def _finished(self, mid: bytes, task: asyncio.Task[None]) -> None:
        if self._inflight.get(mid) is task:
            del self._inflight[mid]
        self._wake()
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.error("handling entry %s failed unexpectedly: %r", mid.decode(), exc,
                           exc_info=exc)

    # -- one frame ----------------------------------------------------------------------------

    def _prepare(self, fields: Fields) -> Fields:
        """Validate an entry; the ``frame_data`` given to ``process_frame``."""
        frame_id = fields.get(b"frame_id")
        if not frame_id:
            raise BadEntryError("entry lacks 'frame_id'")
        image = fields.get(b"image_data")
        if image is None:
            raise BadEntryError("entry lacks 'image_data'")
        fmt = _text(fields.get(b"format")) or "jpeg"
        raw = decode_image_data(image, fmt)
        for name in (b"width", b"height"):
            value = fields.get(name)
            if value is not None and value != b"" and not value.isdigit():
                raise BadEntryError(f"{name.decode()} is not a whole number: {value[:20]!r}")
        meta = fields.get(b"metadata")
        if meta:
            try:
                parsed = json.loads(meta)
            except ValueError as exc:
                raise BadEntryError(f"metadata is not JSON: {exc}") from exc
            if not isinstance(parsed, dict):
                raise BadEntryError(f"metadata is not a JSON object: {meta[:40]!r}")
        data = dict(fields)
        data[b"image_data"] = base64.b64encode(raw) if self.image_encoding == "base64" else raw
        return data

    async def _run_user(self, data: Fields, traceparent: str | None) -> _Outcome:
        deadline = None if self.frame_timeout is None else asyncio.timeout(self.frame_timeout)
        token = _attach_trace(traceparent)
        try:
            if deadline is None:
                result = await self.process_frame(data)
            else:
                async with deadline:
                    result = await self.process_frame(data)
        except Exception as exc:
            if deadline is not None and deadline.expired():
                return _Outcome(False, kind="processor", error=(
                    f"process_frame took longer than frame_timeout={self.frame_timeout:g}s"))
            self.log.warning("process_frame raised for frame %s: %s: %s",
                             _text(data.get(b"frame_id")), type(exc).__name__, exc,
                             exc_info=exc)
            return _Outcome(False, error=f"{type(exc).__name__}: {exc}", kind="processor")
        finally:
            _detach_trace(token)
        if result is None:
            return _Outcome(True)
        if not isinstance(result, dict):
            return _Outcome(False, kind="output", error=(
                f"process_frame returned {type(result).__name__}, expected a dict or None"))
        try:
            text = json.dumps(result, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return _Outcome(False, kind="output", error=(
                f"process_frame returned a result that is not JSON-serialisable: {exc}"))
        return _Outcome(True, result=result, result_json=text)

    async def _handle(self, mid: bytes, fields: Fields) -> None:
        started = time.perf_counter()
        traceparent = parse_traceparent(fields.get(b"trace_context"))
        try:
            data = self._prepare(fields)
        except BadEntryError as exc:
            self.log.warning("Malformed entry %s (frame %s): %s", mid.decode(),
                             _text(fields.get(b"frame_id")) or "?", exc)
            outcome = _Outcome(False, error=str(exc), kind="input")
        else:
            outcome = await self._run_user(data, traceparent)
        if outcome.ok:
            self.processed += 1
        else:
            self.failed += 1
        payload = self._result_fields(mid, fields, outcome, traceparent,
                                      (time.perf_counter() - started) * 1000.0)
        await self._publish(mid, fields, outcome, payload)
        if self._inflight.get(mid) is asyncio.current_task():  # free the slot now, not
            del self._inflight[mid]  # a loop turn later in the task's done callback
            self._wake()

    def _result_fields(self, mid: bytes, fields: Fields, outcome: _Outcome,
                       traceparent: str | None, duration_ms: float) -> dict[str, str | bytes]:
        trace = fields.get(b"trace_context") or (traceparent or new_traceparent()).encode()
        payload: dict[str, str | bytes] = {
            "frame_id": fields.get(b"frame_id", b""), "camera_id": fields.get(b"camera_id", b""),
            "processor_id": self.processor_id, "capability": fields.get(b"capability", b""),
            "status": "ok" if outcome.ok else "error", "trace_context": trace,
            "duration_ms": f"{duration_ms:.3f}", "processed_at": repr(time.time()),
            "entry_id": mid}
        if outcome.result_json is not None:
            payload["result"] = outcome.result_json
        if not outcome.ok:
            payload["error"] = outcome.error or "error"
            payload["error_kind"] = outcome.kind or "processor"
        return payload

    async def _publish(self, mid: bytes, fields: Fields, outcome: _Outcome,
                       payload: dict[str, str | bytes]) -> None:
        """Publish and acknowledge atomically; retry while Redis is away (the entry stays
        pending if this task is cancelled at shutdown)."""
        reply_to = fields.get(b"reply_to") or b""
        to_results = outcome.result_json is not None or not outcome.ok
        args: list[str | bytes] = [GROUP, mid, "" if self.result_maxlen is None
                                   else str(self.result_maxlen), "1" if to_results else "0",
                                   "1" if reply_to else "0"]
        for key, value in payload.items():
            args += [key, value]
        attempt = 0
        while True:
            wire = self._writes
            if wire is None:
                raise RuntimeError(f"processor {self.processor_id!r} is not running")
            try:
                acked = await wire.run(PUBLISH, self.stream, self.result_stream,
                                       reply_to or self.stream, *args, keys=3)
            except REDIS_DOWN as exc:
                attempt += 1
                delay = self.backoff.delay(attempt)
                self.log.debug("publishing the result of %s failed (%s); retry in %.1fs",
                               mid.decode(), exc, delay)
                await asyncio.sleep(delay)
                continue
            if acked == -1:  # the group was dropped meanwhile (Redis lost its data)
                self.log.debug("published %s; its group is gone, nothing to acknowledge",
                               mid.decode())
            return

    # -- shutdown -----------------------------------------------------------------------------

    async def _set_draining(self) -> None:
        try:
            await self._require_redis().hset(self.keys.proc(self.processor_id), "state",
                                             ProcessorState.DRAINING)
        except REDIS_DOWN as exc:
            self.log.warning("could not mark itself draining: %s", exc)

    async def _shutdown(self, heartbeat: asyncio.Task[None], beat_done: asyncio.Event) -> None:
        self.log.info("Stopping: %d frame(s) in flight", len(self._inflight))
        if self._draining_task is None:
            self._draining_task = asyncio.ensure_future(self._set_draining())
        await self._draining_task
        self._draining_task = None
        if self._inflight:
            _done, pending = await asyncio.wait(set(self._inflight.values()),
                                                timeout=self.shutdown_timeout)
            if pending:
                self.log.warning("%d frame(s) unfinished after %.1fs; left pending for the "
                                 "registry to re-route", len(pending), self.shutdown_timeout)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5.0)
        # no cancel: redis-py can swallow a cancellation mid-command (redis/redis-py#2028)
        beat_done.set()
        await asyncio.wait({heartbeat}, timeout=15.0)
        await self._deregister()

    async def _deregister(self) -> None:
        redis = self._require_redis()
        try:
            removed = await redis.eval(
                CLEANUP_LUA, 3, self.keys.proc(self.processor_id), self.stream,
                self.keys.processors, self.processor_id, ProcessorState.DRAINING)
            if removed == 0:
                await redis.hset(self.keys.proc(self.processor_id), "state",
                                 ProcessorState.STOPPED)
                self.log.info("Stopped; entries left in its stream go back to the registry")
            else:
                self.log.info("Deregistered (processed=%d failed=%d)", self.processed,
                              self.failed)
        except REDIS_DOWN as exc:
            self.log.warning("could not deregister (Redis unreachable: %s); the registry will "
                             "declare it dead", exc)

