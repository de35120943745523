"""Result entries, the wire format of a frame's result on a reply (or result) stream: how a
processor writes one (:func:`result_fields`, :func:`lost_result` for a frame given up), how a
router reads one (:class:`ProcessorResult`) and matches it to its request (:func:`answers`),
and the reaper's announcement of a moved entry that shares the reply stream (:class:`Moved`).
The fields, and the rules of reply tokens, are in :mod:`~framepipe.processors.fleet.protocol`.

Guarantees: a result echoes its frame entry's ``reply_token`` and ``trace_context`` (a new
trace context only when the entry had none); reading a result entry raises only
:class:`ValueError` (not a result entry at all), a ``result`` that is not a JSON object reads
as an ``output`` error and a ``duration_ms`` that is not a finite number as 0; an
announcement is never read as a result (it has no ``status``). No Redis, no connection: only
building and parsing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

from framepipe.errors import RemoteProcessingError
from framepipe.processors.fleet.field_values import BadEntryError, read_json, text
from framepipe.redis.streams import Fields
from framepipe.tracing import new_traceparent

__all__ = [
    "Moved",
    "Outcome",
    "ProcessorResult",
    "answers",
    "lost_result",
    "moved_fields",
    "result_fields",
]


def _token_of(fields: Mapping[bytes, bytes]) -> dict[str, bytes]:
    """The ``reply_token`` a result echoes: the frame entry's, when it has one."""
    token = fields.get(b"reply_token")
    return {"reply_token": token} if token else {}


def lost_result(
    processor_id: str, mid: bytes, fields: Mapping[bytes, bytes], attempts: int
) -> dict[str, str | bytes]:
    """The error result (``error_kind`` ``lost``) of frame entry ``mid`` given up after
    ``attempts`` deliveries, the last to ``processor_id``."""
    return {
        "frame_id": fields.get(b"frame_id", b""),
        "camera_id": fields.get(b"camera_id", b""),
        "processor_id": processor_id,
        "capability": fields.get(b"capability", b""),
        "status": "error",
        "error_kind": "lost",
        "error": f"the frame was delivered {attempts} times to processors that died or "
        f"restarted before finishing it (last: {processor_id}); given up",
        "trace_context": fields.get(b"trace_context", b""),
        "entry_id": mid,
        "duration_ms": "0",
        "processed_at": repr(time.time()),
        **_token_of(fields),
    }


@dataclass
class Outcome:
    """How handling one frame went, before it is published as a result entry."""

    ok: bool
    result: dict[str, Any] | None = None
    result_json: str | None = None
    error: str | None = None
    kind: str | None = None
    """``input``, ``processor`` or ``output`` when not ``ok``."""


def result_fields(
    processor_id: str,
    mid: bytes,
    fields: Fields,
    outcome: Outcome,
    traceparent: str | None,
    duration_ms: float,
) -> dict[str, str | bytes]:
    """The result entry of frame entry ``mid`` (``fields``) handled by ``processor_id``. The
    frame's ``trace_context`` is passed on unchanged (a new one only when it had none)."""
    trace = fields.get(b"trace_context") or (traceparent or new_traceparent()).encode()
    payload: dict[str, str | bytes] = {
        "frame_id": fields.get(b"frame_id", b""),
        "camera_id": fields.get(b"camera_id", b""),
        "processor_id": processor_id,
        "capability": fields.get(b"capability", b""),
        "status": "ok" if outcome.ok else "error",
        "trace_context": trace,
        "duration_ms": f"{duration_ms:.3f}",
        "processed_at": repr(time.time()),
        "entry_id": mid,
    }
    payload.update(_token_of(fields))
    if outcome.result_json is not None:
        payload["result"] = outcome.result_json
    if not outcome.ok:
        payload["error"] = outcome.error or "error"
        payload["error_kind"] = outcome.kind or "processor"
    return payload


