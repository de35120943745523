"""One frame inside a processor: check the entry, run ``process_frame``, judge what it gave.

:func:`run_frame` never raises for the frame's sake: a malformed entry, a ``process_frame``
that raises or runs past its timeout, and a result that is not a JSON-serialisable dict each
become an error :class:`~framepipe.processors.fleet.result_entries.Outcome` (``error_kind``
``input``, ``processor``, ``output``), which the processor publishes like any result. An entry
whose ``reply_to`` is not a reply stream of the processor's namespace
(:meth:`~framepipe.processors.fleet.keys.Keys.reply_stream_of`) is malformed too: its
result goes to the result stream only.

A ``process_frame`` that raises on every frame (a camera sending corrupt images) does not
flood the log: :class:`Raised` logs the first error of each kind at once with its traceback,
then at most one line per ``every`` seconds saying how many were held back; each frame still
gets its error result. Text from the entry (its frame id) and the error's text are shown cut
and escaped (:func:`~framepipe.processors.fleet.shown.loggable`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from framepipe.logs import ComponentLogger, Repeats
from framepipe.processors.fleet.field_values import BadEntryError
from framepipe.processors.fleet.frame_entries import check_entry
from framepipe.processors.fleet.keys import Keys
from framepipe.processors.fleet.result_entries import Outcome
from framepipe.processors.fleet.shown import loggable
from framepipe.redis.streams import Fields
from framepipe.tracing import activate, attach_trace, detach_trace

__all__ = ["FrameHandler", "Raised", "about_image", "run_frame"]

FrameHandler = Callable[[Fields], Awaitable[dict[str, Any] | None]]
"""``ProcessorClient.process_frame``."""

_IMAGE_WORDS = (
    "image",
    "decode",
    "base64",
    "jpeg",
    "jpg",
    "png",
    "identify",
    "imdecode",
    "padding",
    "'nonetype' object",  # cv2.imdecode gave None for bytes that are no image
)
_IMAGE_KINDS = ("binascii.Error", "UnidentifiedImageError", "cv2.error", "DecodeError")


def about_image(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from or during) is plausibly about reading
    the image: an error of a decoder (``binascii.Error``, PIL's ``UnidentifiedImageError``,
    ``cv2.error``) or one whose text names an image, decoding or base64 (``cv2.imdecode``
    returned None: ``'NoneType' object has no attribute 'shape'``)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen and len(seen) < 8:
        seen.add(id(error))
        kind = type(error)
        name = f"{kind.__module__}.{kind.__qualname__}"
        if any(name.endswith(k) for k in _IMAGE_KINDS):
            return True
        try:
            message = str(error).lower()
        except Exception:
            message = ""
        if any(word in message for word in _IMAGE_WORDS):
            return True
        error = error.__cause__ or error.__context__
    return False


class Raised:
    """What to log of ``process_frame`` raising: the first error of each kind (its type) at
    once with its traceback, then at most one line per ``every`` seconds with the number of
    frames that failed so since the line before (see :class:`~framepipe.logs.Repeats`)."""

    def __init__(self, log: ComponentLogger, every: float = 10.0) -> None:
        self.log = log
        self.repeats = Repeats(every)
        self.traced: set[str] = set()

    def __call__(self, frame_id: bytes | None, exc: BaseException) -> None:
        kind = type(exc)
        key = f"{kind.__module__}.{kind.__qualname__}"
        held = self.repeats.admit(key)
        if held is None:
            return
        first = key not in self.traced
        if first and len(self.traced) < 1000:
            self.traced.add(key)
        self.log.warning(
            "process_frame raised for frame %s: %s: %s%s",
            loggable(frame_id),
            kind.__name__,
            loggable(_text(exc), 1000),
            f" ({held} more frame(s) failed so since the last line)" if held else "",
            exc_info=exc if first else None,
        )


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<its text could not be read>"


async def run_frame(
    process_frame: FrameHandler,
    mid: bytes,
    fields: Fields,
    traceparent: str | None,
    *,
    keys: Keys,
    image_encoding: str,
    frame_timeout: float | None,
    log: ComponentLogger,
    raised: Raised | None = None,
    image_hint: str = "",
    span: Any | None = None,
) -> Outcome:
    """Handle entry ``mid``: validate ``fields`` (its ``reply_to`` against the namespace of
    ``keys``, then :func:`check_entry` with ``image_encoding``),
    then await ``process_frame`` within ``frame_timeout`` seconds (None: unbounded) with
    ``span`` (the frame's OpenTelemetry span, when tracing) or else ``traceparent`` as the
    current trace context. Malformed entries are logged on ``log``, ``process_frame``
    raising through ``raised`` (default: a :class:`Raised` of its own, per call). The error
    text of ``process_frame`` raising ends with ``image_hint`` when the error is plausibly
    about reading the image (:func:`about_image`)."""
    try:
        keys.reply_stream_of(fields)
        data = check_entry(fields, image_encoding)
    except BadEntryError as exc:
        log.warning(
            "Malformed entry %s (frame %s): %s",
            loggable(mid),
            loggable(fields.get(b"frame_id")) or "?",
            loggable(str(exc), 1000),
        )
        return Outcome(False, error=str(exc), kind="input")
    deadline = None if frame_timeout is None else asyncio.timeout(frame_timeout)
    token = attach_trace(traceparent) if span is None else activate(span)
    try:
        if deadline is None:
            result = await process_frame(data)
        else:
            async with deadline:
                result = await process_frame(data)
    except Exception as exc:
        if deadline is not None and deadline.expired():
            return Outcome(
                False,
                kind="processor",
                error=(f"process_frame took longer than frame_timeout={frame_timeout:g}s"),
            )
        (raised or Raised(log))(data.get(b"frame_id"), exc)
        error = f"{type(exc).__name__}: {_text(exc)}"
        if image_hint and about_image(exc):
            error += image_hint
        return Outcome(False, error=error, kind="processor")
    finally:
        detach_trace(token)
    if result is None:
        return Outcome(True)
    if not isinstance(result, dict):
        return Outcome(
            False,
            kind="output",
            error=(f"process_frame returned {type(result).__name__}, expected a dict or None"),
        )
    try:
        encoded = json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return Outcome(
            False,
            kind="output",
            error=(f"process_frame returned a result that is not JSON-serialisable: {exc}"),
        )
    return Outcome(True, result=result, result_json=encoded)
