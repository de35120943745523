"""The events: ``GET /api/events`` (stored, page by page) and the ``/ws`` WebSocket (live).

Both take ``?execution_id=`` as an id or a unique prefix of one, in any case, as the other
routes do (resolved to the full id before any event is read; none or several: a 404 over
HTTP).

Guarantees of ``/ws``: nothing is read or sent before the token is checked (close code 1008;
an execution token is accepted for its own ``?execution_id=`` only,
:func:`~framepipe.server.access.admit_live_socket`, and the socket is closed with 1008 when
it expires or is revoked, :mod:`~framepipe.server.token_revocations`); a
subscriber gets the current state first (``snapshot``), then every event committed after it, in
order; one that falls too far behind is told so (``lagged``) and closed, to reconnect; one
whose connection takes no message for :data:`STALL_TIMEOUT` seconds (a client that stopped
reading: the socket's buffers are full) is cut off and its subscription ended, so it holds none
of the events committed meanwhile. A step's progress or completion, and an execution's
completion, are also summed up as ``pipeline:progress``, whose execution progress never
decreases within one socket. When the snapshot cannot be made the subscriber gets an ``error``
message and a close frame: 1008 when the request is at fault (an ``execution_id`` that cannot
be an id, checked as over HTTP by :mod:`framepipe.server.params`, or that names no execution),
1011 when the server is (the state database failed; logged), never a dropped connection.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from framepipe.errors import (
    ExecutionNotFoundError,
    FramepipeError,
    InvalidInputError,
    MissingDependencyError,
)
from framepipe.events import Event
from framepipe.logs import get_logger
from framepipe.server.access import (
    admit_live_socket,
    admitted_as,
    admitted_until,
    open_to_execution_tokens,
    shown_event,
    shown_execution,
)
from framepipe.server.params import ExecutionId, check_execution_id
from framepipe.server.public import public_json
from framepipe.server.routes.executions import summaries
from framepipe.server.state import Service, ServiceState
from framepipe.server.token_revocations import REVOKED, is_revoked
from framepipe.untrusted import dumps

try:
    from fastapi import APIRouter, Query, Request, WebSocket, WebSocketDisconnect
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["STALL_TIMEOUT", "pipeline_progress", "router", "socket_router"]

router = APIRouter(tags=["events"])
"""The stored events, included under ``/api``."""

socket_router = APIRouter()
"""``/ws``, at the root: it checks the token itself (a WebSocket has no headers to spare)."""

_log = get_logger("server")

STALL_TIMEOUT = 10.0
"""Seconds a ``/ws`` subscriber's connection may take to accept one message before it is cut
off. A client reading at all drains the few kilobytes above the socket's buffers in far less
(a slow mobile link takes well under a second); only one that stopped reading waits longer."""


class _Stalled(Exception):
    """A subscriber's connection took no message within :data:`STALL_TIMEOUT`."""


