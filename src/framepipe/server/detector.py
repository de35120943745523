"""Host-side detectors over a WebSocket: the generic half of the SD-card import protocol.

A *detector* is a small process on the machine that has the card reader (see
``examples/sd_import/detector.py``). It connects to ``/ws/detector`` of the service with the
service's bearer token (``Authorization: Bearer``, the token subprotocol, or ``?token=``), says
who it is, announces cards (*sessions*) and answers requests the backend sends it. The backend
never reads the card: it asks the detector to copy files into a shared folder and waits for the
answer.

Every message is one JSON object in a text frame with a ``type``::

    detector -> backend  {"type": "detector:hello", "detector_id": "host-1", "sessions": [...]}
    backend -> detector  {"type": "detector:welcome", "hub_id": "..."}
    detector -> backend  {"type": "detector:sd_inserted", "session_id": "...", ...}
    detector -> backend  {"type": "sd:file_list", "session_id": "...", "files": [...]}
    backend -> detector  {"type": "sd:copy_request", "request_id": "...", "session_id": "...",
                          "path": "DCIM/0001.MP4", "dest": "...", ...}
    detector -> backend  {"type": "sd:copy_progress", "request_id": "...", "bytes": N,
                          "total": M}
    detector -> backend  {"type": "sd:file_copied", "request_id": "...", "ok": true, ...}

What :class:`DetectorHub` guarantees:

* a connection that does not present the token is refused (see
  :func:`framepipe.server.guard.admit_websocket`);
* the first message must be a ``detector:hello`` that passes every check below, within
  ``hello_timeout`` seconds; otherwise the detector gets ``{"type": "error", "detail": ...,
  "field": ...}`` naming the field and the connection is closed with 1008 (1003 for a binary
  frame). Nothing of a refused hello is registered: it never shows in ``GET /api/detectors``
  and owns no session. A hello needs a ``detector_id`` of 1-200 printable characters;
  ``hostname`` and ``platform``, when given, are at most 200 printable characters;
  ``sessions``, when given, is a list of objects each with a ``session_id`` (1-200 printable
  characters) and, optionally, ``card_id``, ``label``, ``root`` (text, at most 1000
  characters) and ``file_count`` (a whole number >= 0);
* every message is checked at the boundary before anything else looks at it: it must be a
  JSON object with a string ``type``, hold only storable JSON (no lone surrogate such as
  ``"\\ud800"``, no NUL, finite numbers, nested at most
  :data:`~framepipe.untrusted.MAX_DEPTH` deep; see :func:`framepipe.untrusted.check_json`), and
  its ``session_id`` and announcement fields (as for ``sessions`` above) must be well formed.
  A message that is not is answered with ``error`` naming the field (``message.label``) and
  goes no further: it is neither recorded, nor handed to a handler, nor put in an
  execution's inputs. A binary frame is answered with ``error``. The connection stays open
  in both cases: one bad message loses nothing else;
* a session belongs to the detector (``detector_id``) that first named it, for the life of the
  hub, also while that detector is disconnected and after the card is removed: a message from
  another detector naming it (``detector:sd_inserted``, ``sd:file_list``, an answer, a
  removal, or a ``sessions`` entry of its hello) is refused with ``error`` and changes nothing,
  so copy requests for a card only ever go to the detector that announced it. The same
  detector connecting again keeps its sessions whether or not its hello lists them (a
  detector restarted after a crash has forgotten its old sessions, and the backend's retried
  copies must still reach it). A detector id is a claim made with the shared token, not a
  credential: whoever holds the token can connect under any id (a newer connection with the
  same id replaces the older one). A detector owns at most ``max_sessions`` sessions; beyond
  that the oldest removed ones are forgotten, and if none was removed new ones are refused;
* an answer (a message with the ``request_id`` of a waiting request) counts only when it
  comes on the connection the request was sent on;
* a request waits for the answer carrying its ``request_id``. When the owner is not connected
  it waits ``reconnect_wait`` seconds for it to come back; when the owner disconnects while the
  request waits, the request fails at once with :class:`DetectorUnavailableError` naming the
  detector, the session and what was asked; a request never waits longer than its timeout;
* the connection is forgotten on every way out of it (a close, a network error, a failure
  while serving it, the service stopping): no detector stays listed after its connection
  ended;
* other message types go to the handlers registered with :meth:`DetectorHub.on` (an app's own
  logic, e.g. starting an import on ``sd:file_list``); a handler that raises is logged and the
  detector gets an ``error`` message; a type with no handler is answered with ``error``;
* ``GET /api/detectors`` always answers: text stored in the hub is sent escaped if it could
  not be encoded, never as a server error.

Requests are made on the service's event loop (an ``async`` step of an engine running in the
service) or from any thread with :meth:`DetectorHub.request_sync`. Steps find the hub of
their service with :func:`get_hub` from the id the hub gave them (``hub.id``).

Workers. When the service sends steps to ``framepipe worker`` processes over Redis, the hub
also relays: a step on a worker gets a :class:`RemoteDetectorHub` from :func:`get_hub`, which
pushes its request to the list ``{namespace}:detector:{hub_id}:requests``; the service takes it,
makes the request here and pushes progress and the answer (or the error, with its class) to a
reply list of that request (kept 10 minutes). The service keeps ``...:alive`` set (5 s expiry)
while it runs, so a worker asking a stopped service fails at once with
:class:`DetectorUnavailableError` instead of waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from framepipe.config import Settings, load_settings
from framepipe.errors import (
    DetectorError,
    DetectorUnavailableError,
    InvalidInputError,
    MissingDependencyError,
)
from framepipe.logs import get_logger
from framepipe.redis import is_redis_url
from framepipe.server.detector_messages import (
    MAX_ID_LENGTH,
    announced,
    check_hello,
    close_reason,
    error_message,
    identifier,
    not_yours,
    parse,
)
from framepipe.server.detector_relay import ProgressCallback, RemoteDetectorHub, _Relay
from framepipe.server.guard import admit_websocket
from framepipe.untrusted import dumps

if TYPE_CHECKING:
    from fastapi import FastAPI, WebSocket

    from framepipe.backends.state import StateStore
    from framepipe.jobs.engine import JobEngine

__all__ = ["MAX_ID_LENGTH", "DetectorConnection", "DetectorHub", "DetectorMessage", "Handler",
           "RemoteDetectorHub", "get_hub", "mount_detector"]

_log = get_logger("server.detector")
_hubs: weakref.WeakValueDictionary[str, DetectorHub] = weakref.WeakValueDictionary()

def _disconnect() -> type[Exception]:
    """Starlette's WebSocketDisconnect, imported when a connection needs it: a worker that only
    reaches a hub through Redis (:class:`RemoteDetectorHub`) needs no server extra."""
    try:
        from starlette.websockets import WebSocketDisconnect
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(exc.name or "fastapi", "server",
                                     "the detector endpoint") from exc
    return WebSocketDisconnect


def get_hub(hub_id: str, settings: Settings | None = None) -> DetectorHub | RemoteDetectorHub:
    """The hub with id ``hub_id``: the live one in this process, else (a step on a worker)
    a :class:`RemoteDetectorHub` reaching it through the broker's Redis.

    Raises :class:`DetectorUnavailableError` when the hub is in no reachable process (not in
    this one, and the broker, from ``settings`` or the environment, is not Redis)."""
    hub = _hubs.get(hub_id)
    if hub is not None:
        return hub
    settings = settings or load_settings()
    if not is_redis_url(settings.broker_url):
        raise DetectorUnavailableError(
            f"no detector hub {hub_id!r} in this process, and no Redis broker to reach the "
            "service holding it: run the steps that talk to detectors in that service, or "
            "on workers sharing its Redis (FRAMEPIPE_BROKER_URL)")
    return RemoteDetectorHub(hub_id, settings.broker_url, settings.broker_namespace)


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
        gone."""
        if self.closed.is_set():
            raise DetectorUnavailableError("disconnected", detector_id=self.detector_id)
        try:
            async with self.lock:
                await self.websocket.send_text(json.dumps(message))
        except (_disconnect(), RuntimeError, OSError) as exc:
            raise DetectorUnavailableError(f"disconnected ({exc})",
                                           detector_id=self.detector_id) from exc

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (for ``GET /api/detectors``)."""
        return {"detector_id": self.detector_id, "connected_at": self.connected_at,
                "hostname": self.hello.get("hostname"), "platform": self.hello.get("platform")}


@dataclass
class DetectorMessage:
    """What a handler gets: the message, who sent it, and the service it arrived at."""

    hub: DetectorHub
    connection: DetectorConnection
    message: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.message["type"])

    @property
    def detector_id(self) -> str:
        return self.connection.detector_id

    @property
    def engine(self) -> JobEngine:
        """The service's job engine (to submit an execution)."""
        return self.hub.engine

    async def reply(self, message: Mapping[str, Any]) -> None:
        """Send ``message`` back to the detector that sent this one."""
        await self.connection.send(message)


