"""OpenTelemetry traces: one trace from a frame's routing to its processor's result (the real
fleet on the real Redis), and one from a submit to an execution's last step (the embedded
engine in this process; ``framepipe worker`` processes exporting over OTLP/HTTP to a receiver
in this test). Without a TracerProvider, or without OpenTelemetry at all, nothing is traced and
everything works.

Spans of this process are read with the SDK's ``InMemorySpanExporter`` (the ``exporter``
fixture sets the process's TracerProvider for one test, and unsets it afterwards); a worker's
arrive over the wire as OTLP protobuf, as they would at Jaeger or Tempo.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import REDIS_URL, need_modules, redis_namespace
from framepipe.backends.state import StateStore, executions
from framepipe.config import Settings
from framepipe.errors import RemoteProcessingError
from framepipe.frames import Frame, encode_jpeg
from framepipe.jobs.engine import JobEngine
from framepipe.jobs.loading import resolve_pipeline
from framepipe.jobs.records import get_execution
from framepipe.processors import ProcessorClient, ProcessorRegistry, RemoteProcessor
from waiting import free_port, wait_until

need_modules("opentelemetry.sdk", install="pip install 'framepipe[otel]'")

from opentelemetry import trace as otel_trace  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402
from opentelemetry.util._once import Once  # noqa: E402


def _set_provider(provider: TracerProvider | None) -> None:
    # The API sets a process's provider once; tests set and unset it, as OpenTelemetry's own
    # test utilities do.
    otel_trace._TRACER_PROVIDER_SET_ONCE = Once()
    otel_trace._TRACER_PROVIDER = None
    if provider is not None:
        otel_trace.set_tracer_provider(provider)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """This process's spans, for the test (an SDK TracerProvider, unset afterwards)."""
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    _set_provider(provider)
    try:
        yield memory
    finally:
        _set_provider(None)
        provider.shutdown()


def traceparent(span: ReadableSpan) -> str:
    context = span.get_span_context()
    assert context is not None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def trace_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.trace_id


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def named(spans: Any, name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


# -- frames: injection, processor, result -------------------------------------------------------


class Traced(ProcessorClient):
    """An in-process processor recording the trace context on the wire and the current span
    while it handles a frame; frames whose id starts with ``bad-`` raise."""

    def __init__(self, ns: str) -> None:
        super().__init__(
            "traced-1",
            ["face_detection"],
            result_stream=f"{ns}faces:detected",
            redis_url=REDIS_URL,
            namespace=ns,
            capacity=2,
            health_interval=0.2,
            image_encoding="raw",
        )
        self.wire: list[str] = []
        self.current: list[int] = []

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any]:
        self.wire.append(frame_data[b"trace_context"].decode())
        self.current.append(otel_trace.get_current_span().get_span_context().span_id)
        with otel_trace.get_tracer("app").start_as_current_span("detect faces"):
            if frame_data[b"frame_id"].startswith(b"bad-"):
                raise RuntimeError("detector exploded")
        return {"faces": 1}


