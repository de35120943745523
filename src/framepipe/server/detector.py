"""Host-side detectors over a WebSocket: the hub, generic over what the detectors report (its
endpoint, ``/ws/detector``, is :mod:`framepipe.server.detector_endpoint`).

A *detector* is a small process on the machine that has some device the service must not touch
itself (the SD-card reader of ``examples/sd_import``, which copies files off cards when asked).
It connects to ``/ws/detector`` of the service with the service's bearer token
(``Authorization: Bearer``, the token subprotocol, or ``?token=``), says who it is, announces
*sessions* (a card inserted: anything requests are about) and answers the requests the backend
sends about them.

Every message is one JSON object in a text frame with a ``type``. The hub's own::

    detector -> backend  {"type": "detector:hello", "detector_id": "host-1",
                          "hostname": "...", "platform": "...",
                          "sessions": [{"session_id": "...", <session metadata>}, ...]}
    backend -> detector  {"type": "detector:welcome", "hub_id": "..."}
    backend -> detector  {"type": "error", "detail": "...", "field": "message.label"}
    backend -> detector  {<a request>, "request_id": "...", "session_id": "..."}

Every other type is the application's, registered on the hub with
:meth:`DetectorHub.register_message` (its pydantic model and its role: notice, answer, progress
or end), and what a detector announces about a session is the application's session metadata
model: see :mod:`framepipe.server.detector_messages`. ``examples/sd_import/sd_messages.py``
registers the SD-card import's vocabulary so.

What :class:`DetectorHub` guarantees (what its endpoint guarantees, the token, the hello, the
checking of every message at the boundary before the hub sees it and the forgetting of every
ended connection, is in :mod:`framepipe.server.detector_endpoint`):

* a session belongs to the detector (``detector_id``) that first named it, for the life of the
  hub, also while that detector is disconnected and after its session ended: a message from
  another detector naming it (of any role, or a ``sessions`` entry of its hello) is refused
  with ``error`` and changes nothing, so requests for a session only ever go to the detector
  that announced it. The same detector connecting again keeps its sessions whether or not its
  hello lists them (a detector restarted after a crash has forgotten its old sessions, and the
  backend's retried requests must still reach it). A detector id is a claim made with the
  shared token, not a credential: whoever holds the token can connect under any id (a newer
  connection with the same id replaces the older one). A detector owns at most
  ``max_sessions`` sessions; beyond that the oldest ended ones are forgotten, and if none
  ended new ones are refused;
* an answer (a message with the ``request_id`` of a waiting request) counts only when it
  comes on the connection the request was sent on;
* a request waits for the answer carrying its ``request_id``. When the owner is not connected
  it waits ``reconnect_wait`` seconds for it to come back; when the owner disconnects while the
  request waits, the request fails at once with :class:`DetectorUnavailableError` naming the
  detector, the session and what was asked; a request never waits longer than its timeout;
* a handler that raises is logged and the detector gets an ``error`` message.

Requests are made on the service's event loop (an ``async`` step of an engine running in the
service) or from any thread with :meth:`DetectorHub.request_sync`. Steps find the hub of
their service with :func:`get_hub` from the id the hub gave them (``hub.id``).

Workers. When the service sends steps to ``framepipe worker`` processes over Redis, the hub
also relays: a step on a worker gets a :class:`RemoteDetectorHub` from :func:`get_hub`, which
pushes its request to the list ``{namespace}:detector:{hub_id}:requests``; the service takes it,
makes the request here and pushes progress and the answer (or the error, with its class) to a
reply list of that request (kept 10 minutes). The service keeps ``...:alive`` set (5 s expiry)
to a token new at each of its starts while it runs, so a worker asking a stopped service, or
one whose request a service that restarted since may have taken and lost, fails at once with
:class:`DetectorUnavailableError` instead of waiting (see
:mod:`framepipe.server.detector_relay`).

At over 500 lines the module is still one concept, the hub's state: its connections, who owns
which session and the waiting requests change together (under one condition, on one loop), and
each guarantee above is about all three at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from framepipe.config import Settings, load_settings
from framepipe.errors import DetectorError, DetectorUnavailableError
from framepipe.logs import get_logger
from framepipe.redis import is_redis_url
from framepipe.server.detector_endpoint import (
    DetectorConnection,
    mount_detector,
    serve_detector,
)
from framepipe.server.detector_messages import (
    DEFAULT_MAX_METADATA_BYTES,
    HUB_MESSAGE_TYPES,
    MAX_ID_LENGTH,
    MESSAGE_ROLES,
    DetectorMessage,
    Handler,
    MessageRole,
    Registration,
    not_yours,
)
from framepipe.server.detector_relay import ProgressCallback, Relay, RemoteDetectorHub
from framepipe.untrusted import json_size

if TYPE_CHECKING:
    from fastapi import WebSocket

    from framepipe.backends.state import StateStore
    from framepipe.jobs.engine import JobEngine

__all__ = [
    "HUB_MESSAGE_TYPES",
    "MAX_ID_LENGTH",
    "MESSAGE_ROLES",
    "DetectorConnection",
    "DetectorHub",
    "DetectorMessage",
    "Handler",
    "MessageRole",
    "RemoteDetectorHub",
    "get_hub",
    "mount_detector",
]

_log = get_logger("server.detector")
_hubs: weakref.WeakValueDictionary[str, DetectorHub] = weakref.WeakValueDictionary()


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
            "on workers sharing its Redis (FRAMEPIPE_BROKER_URL)"
        )
    return RemoteDetectorHub(hub_id, settings.broker_url, settings.broker_namespace)


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
    detector may own (see the module for what happens beyond). ``session_metadata`` is the
    application's model of what a detector announces about a session, at most
    ``max_metadata_bytes`` of JSON (none without a model); the application's message types
    are registered with :meth:`register_message` (see the module).

    ``hub_id`` names the hub for :func:`get_hub`; steps store it in their inputs, so it stays
    the same across restarts of the service (a retried execution reaches the new hub). Within
    one process (and one Redis namespace, with workers) each hub needs its own id."""

    def __init__(
        self,
        hub_id: str = "default",
        *,
        reconnect_wait: float = 30.0,
        request_timeout: float = 600.0,
        hello_timeout: float = 30.0,
        max_sessions: int = 10_000,
        session_metadata: type[BaseModel] | None = None,
        max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    ) -> None:
        if not hub_id or ":" in hub_id or len(hub_id) > 100:
            raise ValueError(f"hub id {hub_id!r} must be 1-100 characters without ':'")
        self.id = hub_id
        self.reconnect_wait = reconnect_wait
        self.request_timeout = request_timeout
        self.hello_timeout = hello_timeout
        self.max_sessions = max_sessions
        self.session_metadata = session_metadata
        self.max_metadata_bytes = max_metadata_bytes
        self._types: dict[str, Registration] = {}
        self._connections: dict[str, DetectorConnection] = {}
        self._owners: dict[str, str] = {}  # session -> detector id (kept after a removal)
        self._owned: dict[str, dict[str, None]] = {}  # detector id -> its sessions, oldest first
        self._sessions: dict[str, dict[str, Any]] = {}  # session -> id, metadata (not ended)
        self._pending: dict[str, _Pending] = {}
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: JobEngine | None = None
        self.store: StateStore | None = None
        self._relay: Relay | None = None
        _hubs[self.id] = self

    # -- set-up ---------------------------------------------------------------------------

    def register_message(
        self,
        message_type: str,
        model: type[BaseModel] | None = None,
        handler: Handler | None = None,
        *,
        role: MessageRole = "notice",
    ) -> None:
        """Accept detector messages of ``message_type``: each must validate against ``model``
        (when given; a refusal is answered with ``error`` naming the field), and ``role`` says
        what the hub does with it (see the module); a ``notice`` or an ``end`` then goes to
        ``handler``, if given. One registration per type. Raises :class:`ValueError` for a
        type registered already, one of the hub's own (:data:`HUB_MESSAGE_TYPES`), an unknown
        role, or a handler for an ``answer`` or ``progress`` (those go to their request)."""
        if not isinstance(message_type, str) or not message_type:
            raise ValueError(f"a message type is a non-empty string, not {message_type!r}")
        if message_type in HUB_MESSAGE_TYPES:
            raise ValueError(f"{message_type!r} is the hub's own message type")
        if message_type in self._types:
            raise ValueError(f"message type {message_type!r} is registered already")
        if role not in MESSAGE_ROLES:
            raise ValueError(f"role must be one of {', '.join(MESSAGE_ROLES)}, not {role!r}")
        if handler is not None and role in ("answer", "progress"):
            raise ValueError(
                f"{message_type!r} ({role}) goes to the request it answers; it takes no handler"
            )
        self._types[message_type] = Registration(model, handler, role)

    def on(self, message_type: str, handler: Handler) -> None:
        """Call ``handler`` for every message of ``message_type``: shorthand for
        :meth:`register_message` of a notice without a model."""
        self.register_message(message_type, handler=handler)

    def message_types(self) -> dict[str, MessageRole]:
        """The registered message types and their roles."""
        return {name: registered.role for name, registered in sorted(self._types.items())}

    async def start(
        self, engine: JobEngine, store: StateStore, settings: Settings | None = None
    ) -> None:
        """Attach the service's engine and store (done by ``create_app`` at start-up); when
        the settings send steps to workers over Redis, also relay their requests (see
        :class:`RemoteDetectorHub`)."""
        self._engine = engine
        self.store = store
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        if settings is not None and settings.distributed_jobs and is_redis_url(settings.broker_url):
            self._relay = Relay(self, settings.broker_url, settings.broker_namespace)
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
                pending.future.set_exception(
                    DetectorUnavailableError(
                        f"the service is shutting down while waiting for {pending.what}",
                        detector_id=pending.detector_id,
                        session_id=pending.session_id,
                    )
                )
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
            sessions = [
                self._sessions[s]
                for s in self._owned.get(conn.detector_id, ())
                if s in self._sessions
            ]
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
                            session_id=session_id,
                        )
                    raise DetectorUnavailableError(
                        f"not connected (waited {wait:g}s for it to come back)",
                        detector_id=owner,
                        session_id=session_id,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    async def request(
        self,
        session_id: str,
        message: Mapping[str, Any],
        *,
        answer_timeout: float | None = None,
        what: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Send ``message`` (a dict with a ``type``) to the detector owning ``session_id`` and
        return its answer: the next message from it of a type registered as an ``answer``,
        with the same ``request_id`` (added here). Reports of a type registered as
        ``progress`` with that ``request_id`` go to ``on_progress``.

        Raises :class:`DetectorUnavailableError` when no owner connects within
        ``reconnect_wait`` or it disconnects before answering, and :class:`DetectorError`
        when no answer comes within ``answer_timeout`` (default ``request_timeout``)."""
        if self._loop is None:
            raise RuntimeError("the detector hub is not bound to a running service")
        if asyncio.get_running_loop() is not self._loop:
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(
                    self.request(
                        session_id,
                        message,
                        answer_timeout=answer_timeout,
                        what=what,
                        on_progress=on_progress,
                    ),
                    self._loop,
                )
            )
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
                raise DetectorError(
                    f"no answer to {what} within {timeout:g}s",
                    detector_id=conn.detector_id,
                    session_id=session_id,
                ) from None
        finally:
            self._pending.pop(request_id, None)

    def request_sync(
        self,
        session_id: str,
        message: Mapping[str, Any],
        *,
        answer_timeout: float | None = None,
        what: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """:meth:`request` from a thread that is not the service's event loop (a sync step)."""
        if self._loop is None:
            raise RuntimeError("the detector hub is not bound to a running service")
        return asyncio.run_coroutine_threadsafe(
            self.request(
                session_id,
                message,
                answer_timeout=answer_timeout,
                what=what,
                on_progress=on_progress,
            ),
            self._loop,
        ).result()

    async def send(self, session_id: str, message: Mapping[str, Any]) -> bool:
        """Send ``message`` to the owner of ``session_id`` if it is connected; False if not
        (for notices such as a status, which a later reconnect does not need)."""
        if self._loop is not None and asyncio.get_running_loop() is not self._loop:
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self.send(session_id, message), self._loop)
            )
        owner = self._owners.get(session_id)
        conn = self._connections.get(owner) if owner is not None else None
        if conn is None:
            return False
        try:
            await conn.send({**message, "session_id": session_id})
        except DetectorUnavailableError:
            return False
        return True

    def send_sync(self, session_id: str, message: Mapping[str, Any], *, wait: float = 10.0) -> bool:
        """:meth:`send` from a thread that is not the service's event loop, waiting at most
        ``wait`` seconds: past it :class:`TimeoutError`, and the send is cancelled (a message
        half-written to a detector's socket may still arrive)."""
        if self._loop is None:
            return False
        future = asyncio.run_coroutine_threadsafe(self.send(session_id, message), self._loop)
        try:
            return future.result(wait)
        except TimeoutError:
            future.cancel()
            raise

    # -- connections (for the endpoint, framepipe.server.detector_endpoint) -----------------

    async def serve(self, websocket: WebSocket, token: str | None) -> None:
        """Run one detector connection until it closes (the ``/ws/detector`` endpoint; see
        :func:`~framepipe.server.detector_endpoint.serve_detector`)."""
        await serve_detector(self, websocket, token)

    async def _attach(
        self, conn: DetectorConnection, sessions: list[tuple[str, dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Make ``conn`` (whose hello passed) the connection of its detector, closing an older
        one, and claim the sessions its hello announced; the ``error`` messages to send it
        after the welcome, one per session refused."""
        old = self._connections.get(conn.detector_id)
        if old is not None:
            _log.info(
                "detector %s connected again; the older connection is closed", conn.detector_id
            )
            await self._drop(old, "replaced by a newer connection of the same detector")
            with contextlib.suppress(Exception):
                await old.websocket.close(code=1000, reason="replaced")
        self._connections[conn.detector_id] = conn
        refused = [
            self._claim(conn, session_id, fields, f"hello.sessions[{n}]")
            for n, (session_id, fields) in enumerate(sessions)
        ]
        await self._notify()
        return [problem for problem in refused if problem is not None]

    async def _detach(self, conn: DetectorConnection) -> None:
        """Forget ``conn`` unless a newer connection replaced it, failing the requests waiting
        on it; the endpoint calls this on every way out of a connection."""
        if self._connections.get(conn.detector_id) is conn:
            del self._connections[conn.detector_id]
            await self._drop(conn, "disconnected")
        conn.closed.set()

    def _registration(self, message_type: str) -> Registration | None:
        """How messages of ``message_type`` are handled; None for a type not registered."""
        return self._types.get(message_type)

    def _claim(
        self, conn: DetectorConnection, session_id: str, fields: Mapping[str, Any], where: str
    ) -> dict[str, Any] | None:
        """Make ``session_id`` (already checked) the session of ``conn``'s detector and record
        its metadata ``fields`` (checked, from ``where``); the ``error`` message to send instead
        when it belongs to another detector, this one owns too many, or the session's metadata
        would grow past ``max_metadata_bytes``. Nothing changes when it is refused."""
        owner = self._owners.get(session_id)
        if owner is not None and owner != conn.detector_id:
            return not_yours(session_id)
        known = self._sessions.get(session_id, {"session_id": session_id})
        if fields:
            merged = {k: v for k, v in {**known, **fields}.items() if k != "session_id"}
            size = json_size(merged)
            if size > self.max_metadata_bytes:
                return {
                    "type": "error",
                    "session_id": session_id,
                    "field": where,
                    "detail": f"{where}: the session's metadata would be {size} bytes of "
                    f"JSON; at most {self.max_metadata_bytes}",
                }
        if owner is None:
            owned = self._owned.setdefault(conn.detector_id, {})
            if len(owned) >= self.max_sessions:
                ended = next((s for s in owned if s not in self._sessions), None)
                if ended is None:
                    return {
                        "type": "error",
                        "session_id": session_id,
                        "field": "session_id",
                        "detail": f"this detector already has {self.max_sessions} sessions "
                        "announced and not ended; session refused",
                    }
                del owned[ended]
                del self._owners[ended]
            owned[session_id] = None
            self._owners[session_id] = conn.detector_id
        self._sessions.setdefault(session_id, known).update(fields)
        return None

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def _drop(self, conn: DetectorConnection, why: str) -> None:
        conn.closed.set()
        for request_id, pending in list(self._pending.items()):
            if pending.connection is conn and not pending.future.done():
                pending.future.set_exception(
                    DetectorUnavailableError(
                        f"{why} while the backend waited for {pending.what}",
                        detector_id=conn.detector_id,
                        session_id=pending.session_id,
                    )
                )
                self._pending.pop(request_id, None)
        await self._notify()

    async def _route(
        self,
        conn: DetectorConnection,
        message: dict[str, Any],
        registered: Registration,
        parsed: BaseModel | None,
        session_id: str | None,
        fields: dict[str, Any],
    ) -> None:
        """Where a message that passed the endpoint's checks goes: to the request it answers or
        reports on, to the end of its session, to its type's handler. A message about a session
        another detector owns, or answering a request sent on another connection, goes nowhere
        and is answered with ``error``."""
        kind: str = message["type"]
        request_id = message.get("request_id")
        pending = self._pending.get(request_id) if isinstance(request_id, str) else None
        if pending is not None and pending.connection is not conn:
            await conn.send(
                {
                    "type": "error",
                    "field": "request_id",
                    "detail": f"request {request_id!r} was sent to another detector "
                    "or connection; this answer is ignored",
                }
            )
            return
        role = registered.role
        if session_id is not None and not await self._may_use(conn, session_id, role, fields, kind):
            return
        if role in ("answer", "progress"):
            await self._answered(conn, kind, role, message, pending, request_id)
            return
        if role == "end" and session_id is not None:
            self._sessions.pop(session_id, None)
        if registered.handler is None:
            return
        try:
            await registered.handler(DetectorMessage(self, conn, message, parsed))
        except DetectorUnavailableError:
            raise
        except Exception as exc:
            _log.exception("handler of %s from detector %s failed", kind, conn.detector_id)
            await conn.send(
                {"type": "error", "detail": f"{kind} failed: {exc}", "session_id": session_id}
            )

    async def _may_use(
        self,
        conn: DetectorConnection,
        session_id: str,
        role: str,
        fields: dict[str, Any],
        kind: str,
    ) -> bool:
        """Whether ``conn`` may send a ``kind`` message about ``session_id``: it owns the
        session, or claims it now. An ``end`` claims nothing, nor does an answer or a progress
        report about a session that is not open (one that ended: a late answer to a request
        of a removed card does not bring the session back). A refusal is sent back."""
        if role == "end" or (role in ("answer", "progress") and session_id not in self._sessions):
            owner = self._owners.get(session_id)
            problem = None if owner in (None, conn.detector_id) else not_yours(session_id)
        else:
            was_new = session_id not in self._owners
            problem = self._claim(conn, session_id, fields, "message")
            if problem is None and was_new:
                await self._notify()
        if problem is not None:
            await conn.send({**problem, "detail": f"{kind}: {problem['detail']}"})
        return problem is None

    async def _answered(
        self,
        conn: DetectorConnection,
        kind: str,
        role: str,
        message: dict[str, Any],
        pending: _Pending | None,
        request_id: object,
    ) -> None:
        """An answer or a progress report to the request ``request_id`` (``pending``)."""
        if pending is None:
            if not isinstance(request_id, str):
                await conn.send(
                    {
                        "type": "error",
                        "field": "message.request_id",
                        "detail": f"{kind} answers a request: it needs the "
                        "request_id of that request",
                    }
                )
            return  # the answer to a request nobody waits for any more (timed out, retried)
        if role == "progress":
            if pending.on_progress is not None:
                try:
                    pending.on_progress(message)
                except Exception as exc:  # e.g. the step was cancelled: stop reporting
                    _log.debug("progress callback of %s raised %r", pending.what, exc)
        elif not pending.future.done():
            pending.future.set_result(message)
