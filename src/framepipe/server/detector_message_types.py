"""The message types an application registered on a detector hub, each with its model,
handler and role (what the roles mean: :mod:`framepipe.server.detector_messages`).

Guarantees: a type is registered once, for good; the hub's own types
(:data:`~framepipe.server.detector_messages.HUB_MESSAGE_TYPES`) are never registered, nor an
unknown role, nor a handler for an ``answer`` or a ``progress`` report (those go to their
request). A refused registration raises :class:`ValueError` naming the type and changes
nothing. A handler that raises is logged and its detector gets an ``error`` message (a
:class:`~framepipe.errors.DetectorUnavailableError`, the detector gone, propagates).
"""

from __future__ import annotations

from pydantic import BaseModel

from framepipe.errors import DetectorUnavailableError
from framepipe.logs import get_logger
from framepipe.server.detector_messages import (
    HUB_MESSAGE_TYPES,
    MESSAGE_ROLES,
    DetectorMessage,
    Handler,
    MessageRole,
    Registration,
)
from framepipe.urls import safe_text

__all__ = ["MessageTypes", "handle"]

_log = get_logger("server.detector")


class MessageTypes:
    """The registrations by message type."""

    def __init__(self) -> None:
        self._types: dict[str, Registration] = {}

    def register(
        self,
        message_type: str,
        model: type[BaseModel] | None,
        handler: Handler | None,
        role: MessageRole,
    ) -> None:
        """Register ``message_type`` (see the module for what is refused)."""
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

    def get(self, message_type: str) -> Registration | None:
        """How messages of ``message_type`` are handled; None for a type not registered."""
        return self._types.get(message_type)

    def roles(self) -> dict[str, MessageRole]:
        """The registered message types and their roles, by type."""
        return {name: registered.role for name, registered in sorted(self._types.items())}


async def handle(handler: Handler, message: DetectorMessage, session_id: str | None) -> None:
    """Give ``message`` (about ``session_id``, if any) to ``handler``, its type's (see the
    module for a handler that raises)."""
    kind, connection, detector = message.type, message.connection, message.detector_id
    try:  # what the error names is taken first: the handler may change the message
        await handler(message)
    except DetectorUnavailableError:
        raise
    except Exception as exc:
        _log.exception("handler of %s from detector %s failed", kind, detector)
        await connection.send(
            {
                "type": "error",
                "detail": f"{kind} failed: {safe_text(str(exc))}",
                "session_id": session_id,
            }
        )