@contextlib.asynccontextmanager
async def serving(client: ProcessorClient) -> AsyncIterator[None]:
    task = asyncio.create_task(client.start())
    waiter = asyncio.ensure_future(client.wait_registered())
    await asyncio.wait({waiter, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
    assert waiter.done(), "the processor did not register"
    try:
        yield
    finally:
        client.stop()
        await asyncio.wait_for(task, 15)


def frame(seq: int, **meta: Any) -> Frame:
    return Frame(
        image=np.full((48, 64, 3), seq, np.uint8), source_id="cam", seq=seq, meta=dict(meta)
    )


def test_one_trace_from_a_frames_injection_to_its_processors_result(
    exporter: InMemorySpanExporter,
) -> None:
    async def main() -> None:
        with redis_namespace("fptest:") as ns:
            processor = Traced(ns)
            async with serving(processor), ProcessorRegistry(REDIS_URL, ns) as registry:
                # a frame without a trace: its send span starts one
                result = (await registry.call(frame(1), "face_detection")).check()
                spans = exporter.get_finished_spans()
                [send] = named(spans, "send face_detection")
                [process] = named(spans, "process face_detection")
                [received] = named(spans, "result face_detection")
                [app] = named(spans, "detect faces")
                assert send.parent is None and send.kind is SpanKind.PRODUCER
                assert len({trace_id(s) for s in (send, process, received, app)}) == 1
                # the traceparent on the wire, and in the result, is the send span's
                assert processor.wire == [traceparent(send)]
                assert result.trace_context == traceparent(send)
                assert parent_id(process) == span_id(send) and process.kind is SpanKind.CONSUMER
                assert parent_id(received) == span_id(send)
                # the processor's span is current in process_frame: its own spans nest in it
                assert processor.current == [span_id(process)]
                assert parent_id(app) == span_id(process)
                assert send.attributes is not None and process.attributes is not None
                assert send.attributes["framepipe.frame_id"] == result.frame_id
                assert send.attributes["framepipe.processor_id"] == "traced-1"
                assert process.attributes["framepipe.frame_id"] == result.frame_id
                assert process.attributes["framepipe.processor_id"] == "traced-1"
                assert received.attributes is not None
                assert received.attributes["framepipe.status"] == "ok"
                assert all(s.status.status_code is StatusCode.UNSET for s in spans)

                # an entry carrying its caller's trace: the send span is the caller's child
                exporter.clear()
                caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                entry = {
                    "frame_id": "door-1",
                    "image_data": encode_jpeg(np.zeros((8, 8, 3), np.uint8)),
                    "trace_context": caller,
                }
                result = (await registry.call(entry, "face_detection")).check()
                spans = exporter.get_finished_spans()
                [send] = named(spans, "send face_detection")
                assert f"{trace_id(send):032x}" == "0af7651916cd43dd8448eb211c80319c"
                assert parent_id(send) == int("b7ad6b7169203331", 16)
                assert processor.wire[-1] == traceparent(send) == result.trace_context
                assert {trace_id(s) for s in spans} == {trace_id(send)}

                # a frame whose processing fails: both ends say so
                exporter.clear()
                bad = dict(entry, frame_id="bad-1")
                with pytest.raises(RemoteProcessingError, match="detector exploded"):
                    (await registry.call(bad, "face_detection")).check()
                spans = exporter.get_finished_spans()
                [process] = named(spans, "process face_detection")
                [received] = named(spans, "result face_detection")
                assert process.status.status_code is StatusCode.ERROR
                assert "detector exploded" in (process.status.description or "")
                assert received.status.status_code is StatusCode.ERROR
                assert received.attributes is not None
                assert received.attributes["framepipe.error_kind"] == "processor"

                # a live stage's remote processor: the frame keeps its first send's trace
                exporter.clear()
                stage = RemoteProcessor(registry, "face_detection")
                item = frame(2)
                assert await stage.process(item) is item and item.meta["face_detection"]
                [send] = named(exporter.get_finished_spans(), "send face_detection")
                assert item.meta["trace_context"] == traceparent(send)
                await stage.process(item)  # the next remote stage: the same trace
                sends = named(exporter.get_finished_spans(), "send face_detection")
                assert parent_id(sends[1]) == span_id(send)
                assert trace_id(sends[1]) == trace_id(send)

    asyncio.run(asyncio.wait_for(main(), 60))


# -- jobs: a submit to its last step --------------------------------------------------------------

PIPELINE = """
from opentelemetry import trace

from framepipe import Pipeline, StepContext

traced = Pipeline("otel_traced")


@traced.step()
def fetch(ctx: StepContext) -> dict:
    with trace.get_tracer("app").start_as_current_span("app work"):
        return {"a": 1}


@traced.step(depends_on=["fetch"], retries=1, retry_delay=0.05)
def flaky(ctx: StepContext) -> dict:
    if ctx.attempt < 2:
        raise RuntimeError("flaky failure on attempt 1")
    return {"b": 2}


@traced.step(depends_on=["flaky"])
async def last(ctx: StepContext) -> dict:
    return {"c": 3}
"""


@dataclass
class Got:
    """A span as the OTLP receiver got it."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    service: str
    attributes: dict[str, Any]
    error: bool
    events: list[str] = field(default_factory=list)


def check_steps(
    execution_trace: int,
    execution_span: int,
    steps: list[tuple[str, int, int, dict[str, Any], bool]],
) -> None:
    """``steps``: (name, trace id, parent id, attributes, error) of every step span."""
    assert sorted((name, attrs["framepipe.attempt"]) for name, _t, _p, attrs, _e in steps) == [
        ("step otel_traced.fetch", 1),
        ("step otel_traced.flaky", 1),
        ("step otel_traced.flaky", 2),
        ("step otel_traced.last", 1),
    ]
    for name, trace, parent, attrs, error in steps:
        assert trace == execution_trace, name
        assert parent == execution_span, name
        failed = name.endswith("flaky") and attrs["framepipe.attempt"] == 1
        assert error is failed, name
        assert attrs["framepipe.outcome"] == ("failed" if failed else "completed")
        assert attrs["framepipe.pipeline"] == "otel_traced"
        assert attrs["framepipe.step_key"] == name.rpartition(".")[2]


def write_pipeline(tmp_path: Path) -> tuple[Any, str]:
    path = tmp_path / "traced_pipeline.py"
    path.write_text(textwrap.dedent(PIPELINE))
    loaded = resolve_pipeline(f"{path}:traced")
    return loaded.pipeline, loaded.ref


def test_one_trace_from_a_submit_to_the_last_step_embedded(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    pipeline, ref = write_pipeline(tmp_path)
    settings = Settings(home=tmp_path / "home", retry_initial_delay=0.01, retry_max_delay=0.05)

    async def main() -> str:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(pipeline, {}, ref=ref)
            info = await engine.wait(execution_id)
            assert info.data == {"a": 1, "b": 2, "c": 3}
            return execution_id

    execution_id = asyncio.run(main())
    spans = exporter.get_finished_spans()
    [execution] = named(spans, "execution otel_traced")
    assert execution.kind is SpanKind.PRODUCER and execution.parent is None
    assert execution.attributes == {
        "framepipe.pipeline": "otel_traced",
        "framepipe.mode": "embedded",
        "framepipe.execution_id": execution_id,
    }
    steps = [s for s in spans if s.name.startswith("step ")]
    check_steps(
        trace_id(execution),
        span_id(execution),
        [
            (
                s.name,
                trace_id(s),
                parent_id(s) or 0,
                dict(s.attributes or {}),
                s.status.status_code is StatusCode.ERROR,
            )
            for s in steps
        ],
    )
    assert all(s.attributes and s.attributes["framepipe.mode"] == "embedded" for s in steps)
    assert all(
        s.attributes and s.attributes["framepipe.execution_id"] == execution_id for s in steps
    )
    [failed] = [s for s in steps if s.status.status_code is StatusCode.ERROR]
    assert "flaky failure on attempt 1" in (failed.status.description or "")
    assert [e.name for e in failed.events] == ["exception"]
    # a step's own spans nest in its span
    [app] = named(spans, "app work")
    [fetch] = named(steps, "step otel_traced.fetch")
    assert parent_id(app) == span_id(fetch)
    # the execution's trace is stored with it
    with StateStore(settings.resolved_database_url) as store, store.read() as conn:
        stored = conn.execute(
            executions.select().with_only_columns(executions.c.traceparent)
        ).scalar_one()
    assert stored == traceparent(execution)


class OtlpReceiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver on loopback: the spans POSTed to ``/v1/traces``."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.pb = trace_service_pb2
        self.spans: list[Got] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", free_port()), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"

    def take(self, body: bytes) -> None:
        request = self.pb.ExportTraceServiceRequest()
        request.ParseFromString(body)
        got = []
        for resource_spans in request.resource_spans:
            service = next(
                kv.value.string_value
                for kv in resource_spans.resource.attributes
                if kv.key == "service.name"
            )
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attributes = {
                        kv.key: getattr(kv.value, kv.value.WhichOneof("value"))
                        for kv in span.attributes
                    }
                    got.append(
                        Got(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            service=service,
                            attributes=attributes,
                            error=span.status.code == span.status.STATUS_CODE_ERROR,
                            events=[e.name for e in span.events],
                        )
                    )
        with self.lock:
            self.spans.extend(got)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: OtlpReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        self.server.take(body)
        reply = self.server.pb.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_one_trace_from_a_submit_to_the_last_step_on_a_worker_process(
    tmp_path: Path, exporter: InMemorySpanExporter, receiver: OtlpReceiver
) -> None:
    pipeline, ref = write_pipeline(tmp_path)
    with redis_namespace("fp-otel-") as ns:
        values: dict[str, Any] = {
            "home": tmp_path / "home",
            "database_url": f"sqlite:///{tmp_path / 'state.db'}",
            "broker_url": REDIS_URL,
            "broker_namespace": ns,
            "retry_initial_delay": 0.05,
            "retry_max_delay": 0.2,
            "shutdown_grace": 2.0,
        }
        settings = Settings(**values)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")},
            **{f"FRAMEPIPE_{k.upper()}": str(v) for k, v in values.items()},
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            "OTEL_SERVICE_NAME": "fp-test-worker",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "framepipe", "worker", "-c", "2"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,
            )
        try:

            async def submit() -> str:
                async with JobEngine(settings=settings) as engine:
                    return await engine.submit(pipeline, {}, ref=ref)

            execution_id = asyncio.run(submit())
            with StateStore(settings.resolved_database_url) as store:
                info = wait_until(
                    "the execution to finish on the worker",
                    lambda: (
                        i if (i := get_execution(store, execution_id)).status.finished else None
                    ),
                    60,
                    explain=lambda: log.read_text(errors="replace"),
                )
            assert info.status.value == "completed", log.read_text(errors="replace")

            def step_spans() -> list[Got]:
                with receiver.lock:
                    return [s for s in receiver.spans if s.name.startswith("step ")]

            wait_until(
                "the worker's step spans at the receiver",
                lambda: len(step_spans()) >= 4,
                30,
                explain=lambda: log.read_text(errors="replace"),
            )
        finally:
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0, log.read_text(errors="replace")
    [execution] = named(exporter.get_finished_spans(), "execution otel_traced")
    assert execution.attributes is not None and execution.attributes["framepipe.mode"] == "worker"
    steps = step_spans()
    check_steps(
        trace_id(execution),
        span_id(execution),
        [(s.name, int(s.trace_id, 16), int(s.parent_id, 16), s.attributes, s.error) for s in steps],
    )
    assert {s.service for s in steps} == {"fp-test-worker"}
    assert {s.attributes["framepipe.mode"] for s in steps} == {"worker"}
    assert [s.events for s in steps if s.error] == [["exception"]]
    [fetch] = [s for s in steps if s.name == "step otel_traced.fetch"]
    [app] = [s for s in receiver.spans if s.name == "app work"]
    assert (app.trace_id, app.parent_id) == (fetch.trace_id, fetch.span_id)


# -- without OpenTelemetry configured, or installed ------------------------------------------------

NO_TRACING = """
import asyncio, importlib.abc, json, os, sys

if sys.argv[1] == "uninstalled":
    class NoOtel(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "opentelemetry" or name.startswith("opentelemetry."):
                raise ImportError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, NoOtel())

from framepipe import Pipeline, tracing
from framepipe.backends.state import StateStore, executions
from framepipe.config import Settings
from framepipe.frames import Frame, encode_jpeg
from framepipe.jobs.engine import JobEngine
from framepipe.processors.fleet.frame_entries import frame_entry
import numpy as np

p = Pipeline("plain")

@p.step()
def one(ctx):
    return {"a": 1}

@p.step(depends_on=["one"])
async def two(ctx):
    return {"b": 2}

settings = Settings(home=sys.argv[2])

async def main():
    async with JobEngine(settings=settings) as engine:
        info = await engine.run(p, {})
        return info.data

data = asyncio.run(main())
with StateStore(settings.resolved_database_url) as store, store.read() as conn:
    stored = conn.execute(executions.select().with_only_columns(executions.c.traceparent)).all()
entry = frame_entry(Frame(image=np.zeros((8, 8, 3), np.uint8), source_id="cam", seq=1))
print(json.dumps({
    "data": data,
    "stored": [row[0] for row in stored],
    "tracer": tracing.tracer() is not None,
    "setup": tracing.setup_tracing("x"),
    "trace": tracing.parse_traceparent(entry["trace_context"]) is not None,
    "otel": "opentelemetry" in sys.modules,
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("otel", ["unconfigured", "uninstalled"])
def test_without_tracing_configured_or_installed_nothing_is_traced_and_all_works(
    tmp_path: Path, otel: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if otel == "uninstalled":  # the variables ask for traces; without the extra: none
        env |= {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SERVICE_NAME": "x"}
    done = subprocess.run(
        [sys.executable, "-c", NO_TRACING, otel, str(tmp_path / "home")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["data"] == {"a": 1, "b": 2}
    assert report["stored"] == [None]  # no trace stored with the execution
    assert report["tracer"] is False and report["setup"] is False
    assert report["trace"] is True  # frames still carry a traceparent for the processors
    if otel == "uninstalled":
        assert report["otel"] is False


@pytest.mark.slow
def test_an_exporter_framepipe_cannot_set_up_is_refused_by_name(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {"OTEL_TRACES_EXPORTER": "zipkin", "FRAMEPIPE_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "framepipe", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode != 0
    assert "OTEL_TRACES_EXPORTER" in done.stderr and "'zipkin'" in done.stderr, done.stderr


def test_the_root_of_a_step_span_is_the_submit_even_when_it_ran_inside_an_app_span(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    pipeline, ref = write_pipeline(tmp_path)
    settings = Settings(home=tmp_path / "home", retry_initial_delay=0.01, retry_max_delay=0.05)

    async def main() -> None:
        async with JobEngine(settings=settings) as engine:
            with otel_trace.get_tracer("app").start_as_current_span("request"):
                execution_id = await engine.submit(pipeline, {}, ref=ref)
            await engine.wait(execution_id)

    asyncio.run(main())
    spans = exporter.get_finished_spans()
    [request] = named(spans, "request")
    [execution] = named(spans, "execution otel_traced")
    # a submit made while the application traces a request is part of that request's trace
    assert parent_id(execution) == span_id(request)
    assert {trace_id(s) for s in spans} == {trace_id(request)}


def test_a_parent_that_is_no_traceparent_starts_no_trace_and_raises_nothing(
    exporter: InMemorySpanExporter,
) -> None:
    """A value carried from outside (a header, a stream field) that is no traceparent: the
    span it parents is a root span and attaching it attaches nothing; never an error in the
    code that carries it."""
    from framepipe import tracing as framepipe_tracing

    for garbage in ("garbage", "00-xyz", "", "00-" + "g" * 32 + "-" + "1" * 16 + "-01"):
        span = framepipe_tracing.start_span("after a bad parent", parent=garbage)
        assert span is not None
        framepipe_tracing.end_span(span)
        assert framepipe_tracing.attach_trace(garbage) is None
    finished = named(exporter.get_finished_spans(), "after a bad parent")
    assert len(finished) == 4 and all(parent_id(s) is None for s in finished)
