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
also relays: a step on a worker gets a :class:`RemoteDetectorHub` from :func:`get_hub`, whose
requests the service makes here, and which fails at once with :class:`DetectorUnavailableError`
when the service is stopped or restarted since (see :mod:`framepipe.server.detector_relay`).

The hub's state is its connections, who owns which session and the waiting requests, changed
together on one loop. This module carries requests and routes what detectors send; the
connections are :mod:`framepipe.server.detector_connections`, the ownership of sessions and
their metadata :mod:`framepipe.server.detector_sessions`, a waiting request and its ending
:mod:`framepipe.server.detector_requests`, the registered types
:mod:`framepipe.server.detector_message_types`. None of them imports this module: the endpoint,
the relay and a handler's :class:`DetectorMessage` see the hub through a Protocol naming what
each uses of it (``ServedHub``, ``RelayedHub``, ``MessageHub``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from framepipe.config import Settings, load_settings
from framepipe.errors import DetectorUnavailableError
from framepipe.logs import get_logger
from framepipe.redis import is_redis_url
from framepipe.server.detector_connections import Connections
from framepipe.server.detector_endpoint import (
    DetectorConnection,
    mount_detector,
    serve_detector,
)
from framepipe.server.detector_message_types import MessageTypes, handle
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
from framepipe.server.detector_requests import (
    PendingRequest,
    ask,
    fail_all,
    fail_on,
    misdirected,
    unmatched,
)
from framepipe.server.detector_sessions import SessionBook

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
        self._book = SessionBook(self, not_yours)
        self._types = MessageTypes()
        self._connections: Connections[DetectorConnection] = Connections()
        self._pending: dict[str, PendingRequest] = {}
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
        self._types.register(message_type, model, handler, role)

    def on(self, message_type: str, handler: Handler) -> None:
        """Call ``handler`` for every message of ``message_type``: shorthand for
        :meth:`register_message` of a notice without a model."""
        self.register_message(message_type, handler=handler)

    def message_types(self) -> dict[str, MessageRole]:
        """The registered message types and their roles."""
        return self._types.roles()

    async def start(
        self, engine: JobEngine, store: StateStore, settings: Settings | None = None
    ) -> None:
        """Attach the service's engine and store (done by ``create_app`` at start-up); when
        the settings send steps to workers over Redis, also relay their requests (see
        :class:`RemoteDetectorHub`)."""
        self._engine = engine
        self.store = store
        self._loop = asyncio.get_running_loop()
        self._connections.bind()
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
        fail_all(self._pending)
        await self._connections.close_all()

    # -- what is connected ----------------------------------------------------------------

    def detectors(self) -> list[dict[str, Any]]:
        """The connected detectors, each with the sessions it owns (cards not removed)."""
        return [
            {**conn.describe(), "sessions": self._book.open_of(conn.detector_id)}
            for conn in self._connections.by_id.values()
        ]

    def owner(self, session_id: str) -> str | None:
        """The id of the detector owning ``session_id`` (connected or not), or None."""
        return self._book.owner(session_id)

    def is_connected(self, detector_id: str) -> bool:
        return detector_id in self._connections.by_id

    # -- requests ---------------------------------------------------------------------------

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
        wait = min(self.reconnect_wait, timeout)
        conn = await self._connections.wait_for(session_id, self._book.owner, wait)
        pending = self._pending
        return await ask(pending, conn, session_id, message, what, on_progress, started, timeout)

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
        conn = self._connections.get(self._book.owner(session_id))
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
        self._connections.by_id[conn.detector_id] = conn
        refused = [
            self._book.claim(conn.detector_id, session_id, fields, f"hello.sessions[{n}]")
            for n, (session_id, fields) in enumerate(sessions)
        ]
        await self._connections.changed()
        return [problem for problem in refused if problem is not None]

    async def _detach(self, conn: DetectorConnection) -> None:
        """Forget ``conn`` unless a newer connection replaced it, failing the requests waiting
        on it; the endpoint calls this on every way out of a connection."""
        if self._connections.get(conn.detector_id) is conn:
            del self._connections.by_id[conn.detector_id]
            await self._drop(conn, "disconnected")
        conn.closed.set()

    def _registration(self, message_type: str) -> Registration | None:
        """How messages of ``message_type`` are handled; None for a type not registered."""
        return self._types.get(message_type)

    async def _drop(self, conn: DetectorConnection, why: str) -> None:
        conn.closed.set()
        fail_on(self._pending, conn, why)
        await self._connections.changed()

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
            await conn.send(misdirected(request_id))
            return
        role = registered.role
        if session_id is not None:  # its detector's session, or one it claims now
            problem, new = self._book.check_use(conn.detector_id, session_id, role, fields)
            if new:
                await self._connections.changed()
            if problem is not None:
                await conn.send({**problem, "detail": f"{kind}: {problem['detail']}"})
                return
        if role in ("answer", "progress"):
            if pending is not None:
                pending.report(role, message)
            elif not isinstance(request_id, str):
                await conn.send(unmatched(kind))
            # else the answer to a request nobody waits for any more (timed out, retried)
            return
        if role == "end" and session_id is not None:
            self._book.end(session_id)
        if registered.handler is not None:
            await handle(
                registered.handler, DetectorMessage(self, conn, message, parsed), session_id
            )
