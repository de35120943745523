"""Frame entries, the wire format of a frame on a processor's stream: how a router writes
one (:func:`frame_entry`, :func:`entry_fields`), how a processor checks one before handling it
(:func:`check_entry`), and how many deliveries one has had and may have (:class:`Attempts`).
The fields are listed in :mod:`~framepipe.processors.fleet.protocol`.

Guarantees: every entry written has a ``frame_id``, a ``trace_context`` and a ``format``; an
entry a processor is given passed :func:`check_entry` (an id, an image of its format, raw or
base64, whole-number sizes, a JSON object as ``metadata``), anything else is a
:class:`~framepipe.processors.fleet.field_values.BadEntryError` naming what is wrong; a frame
is delivered at most its ``max_attempts`` times (:attr:`Attempts.exhausted`). No Redis, no
connection: only building and parsing.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from framepipe.frames import Frame
from framepipe.processors.fleet.field_values import BadEntryError, as_int, read_json, text
from framepipe.redis.streams import Fields
from framepipe.tracing import new_traceparent, parse_traceparent

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "Attempts",
    "Routable",
    "check_entry",
    "decode_image_data",
    "entry_fields",
    "frame_entry",
]

DEFAULT_MAX_ATTEMPTS = 3
"""The deliveries a frame is given (the processors it may kill) when its entry does not say
(routers write their ``max_attempts`` on every entry)."""

Routable = Frame | Mapping[str, Any] | Mapping[bytes, Any]
"""What can be routed: a :class:`Frame` (sent as JPEG), or a frame entry as a dict of fields."""

_MAGIC: dict[str, tuple[bytes, ...]] = {
    "jpeg": (b"\xff\xd8\xff",),
    "jpg": (b"\xff\xd8\xff",),
    "png": (b"\x89PNG\r\n\x1a\n",),
}


def decode_image_data(data: bytes, fmt: str = "jpeg") -> bytes:
    """The raw image bytes of an ``image_data`` field: raw bytes pass, base64 is decoded.

    For ``jpeg``/``png`` the bytes must start with the format's signature, raw or after base64
    decoding; otherwise :class:`ValueError` says what was found. Other formats pass unchecked
    (base64 is decoded when the whole field is valid base64)."""
    fmt = fmt.lower()
    if not data:
        raise BadEntryError("image_data is empty")
    magic = _MAGIC.get(fmt)
    if magic is not None and data.startswith(magic):
        return data
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        decoded = None
    if magic is None:
        return decoded if decoded else data
    if decoded is not None and decoded.startswith(magic):
        return decoded
    raise BadEntryError(
        f"image_data is not a {fmt} image, raw or base64 ({len(data)} bytes, "
        f"starts {data[:8].hex()})"
    )


def check_entry(fields: Fields, image_encoding: str = "raw") -> Fields:
    """Validate a frame entry; the ``frame_data`` a processor is given: the entry's fields with
    ``image_data`` as raw image bytes, or base64 of them when ``image_encoding`` is
    ``base64``. :class:`BadEntryError` names what is wrong."""
    frame_id = fields.get(b"frame_id")
    if not frame_id:
        raise BadEntryError("entry lacks 'frame_id'")
    image = fields.get(b"image_data")
    if image is None:
        raise BadEntryError("entry lacks 'image_data'")
    fmt = text(fields.get(b"format")) or "jpeg"
    raw = decode_image_data(image, fmt)
    for name in (b"width", b"height"):
        value = fields.get(name)
        if value is not None and value != b"" and not value.isdigit():
            raise BadEntryError(f"{name.decode()} is not a whole number: {value[:20]!r}")
    meta = fields.get(b"metadata")
    if meta:
        parsed = read_json(meta, "metadata")
        if not isinstance(parsed, dict):
            raise BadEntryError(f"metadata is not a JSON object: {meta[:40]!r}")
    data = dict(fields)
    data[b"image_data"] = base64.b64encode(raw) if image_encoding == "base64" else raw
    return data


def frame_entry(
    frame: Frame, *, quality: int = 85, trace_context: str | None = None
) -> dict[str, bytes | str]:
    """The stream fields of ``frame``: JPEG ``image_data``, ``width``, ``height``, ``format``,
    ``camera_id`` (the source id), ISO ``timestamp``, ``metadata`` (seq, ts_ms, pts,
    segment_id and the frame's ``meta``, as JSON) and ``trace_context`` (given, or the frame's
    ``meta["trace_context"]``, or a new one). ``frame_id`` is ``<source>:<seq>:<random>``."""
    trace = trace_context or parse_traceparent(frame.meta.get("trace_context")) or new_traceparent()
    meta = {
        "seq": frame.seq,
        "ts_ms": frame.ts_ms,
        "pts": frame.pts,
        "segment_id": frame.segment_id,
        "meta": frame.meta,
    }
    stamp = datetime.fromtimestamp(frame.ts_ms / 1000.0, tz=UTC).isoformat(timespec="milliseconds")
    return {
        "frame_id": f"{frame.source_id}:{frame.seq}:{secrets.token_hex(4)}",
        "camera_id": frame.source_id,
        "timestamp": stamp,
        "image_data": frame.to_jpeg(quality),
        "width": str(frame.width),
        "height": str(frame.height),
        "format": "jpeg",
        "metadata": json.dumps(meta, default=repr),
        "trace_context": trace,
    }


def entry_fields(item: Mapping[Any, Any]) -> dict[str, bytes | str]:
    """A caller's entry dict as stream fields (numbers as text, booleans ``1``/``0``, dicts
    and lists as JSON, None left out); fills ``frame_id``, ``trace_context`` and ``format``
    when missing. :class:`TypeError` for a value that cannot be sent."""
    out: dict[str, bytes | str] = {}
    for key, value in item.items():
        name = key if type(key) is str else text(key)
        kind = type(value)
        if kind is bytes or kind is str:
            out[name] = value
        elif value is None:
            continue
        elif isinstance(value, bytes | str):
            out[name] = value
        elif isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, int | float):
            out[name] = str(value)
        elif isinstance(value, dict | list | tuple):
            out[name] = json.dumps(value)
        else:
            raise TypeError(f"entry field {name!r}: cannot send a {type(value).__name__}")
    if not out.get("frame_id"):
        out["frame_id"] = uuid.uuid4().hex
    if not out.get("trace_context"):
        out["trace_context"] = new_traceparent()
    out.setdefault("format", "jpeg")
    return out


@dataclass(frozen=True)
class Attempts:
    """How often a frame entry was delivered to a processor, and how often it may be."""

    used: int
    """Deliveries so far: ``attempt - 1`` (the streams it was re-routed from, one each) plus
    ``times_delivered`` in its current stream (its first read and every time a processor took
    it back; the registry's own claims leave that count alone)."""
    limit: int
    """The entry's ``max_attempts`` (:data:`DEFAULT_MAX_ATTEMPTS` when missing)."""

    @classmethod
    def of(
        cls,
        fields: Mapping[bytes, bytes],
        times_delivered: int,
        default_limit: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Attempts:
        """The attempts of an entry with ``fields`` pending with ``times_delivered`` (0 when
        it was never delivered in its stream)."""
        previous = max(1, as_int(fields.get(b"attempt"), 1)) - 1
        limit = max(1, as_int(fields.get(b"max_attempts"), default_limit))
        return cls(previous + max(0, times_delivered), limit)

    @property
    def exhausted(self) -> bool:
        """True when it was delivered ``limit`` times: it is given up (:func:`lost_result`),
        never delivered again. A frame is thus processed at most ``limit`` times when every
        processor it was on died (or restarted) before finishing it."""
        return self.used >= self.limit
