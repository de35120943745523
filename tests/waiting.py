"""Waiting in tests: a free loopback port, and polls that give up with a message naming what
they waited for (the test's own patience, never an assertion about speed).

``wait_until`` and ``wait_until_async`` return the check's first truthy value, so a test can
wait for a thing and use it: ``row = wait_until("the row", lambda: fetch(id))``. ``explain``
(a callable returning text) is added to the failure message: a log tail, the last state seen.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["free_port", "wait_until", "wait_until_async"]


_PORTS = range(20000, 32768)
"""Where :func:`free_port` looks: below Linux's ephemeral range (32768-60999 by default), so
the port is not handed to an outgoing connection (to PostgreSQL, Redis, ...) between the call
and the server's bind, as a port the kernel picks with ``bind(0)`` can be."""

_next: dict[str, int] = {}


def _my_ports() -> range:
    """This process's share of :data:`_PORTS`: under pytest-xdist each worker has a slice of
    its own, so parallel workers never pick the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    size = len(_PORTS) // max(count, 1)
    start = _PORTS.start + (index % max(count, 1)) * size
    return range(start, start + size)


def _ephemeral() -> range:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (nothing listens there) and that no other
    call of this process, nor another xdist worker of this run, hands out: each call moves on
    through this process's share of ports 20000-32767 from a random start (another test run
    on the machine starts elsewhere), skipping ports in use. Falls back to a port the kernel
    picks when the machine's ephemeral range overlaps the share."""
    ports = _my_ports()
    ephemeral = _ephemeral()
    if ports.start in ephemeral or ports[-1] in ephemeral:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    at = _next.setdefault("at", random.randrange(len(ports)))
    for step in range(len(ports)):
        port = ports[(at + step) % len(ports)]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _next["at"] = (at + step + 1) % len(ports)
        return port
    raise RuntimeError(f"no free TCP port on 127.0.0.1 in {ports.start}-{ports[-1]}")


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
