"""The detector hub's WebSocket endpoint: one detector's connection, from its hello to its
close, and the routes that serve a hub.

:func:`mount_detector` serves a :class:`~framepipe.server.detector.DetectorHub` at
``/ws/detector`` and lists its detectors at ``GET /api/detectors``. :func:`serve_detector` runs
one connection (``DetectorHub.serve``): it checks the hello, then receives frame after frame and
checks each message at the boundary before handing it to the hub, which decides where it goes
(its request, the end of its session, its handler). :class:`DetectorConnection` is one
connected detector. The protocol is described in :mod:`framepipe.server.detector`; the checks
of the messages are :mod:`framepipe.server.detector_messages`.

What the endpoint guarantees:

* a connection that does not present the token is refused (see
  :func:`framepipe.server.guard.admit_websocket`);
* the first message must be a ``detector:hello`` that passes every check below, within
  ``hello_timeout`` seconds; otherwise the detector gets ``{"type": "error", "detail": ...,
  "field": ...}`` naming the field and the connection is closed with 1008 (1003 for a binary
  frame). Nothing of a refused hello is registered: it never shows in ``GET /api/detectors``
  and owns no session. A hello needs a ``detector_id`` of 1-200 printable characters;
  ``hostname`` and ``platform``, when given, are at most 200 printable characters;
  ``sessions``, when given, is a list of objects each with a ``session_id`` (1-200 printable
  characters) and, optionally, session metadata (valid for ``session_metadata``);
* every message is checked at the boundary before anything else looks at it: it must be a
  JSON object with a string ``type``, hold only storable JSON (no lone surrogate such as
  ``"\\ud800"``, no NUL, finite numbers, nested at most
  :data:`~framepipe.untrusted.MAX_DEPTH` deep; see :func:`framepipe.untrusted.check_json`), be
  of a registered type, and its ``session_id``, its session metadata and the message itself
  (against its type's model) must be well formed. A message that is not is answered with
  ``error`` naming the field (``message.label``) and goes no further: it is neither recorded,
  nor handed to a handler or a waiting request, nor put in an execution's inputs. A binary
  frame is answered with ``error``. The connection stays open in both cases: one bad message
  loses nothing else;
* the connection is forgotten on every way out of it (a close, a network error, a failure
  while serving it, the service stopping): no detector stays listed after its connection
  ended;
* ``GET /api/detectors`` always answers: text stored in the hub is sent escaped if it could
  not be encoded, never as a server error.

It loads without the server extra (a worker imports the hub's module to reach a hub through
Redis): Starlette and FastAPI are imported when a connection or :func:`mount_detector` needs
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from framepipe.errors import DetectorUnavailableError, InvalidInputError, MissingDependencyError
from framepipe.logs import get_logger
from framepipe.server.detector_messages import (
    MessageRole,
    Registration,
    check_hello,
    close_reason,
    error_message,
    identifier,
    parse,
    session_metadata,
    validated,
)
from framepipe.server.guard import admit_websocket
from framepipe.untrusted import dumps

if TYPE_CHECKING:
    from fastapi import FastAPI, WebSocket
    from pydantic import BaseModel

__all__ = ["SEND_TIMEOUT", "DetectorConnection", "ServedHub", "mount_detector", "serve_detector"]

SEND_TIMEOUT = 10.0
"""Seconds a detector's connection may take to accept one message before it is cut off: a
detector reading at all takes one in far less; one that stopped reading would otherwise hold
every later send to it (and the requests of the steps behind them) for as long as its
connection lasts."""

_log = get_logger("server.detector")


def _disconnect() -> type[Exception]:
    """Starlette's WebSocketDisconnect, imported when a connection needs it: a worker that only
    reaches a hub through Redis (:class:`~framepipe.server.detector_relay.RemoteDetectorHub`)
    needs no server extra."""
    try:
        from starlette.websockets import WebSocketDisconnect
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            exc.name or "fastapi", "server", "the detector endpoint"
        ) from exc
    return WebSocketDisconnect


@dataclass
class DetectorConnection:
    """One connected detector."""

    detector_id: str
    websocket: WebSocket
    hello: dict[str, Any]
    connected_at: float = field(default_factory=time.time)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, message: Mapping[str, Any]) -> None:
        """Send one message; raises :class:`DetectorUnavailableError` if the connection is
        gone, or if it takes no message within :data:`SEND_TIMEOUT` seconds (the detector
        stopped reading: the connection is then cut off, and every later send fails at once
        instead of waiting behind it)."""
        if self.closed.is_set():
            raise DetectorUnavailableError("disconnected", detector_id=self.detector_id)
        try:
            async with asyncio.timeout(SEND_TIMEOUT), self.lock:
                await self.websocket.send_text(json.dumps(message))
        except TimeoutError as exc:
            self.closed.set()  # the connection's loop (serve_detector) ends it
            raise DetectorUnavailableError(
                f"cut off: it took no message for {SEND_TIMEOUT:g}s (it stopped reading)",
                detector_id=self.detector_id,
            ) from exc
        except (_disconnect(), RuntimeError, OSError) as exc:
            raise DetectorUnavailableError(
                f"disconnected ({exc})", detector_id=self.detector_id
            ) from exc

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (for ``GET /api/detectors``)."""
        return {
            "detector_id": self.detector_id,
            "connected_at": self.connected_at,
            "hostname": self.hello.get("hostname"),
            "platform": self.hello.get("platform"),
        }