def _peer(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client is not None else "?"


async def _send(websocket: WebSocket, message: dict[str, Any]) -> None:
    """Send ``message``, or raise :class:`_Stalled` when the connection does not take it within
    :data:`STALL_TIMEOUT` seconds."""
    try:
        async with asyncio.timeout(STALL_TIMEOUT):  # no task per message, as wait_for makes
            await websocket.send_text(dumps(public_json(message)))
    except TimeoutError:
        raise _Stalled from None


@router.get("/events")
@open_to_execution_tokens("query", "execution_id")
async def events_page(
    service: Service,
    request: Request,
    execution_id: Annotated[ExecutionId | None, Query()] = None,
    after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    """Stored events after id ``after``, oldest first; ``next`` is the id to pass next.
    ``execution_id`` (an id or a unique prefix, in any case, as the other routes take it)
    keeps those of one execution; one that names no execution, or more than one, is a 404.
    An execution token reads them as :func:`~framepipe.server.access.shown_event` says."""
    full_id = await _full_id(service, execution_id)
    page = (await service.jobs.events(full_id, after=after, limit=limit)).to_dict()
    page["events"] = [shown_event(request, service, e) for e in page["events"]]
    return page


def pipeline_progress(event: Event) -> dict[str, Any]:
    """The ``pipeline:progress`` message of a step's progress or completion, or of an
    execution's completion: the step's progress and its execution's (``progress``, which the
    sender keeps from decreasing within one WebSocket)."""
    data = event.data
    if event.type == "execution.completed":
        return {
            "type": "pipeline:progress",
            "execution_id": event.execution_id,
            "step_key": None,
            "step_progress": None,
            "progress": data.get("progress"),
            "message": "completed",
        }
    return {
        "type": "pipeline:progress",
        "execution_id": event.execution_id,
        "step_key": event.step_key,
        "step_progress": 100.0 if event.type == "step.completed" else data.get("progress"),
        "progress": data.get("execution_progress"),
        "message": data.get("message"),
    }


def _id_problem(execution_id: str | None) -> InvalidInputError | None:
    """Why ``execution_id`` (the query parameter) cannot be an execution id, or None."""
    if execution_id is not None:
        try:
            check_execution_id(execution_id)
        except InvalidInputError as exc:
            return InvalidInputError(exc.reason, where="execution_id")
    return None


async def _full_id(service: ServiceState, execution_id: str | None) -> str | None:
    """The full id of the execution ``execution_id`` names (an id or a unique prefix, any
    case, resolved as every route resolves it), or None for all: events are stored and fed
    by full id, so a prefix would match none of them."""
    if execution_id is None:
        return None
    return (await service.jobs.get(execution_id, with_steps=False)).id


async def _snapshot(
    websocket: WebSocket, service: ServiceState, execution_id: str | None
) -> dict[str, Any]:
    """What a subscriber gets first: its execution (as its token reads it), or the newest 50
    (summed up)."""
    if execution_id is None:
        return {"executions": summaries(await service.jobs.list(limit=50))}
    record = (await service.jobs.get(execution_id)).to_dict()
    return {"execution": shown_execution(websocket, service, record)}


async def _refuse(websocket: WebSocket, service: ServiceState, exc: FramepipeError) -> None:
    """Tell the subscriber why there is no snapshot, and close: 1008 for what the request
    asked (a bad or unknown execution id), 1011 for a fault of the server (logged)."""
    if isinstance(exc, (InvalidInputError, ExecutionNotFoundError)):
        code, detail = 1008, service.public(str(exc))
    else:
        _log.error("/ws: no snapshot: %s", exc)
        code, detail = 1011, "the server failed to read the state (its log has the cause)"
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.send_text(dumps(public_json({"type": "error", "detail": detail})))
        await websocket.close(code=code)


async def _relay(
    websocket: WebSocket,
    service: ServiceState,
    stream: AsyncIterator[Event | None],
    first: dict[str, Any],
) -> bool:
    """Send ``first`` (the snapshot), then each event of ``stream`` and its progress summary;
    raises :class:`_Stalled` when the connection stops taking them. Returns True when the
    execution token the socket was admitted with is revoked (that event is not sent)."""
    await _send(websocket, first)
    own_token = admitted_as(websocket)
    # Coalesced progress events of one commit may carry execution progress out of order; the
    # highest seen so far is what a browser should show.
    highest: dict[str | None, float] = {}
    async for event in stream:
        if event is None:
            await _send(websocket, {"type": "lagged"})
            return False
        if own_token is not None and (event.type, event.data.get("token_id")) == (
            REVOKED,
            own_token,
        ):
            return True
        shown = shown_event(websocket, service, event.to_dict())
        await _send(websocket, {"type": "event", "event": shown})
        if event.type in ("step.progress", "step.completed", "execution.completed"):
            message = pipeline_progress(event)
            if message["progress"] is not None:
                message["progress"] = highest[event.execution_id] = max(
                    float(message["progress"]), highest.get(event.execution_id, 0.0)
                )
            await _send(websocket, message)
    return False


async def _forward(
    websocket: WebSocket,
    service: ServiceState,
    stream: AsyncIterator[Event | None],
    first: dict[str, Any],
) -> bool:
    """:func:`_relay` (True: the socket's token was revoked), ending (logged) when the
    connection stalls."""
    try:
        return await _relay(websocket, service, stream, first)
    except _Stalled:
        _log.warning(
            "/ws: the subscriber at %s took no message for %gs (it stopped reading); it is cut off",
            _peer(websocket),
            STALL_TIMEOUT,
        )
        return False


async def _until_expired(websocket: WebSocket) -> None:
    """Return when the execution token ``websocket`` was admitted with expires (never for
    the API token)."""
    until = admitted_until(websocket)
    if until is None:
        await asyncio.Event().wait()
    else:
        await asyncio.sleep(max(0.0, until - time.time()))


async def _until_closed(websocket: WebSocket) -> None:
    """Return when the client goes away (or the server shuts down): the client sends nothing,
    so an idle subscription never holds the server up."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return


@socket_router.websocket("/ws")
async def live(
    websocket: WebSocket,
    service: Service,
    # Checked here, after the token (check_execution_id), not by FastAPI before it.
    execution_id: str | None = None,
    token_param: Annotated[str | None, Query(alias="token")] = None,
) -> None:
    """The current state, then every event as it is committed."""
    if not await admit_live_socket(websocket, service, execution_id):
        return
    problem = _id_problem(execution_id)
    if problem is not None:
        await _refuse(websocket, service, problem)
        return
    try:
        execution_id = await _full_id(service, execution_id)
    except FramepipeError as exc:
        await _refuse(websocket, service, exc)
        return
    feed = service.feed
    async with feed.subscribe(execution_id) as stream:
        after = feed.last_id
        token_id = admitted_as(websocket)  # an execution token: its execution_id is given
        if token_id and execution_id and await is_revoked(service.store, execution_id, token_id):
            # Revoked between the admission and the subscription: its event came before it.
            with contextlib.suppress(RuntimeError, WebSocketDisconnect, TimeoutError):
                await asyncio.wait_for(
                    websocket.close(code=1008, reason="the execution token has been revoked"),
                    STALL_TIMEOUT,
                )
            return
        try:
            first = {
                "type": "snapshot",
                "after": after,
                **await _snapshot(websocket, service, execution_id),
            }
        except FramepipeError as exc:
            await _refuse(websocket, service, exc)
            return

        sender = asyncio.create_task(_forward(websocket, service, stream, first))
        watcher = asyncio.create_task(_until_closed(websocket))
        expiry = asyncio.create_task(_until_expired(websocket))
        tasks = (sender, watcher, expiry)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                    await task
    expired = expiry.done() and not expiry.cancelled()
    revoked = sender.done() and not sender.cancelled() and sender.exception() is None
    revoked = revoked and sender.result()
    closing = (
        websocket.close(code=1008, reason="the execution token has expired")
        if expired
        else websocket.close(code=1008, reason="the execution token has been revoked")
        if revoked
        else websocket.close()
    )
    # The subscription has ended; a stalled connection may not take the close frame either.
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, TimeoutError):
        await asyncio.wait_for(closing, STALL_TIMEOUT)
