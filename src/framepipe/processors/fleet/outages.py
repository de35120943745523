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

The refusals come as redis-py's own classes (``OutOfMemoryError``, ``ReadOnlyError``, ... with
the code stripped from the message) or, on a :class:`~framepipe.redis.wire.Wire` connection,
as a plain ``ResponseError`` whose message starts with the code: both are recognised.
"""

from __future__ import annotations

from framepipe.redis.connection import REDIS_DOWN, ResponseError

__all__ = ["REDIS_ERRORS", "REFUSALS", "refusal", "unavailable"]

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
    if not isinstance(exc, ResponseError):
        return None
    code = getattr(exc, "status_code", None) or str(exc).split(" ", 1)[0]
    return code if code in REFUSALS else None


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means Redis cannot serve now (unreachable, or a refusal): retry later."""
    return isinstance(exc, REDIS_DOWN) or refusal(exc) is not None
