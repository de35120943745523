"""Traces: W3C ``traceparent`` values carried across processes, and framepipe's spans.

Works without OpenTelemetry (fresh ids are random, no span is made); when OpenTelemetry is
installed, a new traceparent is the current span's and a received one becomes the current
context while the frame is handled, so spans made by a processor join the caller's trace.

Spans (see ``docs/tracing.md``) are made only while a recording TracerProvider is set: the
application's own, or the one :func:`setup_tracing` makes from the standard ``OTEL_*``
environment variables. Otherwise :func:`tracer` is None and every span helper here returns at
once: no span object is made, nothing is recorded.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import secrets
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Literal, cast

__all__ = [
    "TRACEPARENT",
    "activate",
    "attach_trace",
    "deactivate",
    "detach_trace",
    "end_span",
    "flush_tracing",
    "new_traceparent",
    "parse_traceparent",
    "setup_tracing",
    "span",
    "start_span",
    "traceparent_of",
    "tracer",
]

TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
"""A well-formed W3C ``traceparent`` (version, trace id, parent span id, flags)."""

SpanKind = Literal["INTERNAL", "PRODUCER", "CONSUMER", "CLIENT", "SERVER"]

_otel_modules: tuple[Any, Any, Any] | Literal[False] | None = False
_tracer_of: tuple[object, Any] | None = None  # (provider, its framepipe tracer or None)
_installed: Any = None  # the TracerProvider setup_tracing made
_UNKNOWN = object()
_PROVIDER_BY_NAME = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ


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


# -- traceparent values ---------------------------------------------------------------------------


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


def _remote_context(otel: tuple[Any, Any, Any], traceparent: str) -> Any:
    """The context whose current span is ``traceparent``'s span context, remote, as the W3C
    propagator's ``extract`` gives it (built directly: a third of the cost); None when the
    value names no trace (all-zero ids, version ``ff``) or is no traceparent at all (checked
    here, so a caller that passes one unchecked gets no trace rather than an error)."""
    if not TRACEPARENT.match(traceparent):
        return None
    trace_id, span_id = int(traceparent[3:35], 16), int(traceparent[36:52], 16)
    if not trace_id or not span_id or traceparent.startswith("ff"):
        return None
    api = otel[2]
    remote = api.NonRecordingSpan(
        api.SpanContext(
            trace_id=trace_id,
            span_id=span_id,
            is_remote=True,
            trace_flags=api.TraceFlags(int(traceparent[53:55], 16)),
        )
    )
    return api.set_span_in_context(remote)


def attach_trace(traceparent: str | None) -> object | None:
    """Make ``traceparent`` (a valid W3C traceparent, or None) the current OpenTelemetry
    context when OpenTelemetry is installed. Returns the token for :func:`detach_trace`, or
    None."""
    if traceparent is None:
        return None
    otel = _otel()
    if otel is None:
        return None
    context = _remote_context(otel, traceparent)
    return None if context is None else cast(object, otel[1].attach(context))


def detach_trace(token: object | None) -> None:
    """Restore the context that was current before :func:`attach_trace` gave ``token``."""
    if token is not None:
        otel = _otel()
        assert otel is not None
        otel[1].detach(token)


# -- spans ----------------------------------------------------------------------------------------


def tracer() -> Any | None:
    """framepipe's OpenTelemetry tracer while a recording TracerProvider is set; None when
    OpenTelemetry is not installed or no provider is set (the API's default), so callers
    make no span at all. Checked at each call: an application may set its provider late."""
    global _tracer_of  # noqa: PLW0603 - the tracer of the provider last seen
    # Setting a provider imports OpenTelemetry's trace API: until something has, there is
    # none, and no import is made here (some 30 ms; the API can also load a provider named by
    # OTEL_PYTHON_TRACER_PROVIDER when first asked for it).
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        if not _PROVIDER_BY_NAME:
            return None
        otel = _otel()
        if otel is None:
            return None
        api = otel[2]
        api.get_tracer_provider()
    # The API's own global, as its ProxyTracer reads it: None until a provider is set (the
    # public getter costs an environment look-up per call, the bulk of a hook when off).
    provider: Any = getattr(api, "_TRACER_PROVIDER", _UNKNOWN)
    if provider is None:
        return None
    if provider is _UNKNOWN:
        provider = api.get_tracer_provider()
    cached = _tracer_of
    if cached is not None and cached[0] is provider:
        return cached[1]
    found = (
        None
        if isinstance(provider, api.ProxyTracerProvider | api.NoOpTracerProvider)
        else provider.get_tracer("framepipe")
    )
    _tracer_of = (provider, found)
    return found


def start_span(
    name: str,
    *,
    parent: str | None = None,
    kind: SpanKind = "INTERNAL",
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Any | None:
    """A started span, child of ``parent`` (a traceparent) or else of the current context;
    None when :func:`tracer` is None. End it with :func:`end_span`."""
    found = tracer()
    if found is None:
        return None
    otel = _otel()
    assert otel is not None
    context = None if parent is None else _remote_context(otel, parent)
    return found.start_span(
        name, context=context, kind=otel[2].SpanKind[kind], attributes=attributes
    )


def end_span(
    span: Any | None,
    error: BaseException | str | None = None,
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> None:
    """End ``span`` (None: nothing to do) with ``attributes``; an ``error`` is recorded
    (an exception as an event) and sets the status ERROR."""
    if span is None:
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        otel = _otel()
        assert otel is not None
        status = otel[2].Status
        if isinstance(error, BaseException):
            span.record_exception(error)
            span.set_status(status(otel[2].StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        else:
            span.set_status(status(otel[2].StatusCode.ERROR, error))
    span.end()


def traceparent_of(span: Any | None) -> str | None:
    """``span``'s W3C traceparent (what a child in another process names as its parent);
    None for no span."""
    if span is None:
        return None
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def activate(span: Any | None) -> object | None:
    """Make ``span`` current (its children, the application's spans included, nest under
    it); the token for :func:`deactivate`, or None for no span."""
    if span is None:
        return None
    otel = _otel()
    assert otel is not None
    return cast(object, otel[1].attach(otel[2].set_span_in_context(span)))


deactivate = detach_trace
"""Restore the context that was current before :func:`activate` gave the token."""


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | None = None,
    kind: SpanKind = "INTERNAL",
    attributes: Mapping[str, str | int | float | bool] | None = None,
) -> Iterator[Any | None]:
    """A current span around the block (None when not tracing); an exception leaving the
    block is recorded on it (status ERROR) and raised on."""
    started = start_span(name, parent=parent, kind=kind, attributes=attributes)
    if started is None:
        yield None
        return
    token = activate(started)
    error: BaseException | None = None
    try:
        yield started
    except BaseException as exc:
        error = exc
        raise
    finally:
        deactivate(token)
        end_span(started, error)


# -- the process's TracerProvider -----------------------------------------------------------------


def _wanted() -> bool:
    """Whether the ``OTEL_*`` environment asks for traces to be exported."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter(name: str) -> Any:
    from framepipe.errors import ConfigError, MissingDependencyError

    if name == "console":
        return importlib.import_module("opentelemetry.sdk.trace.export").ConsoleSpanExporter()
    if name != "otlp":
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (framepipe sets up 'otlp', "
            "'console' or 'none'; set up any other in your application)"
        )
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        module, package = (
            "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
            "opentelemetry-exporter-otlp-proto-grpc",
        )
    elif protocol == "http/protobuf":
        module, package = (
            "opentelemetry.exporter.otlp.proto.http.trace_exporter",
            "opentelemetry-exporter-otlp-proto-http",
        )
    else:
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported "
            "(use 'http/protobuf' or 'grpc')"
        )
    try:
        return importlib.import_module(module).OTLPSpanExporter()
    except ImportError as exc:
        raise MissingDependencyError(package, "otel", f"exporting traces over {protocol}") from exc


