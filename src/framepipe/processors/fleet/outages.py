"""Redis away, or refusing for a while: what the fleet waits out instead of failing for good.

A server can be unreachable (the connection refused, lost, timed out: :data:`REDIS_DOWN`) or
answer that it cannot serve now: ``LOADING`` while it reads its data back after a restart
with persistence, ``BUSY`` while a script runs too long, ``OOM`` at ``maxmemory`` (writes
refused until memory is freed), ``READONLY`` or ``MASTERDOWN`` after a failover,
``MISCONF`` when it cannot persist, ``TRYAGAIN``/``CLUSTERDOWN``/``NOREPLICAS``. Each of these
passes once the server (or its operator) is done, so the fleet's loops treat them as an
outage (:func:`unavailable`): they back off and retry, a route fails with
:class:`~framepipe.errors.RegistryConnectionError`, and none of them kills a processor or
fails a registry for good.

Every connection the fleet uses gives redis-py's own errors (:class:`~framepipe.redis.wire.Wire`
parses error replies as redis-py does): the refusals redis-py has a class for by that class
(``BusyLoadingError``, ``OutOfMemoryError``, ``ReadOnlyError``, ...: the code is stripped from
the message), the others (``BUSY``, ``MISCONF``, ``NOREPLICAS``) as a ``ResponseError`` whose
message starts with the code.

A server refusing the credentials (``NOAUTH``, ``WRONGPASS``: redis-py's
``AuthenticationError``, a ``ConnectionError`` by its class) is no outage but a wrong setting:
:func:`reach` fails a start on it at once with :class:`~framepipe.errors.ConfigError`, and a
loop that meets it later (a password changed on the server) says so plainly
(:func:`outage`), at error level, instead of calling Redis unreachable. A server at its
``maxclients`` is waited out like an outage, and named as what it is.
"""

from __future__ import annotations

from framepipe.redis.connection import (
    REDIS_DOWN,
    ResponseError,
    denied,
    ping_with_retries,
    refused_credentials,
)
from framepipe.redis.urls import safe_url

try:
    from redis.exceptions import (
        BusyLoadingError,
        ClusterDownError,
        MasterDownError,
        MaxClientsReachedError,
        OutOfMemoryError,
        ReadOnlyError,
        TryAgainError,
    )
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    from framepipe.errors import MissingDependencyError

    raise MissingDependencyError("redis", "redis", "Talking to Redis") from _exc

__all__ = [
    "REDIS_ERRORS",
    "REFUSALS",
    "denied",
    "kind",
    "outage",
    "reach",
    "refusal",
    "unavailable",
]

_CLASSES: tuple[tuple[type[BaseException], str], ...] = (
    (BusyLoadingError, "LOADING"),
    (OutOfMemoryError, "OOM"),
    (ReadOnlyError, "READONLY"),
    (MasterDownError, "MASTERDOWN"),  # (before its base class, ClusterDownError)
    (ClusterDownError, "CLUSTERDOWN"),
    (TryAgainError, "TRYAGAIN"),
)

REFUSALS = frozenset(
    {
        "LOADING",
        "BUSY",
        "OOM",
        "READONLY",
        "MASTERDOWN",
        "MISCONF",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOREPLICAS",
    }
)
"""Error codes with which a server says it cannot serve now (it may later)."""

REDIS_ERRORS: tuple[type[BaseException], ...] = (*REDIS_DOWN, ResponseError)
"""What to catch around a command where :func:`unavailable` decides: wait, or raise."""


def refusal(exc: BaseException) -> str | None:
    """The code of a refusal (one of :data:`REFUSALS`) ``exc`` is; None for anything else."""
    for kind, code in _CLASSES:
        if isinstance(exc, kind):
            return code
    if not isinstance(exc, ResponseError):
        return None
    code = str(exc).split(" ", 1)[0]
    return code if code in REFUSALS else None


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis cannot serve now (unreachable, or a refusal): retry later.
    Credentials refused (:func:`denied`) count too, once a client runs: the operator may set
    the password back on the server, and the loops say plainly what it is (:func:`outage`)."""
    return isinstance(exc, REDIS_DOWN) or refusal(exc) is not None


def kind(exc: BaseException) -> str:
    """What sort of outage ``exc`` is, for a loop to say each sort once: ``"denied"``
    (:func:`denied`), ``"maxclients"``, else ``"down"`` (unreachable, or a refusal)."""
    if denied(exc):
        return "denied"
    if isinstance(exc, MaxClientsReachedError):
        return "maxclients"
    return "down"


def outage(url: str, exc: BaseException) -> str:
    """What a loop waiting ``exc`` out says, the URL's password masked: ``"Redis at <url>
    unreachable (<error>)"``, or what it is when it is not a network failure (credentials
    refused: fix the URL; ``maxclients`` reached)."""
    why = f"{type(exc).__name__}: {exc}"
    where = f"Redis at {safe_url(url)}"
    if denied(exc):
        return refused_credentials(url, exc)
    if isinstance(exc, MaxClientsReachedError):
        return f"{where} refuses new connections: its maxclients is reached ({why})"
    return f"{where} unreachable ({why})"


reach = ping_with_retries
"""A start's PING with retries: :func:`framepipe.redis.connection.ping_with_retries` (a wrong
password fails at once with :class:`~framepipe.errors.ConfigError`)."""
