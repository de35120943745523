"""Trace propagation: W3C ``traceparent`` values carried with frames across processes.

Works without OpenTelemetry (fresh ids are random); when OpenTelemetry is installed, a new
traceparent is the current span's and a received one becomes the current context while the
frame is handled, so spans made by a processor join the caller's trace.
"""

from __future__ import annotations

import importlib
import json
import re
import secrets
from typing import Any, Literal, cast

__all__ = ["TRACEPARENT", "attach_trace", "detach_trace", "new_traceparent", "parse_traceparent"]

TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
"""A well-formed W3C ``traceparent`` (version, trace id, parent span id, flags)."""

_otel_modules: tuple[Any, Any, Any] | Literal[False] | None = False


def _otel() -> tuple[Any, Any, Any] | None:
    """``(opentelemetry.propagate, opentelemetry.context, opentelemetry.trace)`` when
    installed, else None."""
    global _otel_modules  # noqa: PLW0603 - a once-only import cache
    if _otel_modules is False:
        try:
            _otel_modules = (
                importlib.import_module("opentelemetry.propagate"),
                importlib.import_module("opentelemetry.context"),
                importlib.import_module("opentelemetry.trace"),
            )
        except ImportError:
            _otel_modules = None
    return _otel_modules


def new_traceparent() -> str:
    """A fresh W3C ``traceparent``: the current OpenTelemetry span's when one is active,
    otherwise ``00-<32 hex trace id>-<16 hex span id>-01``."""
    otel = _otel()
    if otel is not None:
        carrier: dict[str, str] = {}
        otel[0].inject(carrier)
        value = carrier.get("traceparent")
        if value and TRACEPARENT.match(value):
            return value
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def parse_traceparent(value: bytes | str | None) -> str | None:
    """The ``traceparent`` in ``value``: a traceparent string, or a JSON object holding one
    (the older services' format). None when there is none."""
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = text.strip()
    if text.startswith("{"):
        try:
            carrier = json.loads(text)
        except ValueError:
            return None
        found = carrier.get("traceparent") if isinstance(carrier, dict) else None
        return found if isinstance(found, str) and TRACEPARENT.match(found) else None
    return text if TRACEPARENT.match(text) else None


def attach_trace(traceparent: str | None) -> object | None:
    """Make ``traceparent`` (a valid W3C traceparent, or None) the current OpenTelemetry
    context when OpenTelemetry is installed: its span context, remote, as the W3C
    propagator's ``extract`` gives it (built directly: a third of the cost). Returns the
    token for :func:`detach_trace`, or None."""
    if traceparent is None:
        return None
    otel = _otel()
    if otel is None:
        return None
    trace_id, span_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
    if not trace_id or not span_id or traceparent.startswith("ff"):
        return None  # invalid: extract() would give no context either
    api = otel[2]
    span = api.NonRecordingSpan(
        api.SpanContext(
            trace_id=trace_id,
            span_id=span_id,
            is_remote=True,
            trace_flags=api.TraceFlags(int(traceparent[53:55], 16)),
        )
    )
    return cast(object, otel[1].attach(api.set_span_in_context(span)))


def detach_trace(token: object | None) -> None:
    """Restore the context that was current before :func:`attach_trace` gave ``token``."""
    if token is not None:
        otel = _otel()
        assert otel is not None
        otel[1].detach(token)
