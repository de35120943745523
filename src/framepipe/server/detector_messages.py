"""The detector protocol's messages as they arrive: each checked at the boundary.

Every text frame must be a JSON object with a string ``type`` holding only storable JSON
(:func:`framepipe.untrusted.check_json`); ids are 1-200 printable characters; announced card
fields are bounded text or a count. A refusal is :class:`~framepipe.errors.InvalidInputError`
naming the field, which :func:`error_message` turns into the ``error`` message a detector gets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from framepipe.errors import InvalidInputError
from framepipe.untrusted import MAX_DEPTH, check_json, check_text

__all__ = ["MAX_ID_LENGTH", "announced", "check_hello", "close_reason", "error_message",
           "identifier", "not_yours", "parse"]

MAX_ID_LENGTH = 200
"""Longest ``detector_id`` and ``session_id`` accepted."""
_MAX_TEXT = 1000  # other announced text: hostname, platform, card id, label, card root
_ANNOUNCED: dict[str, type] = {"card_id": str, "label": str, "root": str, "file_count": int}


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


def announced(message: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The announcement fields of ``message`` (card id, label, root, file count), checked."""
    out: dict[str, Any] = {}
    for key, kind in _ANNOUNCED.items():
        if key not in message or message[key] is None:
            continue
        value = message[key]
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError("must be a whole number >= 0", where=f"{where}.{key}")
        else:
            check_text(value, f"{where}.{key}", max_length=_MAX_TEXT)
        out[key] = value
    return out


def parse(raw: str | bytes, where: str) -> dict[str, Any]:
    """The JSON object of one text frame, refused (:class:`InvalidInputError` naming the
    field) unless it is storable JSON with a string ``type``; a binary frame is refused."""
    if isinstance(raw, bytes):
        raise InvalidInputError("is a binary frame; messages are JSON objects in text frames",
                                where=where)
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InvalidInputError(f"is nested more than {MAX_DEPTH} levels deep",
                                where=where) from None
    except ValueError as exc:
        raise InvalidInputError(f"not JSON: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise InvalidInputError("a message must be a JSON object with a string 'type'",
                                where=where)
    check_json(value, where)
    return value


def check_hello(hello: dict[str, Any]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """The detector id and the sessions (id, announcement) of a ``detector:hello``, or
    :class:`InvalidInputError` naming the first bad field."""
    if hello.get("type") != "detector:hello":
        raise InvalidInputError('the first message must be {"type": "detector:hello", '
                                '"detector_id": ...}', where="hello.type")
    detector_id = identifier(hello.get("detector_id"), "hello.detector_id")
    _optional_name(hello, "hostname", "hello")
    _optional_name(hello, "platform", "hello")
    listed = hello.get("sessions")
    sessions: list[tuple[str, dict[str, Any]]] = []
    if listed is not None:
        if not isinstance(listed, list):
            raise InvalidInputError(f"must be a list of sessions, not {type(listed).__name__}",
                                    where="hello.sessions")
        for n, session in enumerate(listed):
            where = f"hello.sessions[{n}]"
            if not isinstance(session, dict):
                raise InvalidInputError('must be an object {"session_id": ...}', where=where)
            session_id = identifier(session.get("session_id"), f"{where}.session_id")
            sessions.append((session_id, announced(session, where)))
    return detector_id, sessions


def close_reason(text: str) -> str:
    """``text`` cut to the 123 bytes a WebSocket close reason may have."""
    return text.encode("utf-8")[:120].decode("utf-8", "ignore")


def error_message(exc: InvalidInputError, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "detail": str(exc), "field": exc.where, **extra}


def not_yours(session_id: str) -> dict[str, Any]:
    """The refusal of a message naming another detector's session (the owner is not named)."""
    return {"type": "error", "session_id": session_id, "field": "session_id",
            "detail": f"session {session_id!r} belongs to another detector; refused (a card "
                      "session is only served by the detector that announced it)"}
