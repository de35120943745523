"""The socket a service listens on, bound and listening before it starts, so the address it
prints is the one it serves (a port the system picks included) and a client that connects as
soon as it is printed is not refused: its connection waits in the backlog until the service
accepts it."""

from __future__ import annotations

import errno
import socket

from framepipe.errors import ConfigError

__all__ = ["BACKLOG", "listen"]

BACKLOG = 2048
"""Connections the socket queues before the service accepts them (uvicorn's default)."""


def listen(host: str, port: int, *, exact: bool = True, busy_hint: str = "") -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (``port`` 0: one the system picks;
    ``sock.getsockname()`` says which); connections wait in its backlog (:data:`BACKLOG`, as
    uvicorn's) until the service accepts them. When the port is in use and not ``exact``, one
    bound to a free port instead; otherwise a :class:`ConfigError` naming the address (with
    ``busy_hint`` added when the port is in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for candidate in (port, 0):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            busy = exc.errno == errno.EADDRINUSE
            if busy and not exact and candidate:
                continue
            hint = f" ({busy_hint})" if busy and busy_hint else ""
            raise ConfigError(f"cannot listen on {host}:{candidate}: {exc.strerror}{hint}") from exc
        sock.listen(BACKLOG)
        return sock
    raise AssertionError("unreachable: binding port 0 either works or raises")