def setup_tracing(service_name: str) -> bool:
    """Set up a TracerProvider exporting framepipe's spans as the standard ``OTEL_*``
    environment variables say (``OTEL_TRACES_EXPORTER`` ``otlp``/``console``,
    ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``,
    ``OTEL_BSP_*``...), for the command-line entry points. Does nothing (False) when
    OpenTelemetry's SDK is not installed, when the variables ask for no traces
    (``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER=none``, or neither an exporter nor
    an OTLP endpoint named) or when the application set a provider already. ``service_name``
    applies when ``OTEL_SERVICE_NAME`` (or ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``)
    names none. An unknown exporter, or a missing exporter package, raises a
    :class:`~framepipe.errors.ConfigError` naming the variable (a
    :class:`~framepipe.errors.MissingDependencyError` with the pip command)."""
    global _installed  # noqa: PLW0603 - one provider per process
    if not _wanted() or tracer() is not None:
        return False
    otel = _otel()
    if otel is None:
        return False
    try:
        sdk = importlib.import_module("opentelemetry.sdk.trace")
        export = importlib.import_module("opentelemetry.sdk.trace.export")
        resources = importlib.import_module("opentelemetry.sdk.resources")
    except ImportError:
        return False
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    exporters = [_exporter(n.strip()) for n in names.split(",") if n.strip() not in ("", "none")]
    resource = resources.Resource.create()
    if resource.attributes.get("service.name", "").startswith("unknown_service"):
        resource = resource.merge(resources.Resource({"service.name": service_name}))
    provider = sdk.TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(export.BatchSpanProcessor(exporter))
    otel[2].set_tracer_provider(provider)
    _installed = provider
    return True


def flush_tracing() -> None:
    """Export the spans :func:`setup_tracing`'s provider still holds (before an
    ``os._exit``, which skips the provider's own flush at exit); no-op otherwise."""
    if _installed is not None:
        with contextlib.suppress(Exception):
            _installed.force_flush(5000)