@dataclass(frozen=True)
class ProcessorResult:
    """One processor's result for one frame, as read from the reply stream."""

    frame_id: str
    processor_id: str
    ok: bool
    data: dict[str, Any] | None
    """What ``process_frame`` returned (None: it returned None, or the frame failed)."""
    error: str | None
    error_kind: str | None
    """``processor``, ``output``, ``input`` or ``lost`` (see RemoteProcessingError)."""
    trace_context: str
    camera_id: str = ""
    capability: str = ""
    duration_ms: float = 0.0
    entry_id: str = ""
    reply_token: str = ""
    """The request's token, echoed by the processor ("" from one written before the tokens)."""

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> ProcessorResult:
        """Parse a result entry (raises ValueError when it is not one: no ``frame_id`` or
        ``status``). A result entry whose ``result`` is not a JSON object (not UTF-8, not JSON,
        an array or a number) reads as an ``output`` error naming what was wrong, so that the
        request it answers ends at once with it instead of at its result timeout; a
        ``duration_ms`` that is not a finite number reads as 0."""
        if b"frame_id" not in fields or b"status" not in fields:
            raise ValueError(f"not a result entry: fields {sorted(fields)}")
        get = fields.get
        data, unreadable = _result_data(get(b"result"))
        if fields[b"status"] != b"ok":
            unreadable = None  # (an error result: its own error says what went wrong)
        ok = fields[b"status"] == b"ok" and unreadable is None
        error, kind = get(b"error"), get(b"error_kind")
        return cls(
            frame_id=text(fields[b"frame_id"]),
            processor_id=text(get(b"processor_id")),
            ok=ok,
            data=data,
            error=unreadable or (text(error) if error else None),
            error_kind="output" if unreadable else (text(kind) if kind else None),
            trace_context=text(get(b"trace_context")),
            camera_id=text(get(b"camera_id")),
            capability=text(get(b"capability")),
            duration_ms=_milliseconds(get(b"duration_ms")),
            entry_id=text(get(b"entry_id")),
            reply_token=text(get(b"reply_token")),
        )

    def check(self) -> ProcessorResult:
        """This result; :class:`RemoteProcessingError` when it reports an error."""
        if not self.ok:
            raise RemoteProcessingError(
                self.error or "error",
                frame_id=self.frame_id,
                processor_id=self.processor_id,
                kind=self.error_kind or "processor",
            )
        return self


def _result_data(raw: bytes | None) -> tuple[dict[str, Any] | None, str | None]:
    """A result entry's ``result`` as the object it holds (None when absent or empty), or the
    reason it cannot be read as one."""
    if not raw:
        return None, None
    try:
        data = read_json(raw, "its result")
    except BadEntryError as exc:
        return None, str(exc)
    if data is None:
        return None, None
    if not isinstance(data, dict):
        shown = {list: "array", str: "string", bool: "boolean"}.get(type(data), "number")
        return None, f"its result is a JSON {shown}, not an object"
    return data, None


def _milliseconds(raw: bytes | None) -> float:
    """A ``duration_ms`` field as a number (0 when missing, not a number or not finite)."""
    try:
        value = float(raw or 0.0)
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


@dataclass(frozen=True)
class Moved:
    """A reaper's announcement on a router's reply stream: the entry of the request with
    ``reply_token`` (frame ``frame_id``) was moved, and is now entry ``entry_id`` of
    ``processor_id``'s stream. Never a result: it has no ``status``."""

    frame_id: str
    reply_token: str
    processor_id: str
    entry_id: str

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes]) -> Moved | None:
        """The announcement a reply entry holds; None when it is not one (a result)."""
        to = fields.get(b"moved_to")
        if to is None:
            return None
        return cls(
            frame_id=text(fields.get(b"frame_id")),
            reply_token=text(fields.get(b"reply_token")),
            processor_id=text(to),
            entry_id=text(fields.get(b"entry_id")),
        )


def moved_fields(
    frame_id: bytes | str, reply_token: bytes | str, processor_id: str
) -> list[bytes | str]:
    """The fields (flat: field, value, ...) announcing that the entry of the request with
    ``reply_token`` moves to ``processor_id``'s stream; the script that moves it adds
    ``entry_id``, the new entry's id (see :class:`Moved`)."""
    return ["moved_to", processor_id, "frame_id", frame_id, "reply_token", reply_token]


def answers(
    result: ProcessorResult,
    reply_token: str,
    ended: Container[tuple[str, str]] = (),
) -> bool:
    """Whether ``result`` is the result of the request with ``reply_token`` (the request in
    flight under the result's frame id): the token decides when the result carries one; a
    result without (from a processor written before the tokens) is, unless the entry it
    answered, ``(processor_id, entry_id)``, is in ``ended``: the entries of earlier requests
    of the frame id, which ended (see the module docstring)."""
    if result.reply_token:
        return result.reply_token == reply_token
    return (result.processor_id, result.entry_id) not in ended
