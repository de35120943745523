"""Waiting in tests: a free loopback port, and polls that give up with a message naming what
they waited for (the test's own patience, never an assertion about speed).

``wait_until`` and ``wait_until_async`` return the check's first truthy value, so a test can
wait for a thing and use it: ``row = wait_until("the row", lambda: fetch(id))``. ``explain``
(a callable returning text) is added to the failure message: a log tail, the last state seen.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["free_port", "wait_until", "wait_until_async"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (nothing listens there now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _gave_up(
    what: str, timeout: float, last: object, explain: Callable[[], object] | None
) -> AssertionError:
    message = f"timed out after {timeout:g} s waiting for {what} (last check: {last!r})"
    if explain is not None:
        message += f"\n{explain()}"
    return AssertionError(message)


def wait_until(
    what: str,
    check: Callable[[], T],
    timeout: float = 30.0,
    *,
    interval: float = 0.05,
    explain: Callable[[], object] | None = None,
) -> T:
    """Call ``check()`` until it returns something truthy and return that; after ``timeout``
    seconds fail with an ``AssertionError`` naming ``what``. The check runs at least once, and
    once more at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        last_try = time.monotonic() >= deadline
        value = check()
        if value:
            return value
        if last_try:
            raise _gave_up(what, timeout, value, explain)
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def wait_until_async(
    what: str,
    check: Callable[[], T | Awaitable[T]],
    timeout: float = 30.0,  # noqa: ASYNC109 - a poll's own patience
    *,
    interval: float = 0.02,
    explain: Callable[[], object] | None = None,
) -> T:
    """:func:`wait_until` inside an event loop: ``check`` may be a plain function or a
    coroutine function; the loop runs between tries."""
    deadline = time.monotonic() + timeout
    while True:
        last_try = time.monotonic() >= deadline
        value: Any = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[no-any-return]
        if last_try:
            raise _gave_up(what, timeout, value, explain)
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
