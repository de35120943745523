"""The fleet's wire format: Redis keys, processor states, frame entries and result entries.

Frame entries (stream fields, bytes): ``frame_id``, ``camera_id``, ``timestamp`` (ISO 8601),
``image_data`` (raw JPEG bytes; base64 accepted), ``width``, ``height``, ``format``
(``jpeg``), ``metadata`` (JSON object), ``trace_context`` (W3C ``traceparent``; a JSON object
holding one is accepted) and, from the router, ``capability``, ``reply_to``, ``reply_token``,
``attempt``, ``max_attempts``, ``routed_at``, ``ttl_ms`` (and ``rerouted_from`` and
``first_entry`` after a processor died).

Deadlines (:mod:`~framepipe.processors.fleet.deadlines`): ``ttl_ms`` (optional; whole
milliseconds) is how long after the frame's first ``XADD`` its sender waits for it: a
:meth:`~framepipe.processors.fleet.routing.ProcessorRegistry.call`'s result timeout, a
``route``'s ``max_age`` (none by default). ``first_entry`` is the id of that first entry, written
by the reaper on the entry it moves from a dead processor's stream (the moved entry has an id of
its own, later). The deadline is the millisecond part of ``first_entry`` (else of the entry's
own id) plus ``ttl_ms``, on Redis's clock; a processor that reaches the entry later
acknowledges it without running it or answering it. An entry without ``ttl_ms`` has no
deadline. Processors of an older framepipe ignore both fields and run every frame, however
old; processors of this one run every frame of an older router (it writes no ``ttl_ms``).

Reply tokens: the router gives every request a ``reply_token`` of its own (new each time a
frame is routed, kept when the frame is re-routed) and the processor copies it into the
result; the router takes a result carrying a token only for the request it names
(:func:`answers`), so the late result of a request whose caller gave up is never taken for a
newer request of the same ``frame_id``.

Processors of an older framepipe (written before the tokens: they ignore the field) reply
without ``reply_token``; their results are matched by ``frame_id``. A result without a token
is taken by the request in flight under its frame id, whether or not the router knows the
entry it answered yet: a router learns an entry's id only once the ``XADD`` that wrote it
replied (a processor can answer before that), so an entry it does not know is no reason to
drop a result. Unless it is the late result of an earlier request of that frame id, one that
ended (its caller timed out, or it was answered already): a router remembers the entries
(``processor_id``, ``entry_id``) of its ended requests per frame id
(:class:`~framepipe.processors.fleet.replies.Ended`: the last 10,000 frame ids, each for 10
minutes), and a result without a token that answered one of those is dropped.

Moved entries: a reaper (of any registry) that moves a request's entry to another processor
announces the new entry on the request's reply stream, in the script that writes it, so the
announcement (:class:`Moved`, fields :func:`moved_fields` and ``entry_id``) is read before
any result of the new entry; the router takes it as one more entry of that request (the one
in flight with the announced token, or else one that ended). So an older processor's results
are all taken by the requests they answer, and its late reply to a request that timed out,
from whichever processor the request's entry was moved to by whichever registry, is dropped;
it reaches a newer request of the same frame id only once the router forgot the earlier
request's entries (after 10 minutes, or 10,000 newer frame ids).

Attempts (:class:`Attempts`): a frame's attempts are its deliveries to processors, in the
streams it was re-routed from (its ``attempt`` field minus one) and in the one it is in (the
``times_delivered`` of its pending entry). Once they reach the entry's ``max_attempts`` the
frame is given up with a :func:`lost_result` instead of being delivered again, whether the
registry re-routes it from a dead processor or a processor takes it back after a restart.

Result entries: ``frame_id``, ``camera_id``, ``processor_id``, ``capability``, ``status``
(``ok``/``error``), ``result`` (JSON), ``error``, ``error_kind``, ``trace_context`` (the
frame's, unchanged), ``duration_ms``, ``processed_at``, ``entry_id`` (the frame entry's id in
the processor's stream) and ``reply_token`` (the frame entry's, when it had one).

Keys (:class:`Keys`, named by :func:`framepipe.redis.namespaced`; ``namespace`` default
``framepipe:``): ``<ns>:processors`` (set of ids), ``<ns>:proc:<id>`` (hash),
``<ns>:proc:<id>:frames`` (the processor's stream, consumer group ``processors``),
``<ns>:replies:<registry id>`` (a router's reply stream); result streams are named by the
processor, without the namespace. A frame entry's ``reply_to`` may name only a reply stream of
the namespace (:meth:`Keys.reply_stream_of`): its answer, and the expiry it gives the key, never
reach another key.

This module needs neither Redis nor a connection: it only builds and parses entries.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import secrets
import time
import uuid
from collections.abc import Container, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from framepipe.errors import RemoteProcessingError
from framepipe.frames import Frame
from framepipe.redis import namespaced
from framepipe.redis.streams import Fields
from framepipe.tracing import new_traceparent, parse_traceparent

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_NAMESPACE",
    "DEFAULT_REDIS_URL",
    "GROUP",
    "MAX_PERIOD",
    "Attempts",
    "BadEntryError",
    "Fields",
    "Keys",
    "Moved",
    "Outcome",
    "ProcessorResult",
    "ProcessorState",
    "Routable",
    "answers",
    "as_int",
    "check_entry",
    "decode_image_data",
    "entry_fields",
    "frame_entry",
    "lost_result",
    "moved_fields",
    "read_json",
    "result_fields",
    "text",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "framepipe:"
GROUP = "processors"
"""The consumer group on every processor stream."""
DEFAULT_MAX_ATTEMPTS = 3
"""The deliveries a frame is given (the processors it may kill) when its entry does not say
(routers write their ``max_attempts`` on every entry)."""

Routable = Frame | Mapping[str, Any] | Mapping[bytes, Any]
"""What can be routed: a :class:`Frame` (sent as JPEG), or a frame entry as a dict of fields."""


class ProcessorState:
    """Values of the ``state`` field of a processor's hash."""

    READY = "ready"
    """Registered and taking frames."""
    DRAINING = "draining"
    """Stopping: finishing its frames, takes no new one."""
    STOPPED = "stopped"
    """Stopped with entries left in its stream; the registry re-routes them and removes it."""
    DEAD = "dead"
    """Declared dead by the registry (no heartbeat for ``heartbeat_timeout``)."""


