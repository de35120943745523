"""What framepipe's OpenTelemetry spans cost per frame and per step attempt, in one run.

``.venv/bin/python benchmarks/tracing_overhead.py`` (``--n N`` calls per figure, default
100,000) prints a Markdown table of the median of 5 rounds, in microseconds per call:

* **floor**: an empty Python function call, the least any hook can cost;
* **tracing off** (no TracerProvider: the default): the fleet's three span hooks of one frame
  (``send``, ``process``, ``result``), and a no-op step attempt through
  :func:`framepipe.jobs.running.run_attempt` next to the step function called directly;
* **tracing on** (the SDK's TracerProvider, every span sampled, exported to a no-op exporter
  through a ``SimpleSpanProcessor``, so export is not deferred to a thread): the same.

This is a benchmark, not a test: nothing here asserts a time. Compare the per-frame figures
with a routed frame's round trip (``docs/processor-benchmarks.md``: Redis adds some 100 us per
hop) and the per-step figures with a step's scheduling cost (``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from framepipe import Pipeline, StepContext
from framepipe.backends.state import StateStore
from framepipe.jobs.running import run_attempt
from framepipe.processors.fleet.result_entries import Outcome, ProcessorResult
from framepipe.processors.fleet.routing import Track
from framepipe.processors.fleet.spans import end_process_span, process_span, received, send_spans
from framepipe.tracing import end_span

ROUNDS = 5


class Dropped(SpanExporter):
    """Takes every span and does nothing with it."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_call(fn: Callable[[], Any], n: int) -> float:
    """Median over ROUNDS of the time per call of ``fn``, in microseconds."""
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times)


def fleet_hooks() -> Callable[[], None]:
    """One frame's three span hooks, as the registry and the processor call them."""
    entry = {b"frame_id": b"cam:1:ab", b"capability": b"face_detection", b"attempt": b"1"}
    items = [{"frame_id": "cam:1:ab", "trace_context": None}]
    track = Track("cam:1:ab", "p-1", "face_detection", time.monotonic(), None, 5.0)
    ok = Outcome(True)
    result = ProcessorResult("cam:1:ab", "p-1", True, None, None, None, "")

    def one_frame() -> None:
        spans = send_spans(items, "face_detection")
        for span in spans or ():
            end_span(span)
        trace = None
        span = process_span("p-1", entry, trace)
        end_process_span(span, ok)
        received(result, track)

    return one_frame


def step_attempt(home: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """A no-op step attempt through run_attempt, and the step function called alone."""
    pipeline = Pipeline("bench_trace")

    @pipeline.step()
    def noop(ctx: StepContext) -> None:
        return None

    store = StateStore(f"sqlite:///{home / 'state.db'}")
    step = pipeline.steps["noop"]

    def context() -> StepContext:
        return StepContext(
            pipeline=pipeline,
            execution_id="e" * 32,
            step_key="noop",
            step_name="noop",
            attempt=1,
            inputs={},
            data={},
            params={},
            store=store,
            objects=lambda: None,  # type: ignore[arg-type,return-value]
            post=lambda message: None,
            has_key=lambda key: False,
        )

    def attempt() -> None:
        run_attempt(step, context(), output_limit=1000, traceparent=None)

    def direct() -> None:
        step.fn(context())

    return attempt, direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    n = parser.parse_args().n
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        attempt, direct = step_attempt(Path(tmp))
        frame = fleet_hooks()
        floor = per_call(lambda: None, n)
        off_frame = per_call(frame, n)
        off_attempt = per_call(attempt, n // 10)
        off_direct = per_call(direct, n // 10)
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(Dropped()))
        otel_trace.set_tracer_provider(provider)
        on_frame = per_call(frame, n // 10)
        on_attempt = per_call(attempt, n // 10)
        rows = [
            ("empty function call (floor)", floor, floor),
            ("one frame's span hooks (send, process, result)", off_frame, on_frame),
            ("a no-op step attempt through run_attempt", off_attempt, on_attempt),
            ("the same step function called directly", off_direct, off_direct),
        ]
    print("| per call (us, median of 5) | tracing off | tracing on |")
    print("|---|---:|---:|")
    for what, off, on in rows:
        print(f"| {what} | {off:.2f} | {on:.2f} |")


if __name__ == "__main__":
    main()
