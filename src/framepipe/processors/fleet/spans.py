"""The fleet's OpenTelemetry spans: one trace from a frame's routing to its result.

* ``send <capability>`` (producer, in the registry): routing one frame, from choosing a
  processor to the stream write; child of the trace context the frame carries (a
  :class:`~framepipe.frames.Frame`'s ``meta["trace_context"]``, an entry's ``trace_context``)
  or else of the current span. Its traceparent is what goes on the wire.
* ``process <capability>`` (consumer, in the processor): handling the frame, current while
  ``process_frame`` runs (spans the processor makes are its children); child of the
  traceparent on the wire.
* ``result <capability>`` (consumer, in the registry): the frame's result read back; child of
  the traceparent the result carries (the send span's).

Each is made only while tracing is on (:func:`framepipe.tracing.tracer`); otherwise these
return None at once and the wire carries the frame's own trace context, as without
OpenTelemetry.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from framepipe.frames import Frame
from framepipe.processors.fleet.field_values import text
from framepipe.processors.fleet.frame_entries import Routable
from framepipe.processors.fleet.result_entries import Outcome, ProcessorResult
from framepipe.redis.streams import Fields
from framepipe.tracing import end_span, parse_traceparent, start_span, tracer

if TYPE_CHECKING:
    from framepipe.processors.fleet.inflight import Track

__all__ = ["carried_trace", "end_process_span", "process_span", "received", "send_spans"]


def carried_trace(item: Routable) -> str | None:
    """The traceparent ``item`` carries (a W3C value, or a JSON object holding one); None."""
    if isinstance(item, Frame):
        value: Any = item.meta.get("trace_context")
    elif isinstance(item, Mapping):
        fields: Mapping[Any, Any] = item
        value = fields.get("trace_context", fields.get(b"trace_context"))
    else:
        return None
    if isinstance(value, dict):
        value = json.dumps(value)
    return parse_traceparent(value) if isinstance(value, str | bytes) else None


def send_spans(items: Sequence[Routable], capability: str) -> list[Any] | None:
    """A started ``send`` span per item, or None when not tracing."""
    if tracer() is None:
        return None
    return [
        start_span(
            f"send {capability}",
            parent=carried_trace(item),
            kind="PRODUCER",
            attributes={
                "framepipe.capability": capability,
                "messaging.system": "redis",
                "messaging.operation.type": "send",
            },
        )
        for item in items
    ]


def process_span(processor_id: str, fields: Fields, traceparent: str | None) -> Any | None:
    """The started ``process`` span of a frame entry, or None when not tracing."""
    if tracer() is None:
        return None
    capability = text(fields.get(b"capability")) or "frame"
    return start_span(
        f"process {capability}",
        parent=traceparent,
        kind="CONSUMER",
        attributes={
            "framepipe.frame_id": text(fields.get(b"frame_id")),
            "framepipe.capability": capability,
            "framepipe.processor_id": processor_id,
            "framepipe.attempt": int(text(fields.get(b"attempt")) or 1),
            "messaging.system": "redis",
            "messaging.operation.type": "process",
        },
    )


def end_process_span(span: Any | None, outcome: Outcome) -> None:
    """End a ``process`` span with how the frame went (an error result: status ERROR)."""
    if span is None:
        return
    attributes: dict[str, str] = {"framepipe.status": "ok" if outcome.ok else "error"}
    if not outcome.ok:
        attributes["framepipe.error_kind"] = outcome.kind or "processor"
    end_span(span, None if outcome.ok else outcome.error or "error", attributes)


def received(result: ProcessorResult, track: Track) -> None:
    """The ``result`` span of ``result``, read back now for ``track`` (none when not
    tracing)."""
    if tracer() is None:
        return
    now = time.monotonic()
    span = start_span(
        f"result {track.capability}",
        parent=parse_traceparent(result.trace_context),
        kind="CONSUMER",
        attributes={
            "framepipe.frame_id": result.frame_id,
            "framepipe.capability": track.capability,
            "framepipe.processor_id": result.processor_id,
            "framepipe.status": "ok" if result.ok else "error",
            "framepipe.round_trip_ms": round((now - track.routed_at) * 1000.0, 3),
            "framepipe.processing_ms": result.duration_ms,
            "messaging.system": "redis",
            "messaging.operation.type": "receive",
        },
    )
    if span is not None:
        if result.ok:
            end_span(span)
        else:
            kind = result.error_kind or "processor"
            end_span(span, f"{kind}: {result.error}", {"framepipe.error_kind": kind})