@dataclass(frozen=True)
class Keys:
    """The Redis key names of one namespace (given with or without its trailing colon)."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def processors(self) -> str:
        """The set of registered processor ids."""
        return namespaced(self.namespace, "processors")

    def proc(self, processor_id: str) -> str:
        """The hash describing one processor."""
        return namespaced(self.namespace, "proc", processor_id)

    def frames(self, processor_id: str) -> str:
        """The dedicated frame stream of one processor."""
        return namespaced(self.namespace, "proc", processor_id, "frames")

    def replies(self, registry_id: str) -> str:
        """The reply stream of one registry (router)."""
        return namespaced(self.namespace, "replies", registry_id)

    def reply_stream_of(self, fields: Mapping[bytes, bytes]) -> bytes | None:
        """The reply stream frame entry ``fields`` names in ``reply_to`` (None: it names
        none). Whoever answers an entry writes to that key and sets its expiry
        (:data:`~framepipe.redis.scripts.REPLY_STREAM_TTL`), so the entry may name only a
        reply stream of this namespace (``<ns>:replies:<registry id>``): any other key, such
        as another namespace's registry, raises :class:`BadEntryError` and is never written."""
        target = fields.get(b"reply_to")
        if not target:
            return None
        prefix = self.replies("").encode()
        if not target.startswith(prefix) or len(target) == len(prefix):
            raise BadEntryError(
                f"reply_to {text(target[:120])!r} is not a reply stream of namespace "
                f"{self.namespace!r} (a key {prefix.decode()}<registry id>)"
            )
        return target

    @property
    def results(self) -> str:
        """The default result stream of the processors of this namespace."""
        return namespaced(self.namespace, "results")


def text(value: bytes | str | None) -> str:
    """A field's value as text ("" for a missing one; bad UTF-8 replaced)."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


MAX_PERIOD = 300.0
"""The longest heartbeat period (seconds) a record may state, and a client may beat at. The
registry declares a processor dead after three of its periods of silence and a newcomer
watches a record for three of them before taking its id over: a record written by hand with a
huge period (``1e300``) would otherwise keep a dead processor routable, and its id held, for
ever. A period above it reads as no period (:func:`as_period`)."""


def as_period(value: bytes | None, default: float) -> float:
    """A record's period in seconds (``health_interval``); ``default`` when missing, not a
    number, not positive or above :data:`MAX_PERIOD` (a record written by hand must not make
    its holder immortal, nor keep a newcomer watching it forever)."""
    try:
        period = float(value) if value else default
    except ValueError:
        return default
    return period if 0 < period <= MAX_PERIOD else default


def as_int(value: bytes | None, default: int) -> int:
    """A field's value as an int; ``default`` when missing, empty or not a number."""
    try:
        return int(value) if value else default
    except ValueError:
        return default


# -- frame entries --------------------------------------------------------------------------------

_MAGIC: dict[str, tuple[bytes, ...]] = {
    "jpeg": (b"\xff\xd8\xff",),
    "jpg": (b"\xff\xd8\xff",),
    "png": (b"\x89PNG\r\n\x1a\n",),
}


class BadEntryError(ValueError):
    """An entry read from Redis that cannot be read: a frame entry that cannot be handled
    (reported as an ``input`` error), or a field of a result entry or a record that is not
    the JSON it should hold (:func:`read_json`)."""


def read_json(raw: bytes | str, what: str) -> Any:
    """The JSON value of field ``what`` of an entry or record written by anyone with access
    to Redis. Whatever the bytes, the only error is :class:`BadEntryError` naming ``what`` and
    why: not UTF-8, not JSON, or nested too deeply for the parser (which would otherwise
    raise :class:`RecursionError` out of whatever task read the entry)."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except RecursionError:
        raise BadEntryError(f"{what} is JSON nested too deeply to be read") from None
    except UnicodeDecodeError as exc:
        raise BadEntryError(
            f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except ValueError as exc:
        raise BadEntryError(f"{what} is not JSON ({exc}): {text(raw[:200])!r}") from None


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


# -- attempts -------------------------------------------------------------------------------------


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


# -- results --------------------------------------------------------------------------------------


def _token_of(fields: Mapping[bytes, bytes]) -> dict[str, bytes]:
    """The ``reply_token`` a result echoes: the frame entry's, when it has one."""
    token = fields.get(b"reply_token")
    return {"reply_token": token} if token else {}


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
