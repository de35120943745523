"""The detector protocol's messages: the types an application registers on the hub, and every
message checked at the boundary as it arrives.

Besides the hub's own types (:data:`HUB_MESSAGE_TYPES`: ``detector:hello``,
``detector:welcome``, ``error``), a hub speaks only what the application registers on it, each
type with an optional pydantic model every message of it must validate against, and a role
(``examples/sd_import/sd_messages.py`` registers the SD-card import's vocabulary so)::

    hub = DetectorHub("sd_import", session_metadata=CardInfo)
    hub.register_message("sd:file_list", FileList, on_file_list)       # a notice
    hub.register_message("sd:copy_progress", CopyProgress, role="progress")
    hub.register_message("sd:file_copied", FileCopied, role="answer")
    hub.register_message("detector:sd_removed", CardRemoved, role="end")

Roles (:data:`MessageRole`): a ``notice`` goes to its handler (if any) as a
:class:`DetectorMessage` whose ``parsed`` is the validated model; an ``answer`` (matched by
``request_id``) is what ``DetectorHub.request`` returns, and one that nobody waits for any more
(timed out, retried) is dropped; a ``progress`` report (matched by ``request_id``) goes to the
request's ``on_progress``; an ``end`` ends its session (no longer listed, still its
detector's), then goes to its handler if it has one. ``DetectorHub.on(type, handler)`` is the
shorthand for a notice without a model. A type nobody registered is refused.

Session metadata is what a detector announces about a session (the SD import: ``card_id``,
``label``, ``root``, ``file_count``). The hub's ``session_metadata`` model names its fields;
they are read from a hello's session entries and from every message naming the session,
validated by that model and bounded to ``max_metadata_bytes`` of JSON (one message's, and the
session's whole record). The hub does not interpret them: it keeps the latest value of each
and lists them with the session in ``GET /api/detectors``. Without a model a session carries
no metadata.

Checking: every text frame must be a JSON object with a string ``type`` holding only storable
JSON (:func:`framepipe.untrusted.check_json`); ids are 1-200 printable characters; the session
metadata is checked by :func:`session_metadata`, the message by its type's model
(:func:`validated`). A refusal is :class:`~framepipe.errors.InvalidInputError` naming the field
(``message.files[3].path``), which :func:`error_message` turns into the ``error`` message a
detector gets.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, get_args

from pydantic import BaseModel, ValidationError

from framepipe.errors import InvalidInputError
from framepipe.untrusted import MAX_DEPTH, check_json, check_text, json_size

if TYPE_CHECKING:
    import builtins

    from framepipe.jobs.engine import JobEngine

__all__ = [
    "DEFAULT_MAX_METADATA_BYTES",
    "HUB_MESSAGE_TYPES",
    "MAX_ID_LENGTH",
    "MESSAGE_ROLES",
    "DetectorMessage",
    "Handler",
    "MessageConnection",
    "MessageHub",
    "MessageRole",
    "Registration",
    "check_hello",
    "close_reason",
    "error_message",
    "identifier",
    "not_yours",
    "parse",
    "session_metadata",
    "validated",
]

MAX_ID_LENGTH = 200
"""Longest ``detector_id`` and ``session_id`` accepted."""

DEFAULT_MAX_METADATA_BYTES = 16 * 1024
"""Default bound on one session's metadata, as compact JSON."""


MessageRole = Literal["notice", "answer", "progress", "end"]
"""What the hub does with a registered message type (see the module)."""
MESSAGE_ROLES: tuple[str, ...] = get_args(MessageRole)

HUB_MESSAGE_TYPES = frozenset({"detector:hello", "detector:welcome", "error"})
"""The hub's own message types, which an application cannot register."""

M = TypeVar("M", bound=BaseModel)


class MessageHub(Protocol):
    """What a message carries of the hub it arrived at
    (:class:`~framepipe.server.detector.DetectorHub`): its id (what
    :func:`~framepipe.server.detector.get_hub` finds it by), the service's engine, and a
    message to the detector owning a session."""

    @property
    def id(self) -> str: ...
    @property
    def engine(self) -> JobEngine: ...
    async def send(self, session_id: str, message: Mapping[str, Any]) -> bool: ...


class MessageConnection(Protocol):
    """What a message carries of the connection it came on
    (:class:`~framepipe.server.detector_endpoint.DetectorConnection`): its detector, and a
    message back to it."""

    @property
    def detector_id(self) -> str: ...
    async def send(self, message: Mapping[str, Any]) -> None: ...


@dataclass
class DetectorMessage:
    """What a handler gets: the message (as received, checked), ``parsed`` (the message
    validated by its type's model; None without one), who sent it, and the service it
    arrived at."""

    hub: MessageHub
    connection: MessageConnection
    message: dict[str, Any]
    parsed: BaseModel | None = None

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

    def parsed_as(self, model: builtins.type[M]) -> M:
        """``parsed``, typed: the message as ``model``, the model its type was registered
        with (:class:`TypeError` if it was registered with another, or none)."""
        if not isinstance(self.parsed, model):
            raise TypeError(
                f"{self.type} is registered with "
                f"{type(self.parsed).__name__ if self.parsed else 'no model'}, "
                f"not {model.__name__}"
            )
        return self.parsed

    async def reply(self, message: Mapping[str, Any]) -> None:
        """Send ``message`` back to the detector that sent this one."""
        await self.connection.send(message)


