"""A processor's HTTP health endpoint (``ProcessorClient(..., health_port=8080)``).

What a compose ``healthcheck`` (``curl -f http://localhost:8080/health``, behind
``depends_on: condition: service_healthy``) or an HTTP probe asks: ``GET /health`` (also
``/healthz`` and ``/``) answers ``200`` while the processor is registered and taking frames
(state ``ready``), ``503`` otherwise (``starting``: connecting to Redis or registering;
``reconnecting``: Redis lost; ``draining``; ``stopped``), with a JSON body of the processor's
state either way::

    {"status": "healthy", "state": "ready", "processor_id": "face-recognition-1",
     "capabilities": [...], "capacity": 10, "in_flight": 0, "processed": 12, "failed": 0,
     "expired": 0, "last_heartbeat": 1795311526.58, "uptime_s": 31.2,
     "redis": "redis://redis:6379/0",
     "namespace": "framepipe:", "result_stream": "faces:detected", "orchestrator_url": ...}

``HEAD`` gives the status line alone; other methods ``405``, other paths ``404``.

Bounds: it listens on ``health_host`` (default ``127.0.0.1``: a compose healthcheck runs
inside the processor's container, so loopback is enough and nothing else can reach it; give
``0.0.0.0`` for probes from outside, such as Kubernetes or another container); a request's
head may be at most 8 KiB and must arrive within 5 s; every connection is closed after one
answer; at most 16 connections are served at once (more are closed at once). A port already in
use fails the processor's start with :class:`~framepipe.errors.ConfigError` naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

from framepipe.errors import ConfigError
from framepipe.logs import ComponentLogger

__all__ = ["HEALTH_PATHS", "HealthServer"]

HEALTH_PATHS = ("/health", "/healthz", "/")
MAX_HEAD = 8 * 1024
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 16

Snapshot = Callable[[], tuple[bool, dict[str, Any]]]
"""Returns (healthy, the body's fields)."""


class HealthServer:
    """Serves ``snapshot()`` over HTTP on ``host``:``port`` (see the module docstring)."""

    def __init__(self, host: str, port: int, snapshot: Snapshot, log: ComponentLogger) -> None:
        self.host = host
        self.port = port
        self.snapshot = snapshot
        self.log = log
        self._server: asyncio.Server | None = None
        self._open = 0

    async def start(self) -> None:
        """Listen; :class:`ConfigError` when the port cannot be bound."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_HEAD
            )
        except OSError as exc:
            raise ConfigError(
                f"health endpoint: cannot listen on {self.host}:{self.port} "
                f"({exc.strerror or exc}); is another health endpoint using health_port "
                f"{self.port}?"
            ) from exc
        sockets = self._server.sockets
        if sockets and self.port == 0:
            self.port = int(sockets[0].getsockname()[1])
        self.log.info("Health endpoint on http://%s:%d/health", self.host, self.port)

    async def close(self) -> None:
        """Stop listening (connections being answered finish)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            await self._answer(head, writer)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except (ConnectionError, ValueError) as exc:
            self.log.debug("health request failed: %s", exc)
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> None:
        parts = head.split(b"\r\n", 1)[0].split()
        method = parts[0].decode("latin-1") if parts else ""
        path = parts[1].decode("latin-1").split("?", 1)[0] if len(parts) > 1 else ""
        if method not in ("GET", "HEAD"):
            status, body = "405 Method Not Allowed", {"error": "only GET and HEAD"}
        elif path not in HEALTH_PATHS:
            status, body = "404 Not Found", {"error": f"no {path[:100]!r}; GET /health"}
        else:
            healthy, body = self.snapshot()
            status = "200 OK" if healthy else "503 Service Unavailable"
        data = json.dumps(body, default=str).encode()
        lines = [
            f"HTTP/1.1 {status}",
            "Content-Type: application/json",
            f"Content-Length: {len(data)}",
            "Cache-Control: no-store",
            "Connection: close",
            "",
            "",
        ]
        writer.write("\r\n".join(lines).encode("latin-1") + (b"" if method == "HEAD" else data))
        await writer.drain()
