"""Prometheus metrics of live pipelines, read from the live counters at scrape time.

Nothing is updated per frame for Prometheus: a custom collector reads each pipeline's stage
statistics and supervisor health when ``/metrics`` is scraped (or :meth:`App.metrics_text` is
called), so metrics cost nothing on the hot path.

Label values are names (pipelines, stages, sources), never per-frame or per-order values, and
each goes through :func:`label_value`: a name no text can encode (a lone surrogate, as
``os.fsdecode`` makes of a file name that is not UTF-8) is shown escaped instead of failing
the whole scrape.

:func:`event_sink_metrics` adds the counts of an app's event sinks (:mod:`framepipe.event_sinks`)
to its registry: one collector per registry reads every sink added to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from framepipe.sink_counts import SinkCounts
from framepipe.urls import safe_text

if TYPE_CHECKING:
    from framepipe.stream.pipeline import StreamPipeline

__all__ = [
    "EventSinkCollector",
    "StreamCollector",
    "event_sink_metrics",
    "label_value",
    "metrics_registry",
    "render",
]


def label_value(name: object) -> str:
    """``name`` as a label value the exposition format can always encode and anyone who
    scrapes may read: with :func:`~framepipe.untrusted.storable_text`'s escapes when it does
    not encode as UTF-8, and the secrets of every URL in it masked
    (:func:`~framepipe.urls.safe_text`: a source id that is a camera URL with its password).
    Masked here, in the value, the exposition stays valid: a pass over the whole text would
    take a label's closing quote for part of the URL."""
    text = str(name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        from framepipe.untrusted import storable_text

        text = storable_text(text)
    return safe_text(text)


class StreamCollector(Collector):
    """Per stage fps, latency, queue depth, frames, drops, errors; per source restarts, stalls,
    state; per pipeline segments and performance score."""

    def __init__(self, pipelines: Callable[[], Iterable[StreamPipeline]]) -> None:
        self._pipelines = pipelines

    def collect(self) -> Iterator[Metric]:
        labels = ["pipeline", "stage"]
        fps = GaugeMetricFamily("framepipe_stage_fps", "Frames per second handled", labels=labels)
        latency = GaugeMetricFamily(
            "framepipe_stage_latency_seconds",
            "Median processing time of recent frames",
            labels=labels,
        )
        depth = GaugeMetricFamily("framepipe_stage_queue_depth", "Items waiting", labels=labels)
        frames = CounterMetricFamily("framepipe_stage_frames", "Frames handled", labels=labels)
        drops = CounterMetricFamily(
            "framepipe_stage_drops", "Frames dropped by the queue", labels=labels
        )
        errors = CounterMetricFamily(
            "framepipe_stage_errors", "Processor calls that raised", labels=labels
        )
        src = ["pipeline", "source"]
        restarts = CounterMetricFamily("framepipe_source_restarts", "Capture restarts", labels=src)
        stalls = CounterMetricFamily("framepipe_source_stalls", "Capture stalls", labels=src)
        captured = CounterMetricFamily("framepipe_source_frames", "Frames captured", labels=src)
        up = GaugeMetricFamily("framepipe_source_running", "1 while the capture runs", labels=src)
        segments = CounterMetricFamily(
            "framepipe_segments_completed", "Segments completed", labels=["pipeline"]
        )
        score = GaugeMetricFamily(
            "framepipe_performance_score", "0-1 performance score", labels=["pipeline"]
        )
        seg_latency = GaugeMetricFamily(
            "framepipe_segment_latency_seconds",
            "Last frame of a segment to its completion, over the last 256 segments",
            labels=["pipeline", "quantile"],
        )
        for p in self._pipelines():
            name = label_value(p.name)
            for s in p.stats:
                key = [name, label_value(s.name)]
                fps.add_metric(key, s.fps)
                latency.add_metric(key, s.latency_ms / 1000.0)
                depth.add_metric(key, s.depth)
                frames.add_metric(key, s.frames_in)
                drops.add_metric(key, s.dropped)
                errors.add_metric(key, s.errors)
            key = [name, label_value(p.source.source_id)]
            health = p.supervisor.health if p.supervisor is not None else None
            restarts.add_metric(key, health.restarts if health else 0)
            stalls.add_metric(key, health.stalls if health else 0)
            captured.add_metric(key, p.frames_captured)
            up.add_metric(key, 1.0 if p.state.value == "running" else 0.0)
            segments.add_metric([name], p.segments_completed)
            recent = sorted(p.segment_latencies)
            for q in (0.5, 0.95, 1.0):
                if recent:
                    value = recent[min(len(recent) - 1, round(q * (len(recent) - 1)))]
                    seg_latency.add_metric([name, f"{q:g}"], value)
            score.add_metric([name], p.performance_score())
        yield from (
            fps,
            latency,
            depth,
            frames,
            drops,
            errors,
            restarts,
            stalls,
            captured,
            up,
            segments,
            score,
            seg_latency,
        )


class EventSinkCounts(SinkCounts, Protocol):
    """What :class:`EventSinkCollector` reads of a sink (:mod:`framepipe.event_sinks`): its
    counts and the app it is attached to."""

    @property
    def app_name(self) -> str | None: ...


class EventSinkCollector(Collector):
    """Per event sink (labels ``app``: the app it is attached to, ``sink``: its kind,
    ``target``: where it writes, password masked): ``framepipe_event_sink_written`` and
    ``framepipe_event_sink_dropped`` (counters), ``framepipe_event_sink_pending`` (events not
    yet written) and
    ``framepipe_event_sink_writing`` (0 while writing fails, else 1)."""

    def __init__(self, more: Callable[[], Iterable[EventSinkCounts]] | None = None) -> None:
        self._sinks: list[EventSinkCounts] = []
        self._more = more  # sinks read at each scrape, besides those added

    @property
    def sinks(self) -> tuple[EventSinkCounts, ...]:
        """The sinks read at a scrape: those added, then those of ``more``."""
        return tuple(self._sinks) + (tuple(self._more()) if self._more is not None else ())

    def add(self, sink: EventSinkCounts) -> Callable[[], None]:
        """Read ``sink`` at each scrape; returns a function that stops it."""
        self._sinks.append(sink)

        def remove() -> None:
            if sink in self._sinks:
                self._sinks.remove(sink)

        return remove

    def collect(self) -> Iterator[Metric]:
        labels = ["app", "sink", "target"]
        written = CounterMetricFamily(
            "framepipe_event_sink_written", "Events the sink wrote", labels=labels
        )
        dropped = CounterMetricFamily(
            "framepipe_event_sink_dropped",
            "Events dropped: the queue was full, or the sink closed before they were written",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "framepipe_event_sink_pending", "Events waiting to be written", labels=labels
        )
        writing = GaugeMetricFamily(
            "framepipe_event_sink_writing", "0 while writing fails, else 1", labels=labels
        )
        for sink in self.sinks:
            key = [
                label_value(sink.app_name or ""),
                label_value(sink.kind),
                label_value(sink.target),
            ]
            written.add_metric(key, sink.written)
            dropped.add_metric(key, sink.dropped)
            pending.add_metric(key, sink.pending)
            writing.add_metric(key, 0.0 if sink.failing_since is not None else 1.0)
        yield from (written, dropped, pending, writing)


_SINK_COLLECTORS: WeakKeyDictionary[CollectorRegistry, EventSinkCollector] = WeakKeyDictionary()


def event_sink_metrics(registry: CollectorRegistry) -> EventSinkCollector:
    """The :class:`EventSinkCollector` of ``registry``, registered on it the first time: every
    sink of an app shares one, so each metric is exposed once."""
    collector = _SINK_COLLECTORS.get(registry)
    if collector is None:
        collector = _SINK_COLLECTORS[registry] = EventSinkCollector()
        registry.register(collector)
    return collector


def metrics_registry(pipelines: Callable[[], Iterable[StreamPipeline]]) -> CollectorRegistry:
    """A registry of its own (not the global one) holding a :class:`StreamCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamCollector(pipelines))
    return registry


def render(registry: CollectorRegistry) -> str:
    """The registry in Prometheus text format."""
    return generate_latest(registry).decode()