Handler = Callable[[DetectorMessage], Awaitable[None]]


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    session_id: str
    connection: DetectorConnection
    what: str
    on_progress: ProgressCallback | None

    @property
    def detector_id(self) -> str:
        return self.connection.detector_id


class DetectorHub:
    """Tracks the connected detectors and the sessions they own; carries requests to them.

    ``reconnect_wait`` is how long a request waits for the owner of its session to connect;
    ``request_timeout`` the default time to wait for an answer; ``hello_timeout`` how long a
    new connection has to say ``detector:hello``; ``max_sessions`` how many sessions one
    detector may own (see the module for what happens beyond).

    ``hub_id`` names the hub for :func:`get_hub`; steps store it in their inputs, so it stays
    the same across restarts of the service (a retried execution reaches the new hub). Within
    one process (and one Redis namespace, with workers) each hub needs its own id."""

    def __init__(self, hub_id: str = "default", *, reconnect_wait: float = 30.0,
                 request_timeout: float = 600.0, hello_timeout: float = 30.0,
                 max_sessions: int = 10_000) -> None:
        if not hub_id or ":" in hub_id or len(hub_id) > 100:
            raise ValueError(f"hub id {hub_id!r} must be 1-100 characters without ':'")
        self.id = hub_id
        self.reconnect_wait = reconnect_wait
        self.request_timeout = request_timeout
        self.hello_timeout = hello_timeout
        self.max_sessions = max_sessions
        self._handlers: dict[str, Handler] = {}
        self._connections: dict[str, DetectorConnection] = {}
        self._owners: dict[str, str] = {}  # session -> detector id (kept after a removal)
        self._owned: dict[str, dict[str, None]] = {}  # detector id -> its sessions, oldest first
        self._sessions: dict[str, dict[str, Any]] = {}  # session -> last announcement
        self._pending: dict[str, _Pending] = {}
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: JobEngine | None = None
        self.store: StateStore | None = None
        self._relay: _Relay | None = None
        _hubs[self.id] = self

    # -- set-up ---------------------------------------------------------------------------

    def on(self, message_type: str, handler: Handler) -> None:
        """Call ``handler`` for every message of ``message_type`` (one handler per type)."""
        if message_type in self._handlers:
            raise ValueError(f"message type {message_type!r} already has a handler")
        self._handlers[message_type] = handler

    async def start(self, engine: JobEngine, store: StateStore,
                    settings: Settings | None = None) -> None:
        """Attach the service's engine and store (done by ``create_app`` at start-up); when
        the settings send steps to workers over Redis, also relay their requests (see
        :class:`RemoteDetectorHub`)."""
        self._engine = engine
        self.store = store
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        if settings is not None and settings.distributed_jobs and is_redis_url(settings.broker_url):
            self._relay = _Relay(self, settings.broker_url, settings.broker_namespace)
            await self._relay.start()

    @property
    def engine(self) -> JobEngine:
        if self._engine is None:
            raise RuntimeError("the detector hub is not bound to a running service")
        return self._engine

    async def close(self) -> None:
        """Fail every waiting request and forget the connections (service shutdown)."""
        if self._relay is not None:
            await self._relay.stop()
            self._relay = None
        for pending in list(self._pending.values()):
            if not pending.future.done():
                pending.future.set_exception(DetectorUnavailableError(
                    f"the service is shutting down while waiting for {pending.what}",
                    detector_id=pending.detector_id, session_id=pending.session_id))
        self._pending.clear()
        for conn in list(self._connections.values()):
            conn.closed.set()
            with contextlib.suppress(Exception):
                await conn.websocket.close(code=1001)
        self._connections.clear()

    # -- what is connected ----------------------------------------------------------------

    def detectors(self) -> list[dict[str, Any]]:
        """The connected detectors, each with the sessions it owns (cards not removed)."""
        out = []
        for conn in self._connections.values():
            sessions = [self._sessions[s] for s in self._owned.get(conn.detector_id, ())
                        if s in self._sessions]
            out.append({**conn.describe(), "sessions": sessions})
        return out

    def owner(self, session_id: str) -> str | None:
        """The id of the detector owning ``session_id`` (connected or not), or None."""
        return self._owners.get(session_id)

    def is_connected(self, detector_id: str) -> bool:
        return detector_id in self._connections

    # -- requests ---------------------------------------------------------------------------

    async def _connection_for(self, session_id: str, wait: float) -> DetectorConnection:
        assert self._changed is not None
        deadline = time.monotonic() + wait
        async with self._changed:
            while True:
                owner = self._owners.get(session_id)
                conn = self._connections.get(owner) if owner is not None else None
                if conn is not None and not conn.closed.is_set():
                    return conn
                left = deadline - time.monotonic()
                if left <= 0:
                    if owner is None:
                        raise DetectorUnavailableError(
                            f"no connected detector owns session {session_id!r}",
                            session_id=session_id)
                    raise DetectorUnavailableError(
                        f"not connected (waited {wait:g}s for it to come back)",
                        detector_id=owner, session_id=session_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    async def request(self, session_id: str, message: Mapping[str, Any], *,
                      answer_timeout: float | None = None, what: str | None = None,
                      on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """Send ``message`` (a dict with a ``type``) to the detector owning ``session_id`` and
        return its answer: the next message from it with the same ``request_id`` (added here)
        that is not a progress report. Progress reports (messages with the ``request_id`` and
        a ``type`` ending in ``_progress``) go to ``on_progress``.

        Raises :class:`DetectorUnavailableError` when no owner connects within
        ``reconnect_wait`` or it disconnects before answering, and :class:`DetectorError`
        when no answer comes within ``answer_timeout`` (default ``request_timeout``)."""
        if self._loop is None:
            raise RuntimeError("the detector hub is not bound to a running service")
        if asyncio.get_running_loop() is not self._loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                self.request(session_id, message, answer_timeout=answer_timeout, what=what,
                             on_progress=on_progress), self._loop))
        timeout = self.request_timeout if answer_timeout is None else answer_timeout
        what = what or str(message.get("type"))
        started = time.monotonic()
        conn = await self._connection_for(session_id, min(self.reconnect_wait, timeout))
        request_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._pending[request_id] = _Pending(future, session_id, conn, what, on_progress)
        try:
            await conn.send({**message, "request_id": request_id, "session_id": session_id})
            left = max(0.0, timeout - (time.monotonic() - started))
            try:
                return await asyncio.wait_for(future, left)
            except TimeoutError:
                raise DetectorError(f"no answer to {what} within {timeout:g}s",
                                    detector_id=conn.detector_id,
                                    session_id=session_id) from None
        finally:
            self._pending.pop(request_id, None)

    def request_sync(self, session_id: str, message: Mapping[str, Any], *,
                     answer_timeout: float | None = None, what: str | None = None,
                     on_progress: ProgressCallback | None = None) -> dict[str, Any]:
        """:meth:`request` from a thread that is not the service's event loop (a sync step)."""
        if self._loop is None:
            raise RuntimeError("the detector hub is not bound to a running service")
        return asyncio.run_coroutine_threadsafe(
            self.request(session_id, message, answer_timeout=answer_timeout, what=what,
                         on_progress=on_progress), self._loop).result()

    async def send(self, session_id: str, message: Mapping[str, Any]) -> bool:
        """Send ``message`` to the owner of ``session_id`` if it is connected; False if not
        (for notices such as a status, which a later reconnect does not need)."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                self.send(session_id, message), self._loop))
        owner = self._owners.get(session_id)
        conn = self._connections.get(owner) if owner is not None else None
        if conn is None:
            return False
        try:
            await conn.send({**message, "session_id": session_id})
        except DetectorUnavailableError:
            return False
        return True

    def send_sync(self, session_id: str, message: Mapping[str, Any], *,
                  wait: float = 10.0) -> bool:
        """:meth:`send` from a thread that is not the service's event loop."""
        if self._loop is None:
            return False
        return asyncio.run_coroutine_threadsafe(self.send(session_id, message),
                                                self._loop).result(wait)

    # -- the endpoint ----------------------------------------------------------------------

    async def serve(self, websocket: WebSocket, token: str | None) -> None:
        """Run one detector connection until it closes (the ``/ws/detector`` endpoint)."""
        if not await admit_websocket(websocket, token):
            return
        try:
            first = await asyncio.wait_for(_receive(websocket), self.hello_timeout)
        except TimeoutError:
            await _refuse(websocket, InvalidInputError(
                f"no detector:hello within {self.hello_timeout:g}s", where="hello"))
            return
        if first is None:
            return
        try:
            hello = parse(first, "hello")
            detector_id, sessions = check_hello(hello)
        except InvalidInputError as exc:
            await _refuse(websocket, exc, code=1003 if isinstance(first, bytes) else 1008)
            return
        # Valid: only now is anything registered, and the finally below forgets it on every
        # way out.
        conn = DetectorConnection(detector_id, websocket, hello)
        try:
            old = self._connections.get(detector_id)
            if old is not None:
                _log.info("detector %s connected again; the older connection is closed",
                          detector_id)
                await self._drop(old, "replaced by a newer connection of the same detector")
                with contextlib.suppress(Exception):
                    await old.websocket.close(code=1000, reason="replaced")
            self._connections[detector_id] = conn
            refused = [self._claim(conn, session_id, fields)
                       for session_id, fields in sessions]
            await self._notify()
            _log.info("detector %s connected (%s)", detector_id, hello.get("hostname") or "?")
            await conn.send({"type": "detector:welcome", "hub_id": self.id})
            for problem in refused:
                if problem is not None:
                    await conn.send(problem)
            while True:
                raw = await _receive(websocket)
                if raw is None:
                    break
                await self._dispatch(conn, raw)
        except DetectorUnavailableError:
            pass
        finally:
            if self._connections.get(detector_id) is conn:
                del self._connections[detector_id]
                await self._drop(conn, "disconnected")
            conn.closed.set()
            _log.info("detector %s disconnected", detector_id)

    def _claim(self, conn: DetectorConnection, session_id: str,
               fields: Mapping[str, Any]) -> dict[str, Any] | None:
        """Make ``session_id`` (already checked) the session of ``conn``'s detector and record
        its announcement ``fields``; the ``error`` message to send instead when it belongs to
        another detector, or this one owns too many."""
        owner = self._owners.get(session_id)
        if owner is not None and owner != conn.detector_id:
            return not_yours(session_id)
        if owner is None:
            owned = self._owned.setdefault(conn.detector_id, {})
            if len(owned) >= self.max_sessions:
                removed = next((s for s in owned if s not in self._sessions), None)
                if removed is None:
                    return {"type": "error", "session_id": session_id, "field": "session_id",
                            "detail": f"this detector already has {self.max_sessions} cards "
                                      "announced and not removed; session refused"}
                del owned[removed]
                del self._owners[removed]
            owned[session_id] = None
            self._owners[session_id] = conn.detector_id
        known = self._sessions.setdefault(session_id, {"session_id": session_id})
        known.update(fields)
        return None

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def _drop(self, conn: DetectorConnection, why: str) -> None:
        conn.closed.set()
        for request_id, pending in list(self._pending.items()):
            if pending.connection is conn and not pending.future.done():
                pending.future.set_exception(DetectorUnavailableError(
                    f"{why} while the backend waited for {pending.what}",
                    detector_id=conn.detector_id, session_id=pending.session_id))
                self._pending.pop(request_id, None)
        await self._notify()

    async def _dispatch(self, conn: DetectorConnection, raw: str | bytes) -> None:
        try:
            message = parse(raw, "message")
            session_id = message.get("session_id")
            if session_id is not None:
                session_id = identifier(session_id, "message.session_id")
            fields = announced(message, "message")
        except InvalidInputError as exc:
            await conn.send(error_message(exc))
            return
        kind: str = message["type"]
        request_id = message.get("request_id")
        pending = self._pending.get(request_id) if isinstance(request_id, str) else None
        if pending is not None and pending.connection is not conn:
            await conn.send({"type": "error", "field": "request_id",
                             "detail": f"request {request_id!r} was sent to another detector "
                                       "or connection; this answer is ignored"})
            return
        if session_id is not None:
            if kind == "detector:sd_removed":
                owner = self._owners.get(session_id)
                problem = None if owner in (None, conn.detector_id) else not_yours(session_id)
            else:
                was_new = session_id not in self._owners
                problem = self._claim(conn, session_id, fields)
                if problem is None and was_new:
                    await self._notify()
            if problem is not None:
                await conn.send({**problem, "detail": f"{kind}: {problem['detail']}"})
                return
        if pending is not None:
            if kind.endswith("_progress"):
                if pending.on_progress is not None:
                    try:
                        pending.on_progress(message)
                    except Exception as exc:  # e.g. the step was cancelled: stop reporting
                        _log.debug("progress callback of %s raised %r", pending.what, exc)
                return
            if not pending.future.done():
                pending.future.set_result(message)
            return
        if kind == "detector:sd_removed" and session_id is not None:
            self._sessions.pop(session_id, None)
        if isinstance(request_id, str) and kind.endswith(("_progress", "_copied")):
            return  # the answer to a request nobody waits for any more (timed out, retried)
        handler = self._handlers.get(kind)
        if handler is None:
            if kind != "detector:sd_removed":
                await conn.send({"type": "error", "detail": f"unknown message type {kind!r} "
                                 f"(this service handles: "
                                 f"{', '.join(sorted(self._handlers)) or 'none'})"})
            return
        try:
            await handler(DetectorMessage(self, conn, message))
        except DetectorUnavailableError:
            raise
        except Exception as exc:
            _log.exception("handler of %s from detector %s failed", kind, conn.detector_id)
            await conn.send({"type": "error", "detail": f"{kind} failed: {exc}",
                             "session_id": session_id})


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


def mount_detector(app: FastAPI, hub: DetectorHub, token: str | None,
                   check_token: Callable[..., None]) -> None:
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
