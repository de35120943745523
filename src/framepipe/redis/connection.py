"""Connections to Redis with framepipe's settings, and what to say when Redis is not there.

Every framepipe client of Redis is made here (:func:`connect` for asyncio, :func:`connect_sync`
for threads), so timeouts and retries are chosen in one place; :func:`ping_with_retries` turns
an unreachable server into one clear error naming the URL with its password masked.

Credentials Redis refuses (:func:`denied`: a wrong password or user) are a setting to fix, not
an outage to wait out: a start fails on them at once with :func:`refused` (a
:class:`~framepipe.errors.ConfigError`), in :func:`ping_with_retries` or, for a client that
waits Redis out in the background, in :func:`check_credentials`. A running client that meets
them later (a password changed on the server) keeps retrying and says
:func:`refused_credentials`, never that Redis is unreachable.
"""

from __future__ import annotations

import asyncio
from typing import Any

from framepipe.backoff import Backoff
from framepipe.errors import ConfigError, MissingDependencyError, RegistryConnectionError
from framepipe.redis.urls import check_redis_url, safe_url

try:
    import redis
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from redis.retry import Retry as SyncRetry
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("redis", "redis", "Talking to Redis") from _exc

__all__ = [
    "REDIS_DOWN",
    "ResponseError",
    "check_credentials",
    "connect",
    "connect_sync",
    "denied",
    "lost",
    "ping_with_retries",
    "refused",
    "refused_credentials",
    "unreachable",
]

REDIS_DOWN: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
)
"""Exceptions that mean "Redis is not reachable right now" (retry later)."""


def connect(
    url: str,
    *,
    retries: int | None = 0,
    connect_timeout: float | None = 2.0,
    socket_timeout: float | None = 10.0,
    **options: Any,
) -> aioredis.Redis:
    """An asyncio client for ``url``. ``connect_timeout``/``socket_timeout`` in seconds (None:
    none); ``retries`` is redis-py's own transparent retry count on a broken connection, done
    at once (callers do their own backoff; None keeps redis-py's default retry policy).
    ``options`` go to ``redis.asyncio.Redis.from_url`` as they are. A URL that can never
    reach Redis is a :class:`~framepipe.errors.ConfigError` at once (:func:`check_redis_url`)."""
    check_redis_url(url)
    if retries is not None:
        options["retry"] = Retry(NoBackoff(), retries)
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout, **options
    )


def connect_sync(
    url: str,
    *,
    retries: int | None = 0,
    connect_timeout: float | None = 2.0,
    socket_timeout: float | None = 10.0,
    **options: Any,
) -> redis.Redis:
    """:func:`connect` for blocking code (``redis.Redis``), with the same arguments."""
    check_redis_url(url)
    if retries is not None:
        options["retry"] = SyncRetry(NoBackoff(), retries)
    return redis.Redis.from_url(
        url, socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout, **options
    )


def unreachable(what: str, url: str, exc: BaseException, *, attempts: int) -> str:
    """``"<what>: cannot reach Redis at <url> after <attempts> attempts: <error>"``, the URL's
    password masked: for a server that never answered."""
    return (
        f"{what}: cannot reach Redis at {safe_url(url)} after {attempts} attempts: "
        f"{type(exc).__name__}: {exc}"
    )


def lost(what: str, url: str, exc: BaseException, *, during: str | None = None) -> str:
    """``"<what>: lost Redis at <url>[ while <during>]: <error>"``, the URL's password masked:
    for a server that answered before."""
    doing = f" while {during}" if during else ""
    return f"{what}: lost Redis at {safe_url(url)}{doing}: {type(exc).__name__}: {exc}"


def denied(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing the credentials (a wrong password or user: redis-py's
    ``AuthenticationError``, a ``ConnectionError`` by its class, or ``AuthorizationError``):
    a wrong setting, which no waiting mends."""
    return isinstance(exc, (AuthenticationError, AuthorizationError))


def refused_credentials(url: str, exc: BaseException) -> str:
    """``"Redis at <url> refuses the credentials (<error>): check ..."``, the URL's password
    masked."""
    return (
        f"Redis at {safe_url(url)} refuses the credentials ({type(exc).__name__}: {exc}): "
        "check the password (and user) in the URL"
    )


def refused(what: str, url: str, exc: BaseException) -> ConfigError:
    """The error a start of ``what`` fails with when Redis refuses its credentials
    (:func:`denied`): ``"<what>: Redis at <url> refuses the credentials (<error>): check
    ..."``, the URL's password masked."""
    return ConfigError(f"{what}: {refused_credentials(url, exc)}")


async def check_credentials(client: aioredis.Redis, url: str, *, what: str, within: float) -> None:
    """The start of ``what``, a client that waits Redis out in the background: one PING,
    given at most ``within`` seconds. Credentials refused (:func:`denied`) fail it at once
    with :func:`refused`; anything else (Redis unreachable, silent, refusing for a while)
    returns, for the client's own retries to meet."""
    try:
        await asyncio.wait_for(client.ping(), within)
    except Exception as exc:
        if denied(exc):
            raise refused(what, url, exc) from exc


async def ping_with_retries(
    client: aioredis.Redis, url: str, *, retries: int, backoff: Backoff, what: str
) -> None:
    """PING until it answers, at most ``retries`` retries (waiting ``backoff`` between them);
    then a :class:`~framepipe.errors.RegistryConnectionError` with the :func:`unreachable`
    message. Credentials refused (:func:`denied`) fail at once with
    :class:`~framepipe.errors.ConfigError` (:func:`refused_credentials`). Never waits longer
    than the retries' delays and the client's timeouts."""
    attempt = 0
    while True:
        try:
            await client.ping()
            return
        except REDIS_DOWN as exc:
            if denied(exc):
                raise refused(what, url, exc) from exc
            attempt += 1
            if attempt > retries:
                raise RegistryConnectionError(
                    unreachable(what, url, exc, attempts=attempt), url=safe_url(url)
                ) from exc
            await asyncio.sleep(backoff.delay(attempt))