class ServedHub(Protocol):
    """What the endpoint uses of the hub it serves
    (:class:`~framepipe.server.detector.DetectorHub`): its settings, its listings, and the
    hub's side of a connection (taking it on, routing what passed the checks, forgetting it),
    which only the endpoint calls."""

    @property
    def id(self) -> str: ...
    @property
    def hello_timeout(self) -> float: ...
    @property
    def session_metadata(self) -> type[BaseModel] | None: ...
    @property
    def max_metadata_bytes(self) -> int: ...
    def message_types(self) -> dict[str, MessageRole]: ...
    def detectors(self) -> list[dict[str, Any]]: ...
    async def serve(self, websocket: WebSocket, token: str | None) -> None: ...
    async def _attach(
        self, conn: DetectorConnection, sessions: list[tuple[str, dict[str, Any]]]
    ) -> list[dict[str, Any]]: ...
    async def _detach(self, conn: DetectorConnection) -> None: ...
    def _registration(self, message_type: str) -> Registration | None: ...
    async def _route(
        self,
        conn: DetectorConnection,
        message: dict[str, Any],
        registered: Registration,
        parsed: BaseModel | None,
        session_id: str | None,
        fields: dict[str, Any],
    ) -> None: ...


async def serve_detector(hub: ServedHub, websocket: WebSocket, token: str | None) -> None:
    """Run one detector connection of ``hub`` until it closes (the ``/ws/detector`` endpoint,
    :meth:`DetectorHub.serve`)."""
    if not await admit_websocket(websocket, token):
        return
    try:
        first = await asyncio.wait_for(_receive(websocket), hub.hello_timeout)
    except TimeoutError:
        await _refuse(
            websocket,
            InvalidInputError(f"no detector:hello within {hub.hello_timeout:g}s", where="hello"),
        )
        return
    if first is None:
        return
    try:
        hello = parse(first, "hello")
        detector_id, sessions = check_hello(hello, hub.session_metadata, hub.max_metadata_bytes)
    except InvalidInputError as exc:
        await _refuse(websocket, exc, code=1003 if isinstance(first, bytes) else 1008)
        return
    # Valid: only now is anything registered, and the finally below forgets it on every way out.
    conn = DetectorConnection(detector_id, websocket, hello)
    try:
        refused = await hub._attach(conn, sessions)
        _log.info("detector %s connected (%s)", detector_id, hello.get("hostname") or "?")
        await conn.send({"type": "detector:welcome", "hub_id": hub.id})
        for problem in refused:
            await conn.send(problem)
        while True:
            raw = await _receive_unless_closed(websocket, conn)
            if raw is None:
                break
            await _dispatch(hub, conn, raw)
    except DetectorUnavailableError:
        pass
    finally:
        await hub._detach(conn)
        _log.info("detector %s disconnected", detector_id)


