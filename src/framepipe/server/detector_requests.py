"""The requests a :class:`~framepipe.server.detector.DetectorHub` has sent and waits answers
to, each with the connection it was sent on.

Guarantees: a waiting request ends once, with its answer, or with a
:class:`~framepipe.errors.DetectorUnavailableError` naming the detector, the session and what
was asked when its connection is dropped (:func:`fail_on`) or the service
shuts down (:func:`fail_all`); a failed request is forgotten at once. A
progress report goes to the request's callback; a callback that raises (e.g. the step was
cancelled) is logged and changes nothing else. An answer counts only when it comes on the
connection its request was sent on (:func:`misdirected` is the refusal of one that does not).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from framepipe.errors import DetectorError, DetectorUnavailableError
from framepipe.logs import get_logger

__all__ = ["PendingRequest", "ask", "fail_all", "fail_on", "misdirected", "unmatched"]

_log = get_logger("server.detector")


class Connection(Protocol):
    """What this module uses of a detector's connection
    (:class:`~framepipe.server.detector_endpoint.DetectorConnection`)."""

    @property
    def detector_id(self) -> str: ...
    async def send(self, message: Mapping[str, Any]) -> None: ...


@dataclass
class PendingRequest:
    """One request waiting for its answer: ``what`` names what was asked."""

    future: asyncio.Future[dict[str, Any]]
    session_id: str
    connection: Connection
    what: str
    on_progress: Callable[[Mapping[str, Any]], None] | None

    @property
    def detector_id(self) -> str:
        return self.connection.detector_id

    def report(self, role: str, message: dict[str, Any]) -> None:
        """A message of ``role`` (``answer`` or ``progress``) about this request: a progress
        report goes to ``on_progress``, the answer ends the request (once)."""
        if role == "progress":
            if self.on_progress is not None:
                try:
                    self.on_progress(message)
                except Exception as exc:  # e.g. the step was cancelled: stop reporting
                    _log.debug("progress callback of %s raised %r", self.what, exc)
        elif not self.future.done():
            self.future.set_result(message)


async def ask(
    pending: dict[str, PendingRequest],
    conn: Connection,
    session_id: str,
    message: Mapping[str, Any],
    what: str,
    on_progress: Callable[[Mapping[str, Any]], None] | None,
    started: float,
    within: float,
) -> dict[str, Any]:
    """Send ``message`` on ``conn`` as a new request about ``session_id`` (its ``request_id``
    added here) and return its answer; the request waits in ``pending`` until it ends. Raises
    :class:`DetectorError` when no answer came within ``within`` seconds of ``started``
    (:func:`time.monotonic`)."""
    request_id = uuid.uuid4().hex
    future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    pending[request_id] = PendingRequest(future, session_id, conn, what, on_progress)
    try:
        await conn.send({**message, "request_id": request_id, "session_id": session_id})
        try:
            left = max(0.0, within - (time.monotonic() - started))
            return await asyncio.wait_for(future, left)
        except TimeoutError:
            raise DetectorError(
                f"no answer to {what} within {within:g}s",
                detector_id=conn.detector_id,
                session_id=session_id,
            ) from None
    finally:
        pending.pop(request_id, None)


def fail_on(pending: dict[str, PendingRequest], conn: Connection, why: str) -> None:
    """Fail and forget the requests of ``pending`` sent on ``conn``: ``why`` says what
    happened to it."""
    for request_id, request in list(pending.items()):
        if request.connection is conn and not request.future.done():
            request.future.set_exception(
                DetectorUnavailableError(
                    f"{why} while the backend waited for {request.what}",
                    detector_id=conn.detector_id,
                    session_id=request.session_id,
                )
            )
            pending.pop(request_id, None)


def fail_all(pending: dict[str, PendingRequest]) -> None:
    """Fail and forget every request of ``pending``: the service is shutting down."""
    for request in list(pending.values()):
        if not request.future.done():
            request.future.set_exception(
                DetectorUnavailableError(
                    f"the service is shutting down while waiting for {request.what}",
                    detector_id=request.detector_id,
                    session_id=request.session_id,
                )
            )
    pending.clear()


def misdirected(request_id: object) -> dict[str, Any]:
    """The ``error`` message refusing an answer to request ``request_id`` that came on another
    connection than the request's."""
    return {
        "type": "error",
        "field": "request_id",
        "detail": f"request {request_id!r} was sent to another detector "
        "or connection; this answer is ignored",
    }


def unmatched(kind: str) -> dict[str, Any]:
    """The ``error`` message refusing a message of type ``kind`` (an answer or a progress
    report) that names no request."""
    return {
        "type": "error",
        "field": "message.request_id",
        "detail": f"{kind} answers a request: it needs the request_id of that request",
    }
