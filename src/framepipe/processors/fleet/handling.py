"""One frame inside a processor: check the entry, run ``process_frame``, judge what it gave.

:func:`run_frame` never raises for the frame's sake: a malformed entry, a ``process_frame``
that raises or runs past its timeout, and a result that is not a JSON-serialisable dict each
become an error :class:`~framepipe.processors.fleet.protocol.Outcome` (``error_kind``
``input``, ``processor``, ``output``), which the processor publishes like any result. An entry
whose ``reply_to`` is not a reply stream of the processor's namespace
(:meth:`~framepipe.processors.fleet.protocol.Keys.reply_stream_of`) is malformed too: its
result goes to the result stream only.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from framepipe.logs import ComponentLogger
from framepipe.processors.fleet.protocol import (
    BadEntryError,
    Fields,
    Keys,
    Outcome,
    check_entry,
    text,
)
from framepipe.tracing import activate, attach_trace, detach_trace

__all__ = ["FrameHandler", "run_frame"]

FrameHandler = Callable[[Fields], Awaitable[dict[str, Any] | None]]
"""``ProcessorClient.process_frame``."""


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
    span: Any | None = None,
) -> Outcome:
    """Handle entry ``mid``: validate ``fields`` (its ``reply_to`` against the namespace of
    ``keys``, then :func:`check_entry` with ``image_encoding``),
    then await ``process_frame`` within ``frame_timeout`` seconds (None: unbounded) with
    ``span`` (the frame's OpenTelemetry span, when tracing) or else ``traceparent`` as the
    current trace context. Malformed entries and failures are logged on ``log``."""
    try:
        keys.reply_stream_of(fields)
        data = check_entry(fields, image_encoding)
    except BadEntryError as exc:
        log.warning(
            "Malformed entry %s (frame %s): %s",
            mid.decode(),
            text(fields.get(b"frame_id")) or "?",
            exc,
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
        log.warning(
            "process_frame raised for frame %s: %s: %s",
            text(data.get(b"frame_id")),
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        return Outcome(False, error=f"{type(exc).__name__}: {exc}", kind="processor")
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