async def _dispatch(hub: ServedHub, conn: DetectorConnection, raw: str | bytes) -> None:
    """Check one message at the boundary, answering a refusal with ``error``; hand a message
    that passes to the hub."""
    session_id: str | None = None
    try:
        message = parse(raw, "message")
        if message.get("session_id") is not None:
            session_id = identifier(message["session_id"], "message.session_id")
        kind: str = message["type"]
        registered = hub._registration(kind)
        if registered is None:
            handled = ", ".join(hub.message_types()) or "none"
            await conn.send(
                {
                    "type": "error",
                    "detail": f"unknown message type {kind!r} (this service handles: {handled})",
                }
            )
            return
        fields = session_metadata(message, "message", hub.session_metadata, hub.max_metadata_bytes)
        parsed = (
            validated(registered.model, message, "message")
            if registered.model is not None
            else None
        )
    except InvalidInputError as exc:
        extra = {"session_id": session_id} if session_id is not None else {}
        await conn.send(error_message(exc, **extra))
        return
    await hub._route(conn, message, registered, parsed, session_id, fields)


async def _receive_unless_closed(
    websocket: WebSocket, conn: DetectorConnection
) -> str | bytes | None:
    """The next frame's text or bytes; None once the connection is gone or cut off."""
    receiving = asyncio.ensure_future(_receive(websocket))
    closing = asyncio.ensure_future(conn.closed.wait())
    try:
        await asyncio.wait({receiving, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
    if not receiving.done():
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        return None
    return receiving.result()


async def _receive(websocket: WebSocket) -> str | bytes | None:
    """The next frame's text or bytes; None once the connection is gone."""
    try:
        frame = await websocket.receive()
    except (_disconnect(), RuntimeError):
        return None
    if frame["type"] == "websocket.disconnect":
        return None
    text = frame.get("text")
    if text is not None:
        return str(text)
    return bytes(frame.get("bytes") or b"")


async def _refuse(websocket: WebSocket, exc: InvalidInputError, code: int = 1008) -> None:
    """Tell a connection why it is refused, then close it with ``code``."""
    with contextlib.suppress(_disconnect(), RuntimeError, OSError):
        await websocket.send_text(dumps(error_message(exc)))
    with contextlib.suppress(_disconnect(), RuntimeError, OSError):
        await websocket.close(code=code, reason=close_reason(str(exc)))


def mount_detector(
    app: FastAPI, hub: ServedHub, token: str | None, check_token: Callable[..., Awaitable[None]]
) -> None:
    """Serve ``hub`` at ``/ws/detector`` and list its detectors at ``GET /api/detectors``
    (both behind the service's token)."""
    from fastapi import Depends, WebSocket

    async def detector_socket(websocket: WebSocket) -> None:
        """A host-side detector's connection (see :mod:`framepipe.server.detector`)."""
        await hub.serve(websocket, token)

    # FastAPI resolves annotations in the module's globals, where WebSocket is not imported
    # (this module loads without the server extra, for workers).
    detector_socket.__annotations__["websocket"] = WebSocket
    app.websocket("/ws/detector")(detector_socket)

    @app.get("/api/detectors", tags=["detectors"], dependencies=[Depends(check_token)])
    async def detectors_list() -> list[dict[str, Any]]:
        """Connected detectors and the card sessions each owns (sent through the service's
        response class, which escapes text that cannot be encoded: this listing never fails
        on it)."""
        return hub.detectors()