Handler = Callable[[DetectorMessage], Awaitable[None]]


@dataclass(frozen=True)
class Registration:
    """One message type an application registered (:meth:`DetectorHub.register_message`)."""

    model: type[BaseModel] | None
    handler: Handler | None
    role: MessageRole


def identifier(value: object, where: str) -> str:
    """A detector or session id: 1-200 printable characters (no control characters: ids go
    to logs and to the dashboard as they are)."""
    text = check_text(value, where, max_length=MAX_ID_LENGTH)
    if not text.strip():
        raise InvalidInputError("is blank", where=where)
    if not text.isprintable():
        raise InvalidInputError("holds a control character", where=where)
    return text


def _optional_name(message: Mapping[str, Any], key: str, where: str) -> None:
    """``message[key]``, if given, is printable text (a host or platform name: it is logged)."""
    if message.get(key) is not None:
        text = check_text(message[key], f"{where}.{key}", max_length=MAX_ID_LENGTH)
        if not text.isprintable():
            raise InvalidInputError("holds a control character", where=f"{where}.{key}")


def _location(loc: tuple[int | str, ...], where: str) -> str:
    """Pydantic's ``('files', 3, 'path')`` under ``where``: ``where.files[3].path``."""
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def validated(model: type[BaseModel], data: Mapping[str, Any], where: str) -> BaseModel:
    """``data`` validated by ``model``, or :class:`InvalidInputError` naming the first wrong
    field under ``where`` (the message lists every problem)."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        problems = [
            (_location(tuple(e["loc"]), where), str(e["msg"]).removeprefix("Value error, "))
            for e in exc.errors(include_url=False)
        ]
    field, reason = problems[0]
    if len(problems) > 1:
        reason += "; also " + "; ".join(f"{f}: {m}" for f, m in problems[1:])
    raise InvalidInputError(reason, where=field)


def session_metadata(
    message: Mapping[str, Any], where: str, model: type[BaseModel] | None, max_bytes: int
) -> dict[str, Any]:
    """The session metadata ``message`` carries: the fields ``model`` names (those given and
    not null), validated by it, as JSON; nothing without a model. The hub stores and lists
    it without reading it. Over ``max_bytes`` of JSON it is refused naming ``where``."""
    if model is None:
        return {}
    given = {name: message[name] for name in model.model_fields if message.get(name) is not None}
    if not given:
        return {}
    checked = validated(model, given, where)
    metadata = checked.model_dump(mode="json", include=set(given))
    check_json(metadata, where)
    size = json_size(metadata)
    if size > max_bytes:
        raise InvalidInputError(
            f"session metadata is {size} bytes of JSON; at most {max_bytes}", where=where
        )
    return metadata


def parse(raw: str | bytes, where: str) -> dict[str, Any]:
    """The JSON object of one text frame, refused (:class:`InvalidInputError` naming the
    field) unless it is storable JSON with a string ``type``; a binary frame is refused."""
    if isinstance(raw, bytes):
        raise InvalidInputError(
            "is a binary frame; messages are JSON objects in text frames", where=where
        )
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InvalidInputError(
            f"is nested more than {MAX_DEPTH} levels deep", where=where
        ) from None
    except ValueError as exc:
        raise InvalidInputError(f"not JSON: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidInputError("a message must be a JSON object with a string 'type'", where=where)
    check_json(value, where)
    return value


def check_hello(
    hello: dict[str, Any],
    metadata: type[BaseModel] | None = None,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """The detector id and the sessions (id, metadata) of a ``detector:hello``, or
    :class:`InvalidInputError` naming the first bad field. Each session's metadata is read
    as :func:`session_metadata` reads it from a message."""
    if hello.get("type") != "detector:hello":
        raise InvalidInputError(
            'the first message must be {"type": "detector:hello", "detector_id": ...}',
            where="hello.type",
        )
    detector_id = identifier(hello.get("detector_id"), "hello.detector_id")
    _optional_name(hello, "hostname", "hello")
    _optional_name(hello, "platform", "hello")
    listed = hello.get("sessions")
    sessions: list[tuple[str, dict[str, Any]]] = []
    if listed is not None:
        if not isinstance(listed, list):
            raise InvalidInputError(
                f"must be a list of sessions, not {type(listed).__name__}", where="hello.sessions"
            )
        for n, session in enumerate(listed):
            where = f"hello.sessions[{n}]"
            if not isinstance(session, dict):
                raise InvalidInputError('must be an object {"session_id": ...}', where=where)
            session_id = identifier(session.get("session_id"), f"{where}.session_id")
            sessions.append(
                (session_id, session_metadata(session, where, metadata, max_metadata_bytes))
            )
    return detector_id, sessions


def close_reason(text: str) -> str:
    """``text`` cut to the 123 bytes a WebSocket close reason may have."""
    return text.encode("utf-8")[:120].decode("utf-8", "ignore")


def error_message(exc: InvalidInputError, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "detail": str(exc), "field": exc.where, **extra}


def not_yours(session_id: str) -> dict[str, Any]:
    """The refusal of a message naming another detector's session (the owner is not named)."""
    return {
        "type": "error",
        "session_id": session_id,
        "field": "session_id",
        "detail": f"session {session_id!r} belongs to another detector; refused (a session "
        "is only served by the detector that announced it)",
    }
