"""Prometheus metrics of live pipelines, read from the live counters at scrape time.

Nothing is updated per frame for Prometheus: a custom collector reads each pipeline's stage
statistics and supervisor health when ``/metrics`` is scraped (or :meth:`App.metrics_text` is
called), so metrics cost nothing on the hot path.

Label values are names (pipelines, stages, sources), never per-frame or per-order values, and
each goes through :func:`label_value`: a name no text can encode (a lone surrogate, as
``os.fsdecode`` makes of a file name that is not UTF-8) is shown escaped instead of failing
the whole scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from framepipe.stream.pipeline import StreamPipeline

__all__ = ["StreamCollector", "label_value", "metrics_registry", "render"]


def label_value(name: object) -> str:
    """``name`` as a label value the exposition format can always encode: unchanged when it
    encodes as UTF-8, else with :func:`~framepipe.untrusted.storable_text`'s escapes."""
    text = str(name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        from framepipe.untrusted import storable_text

        return storable_text(text)
    return text


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


def metrics_registry(pipelines: Callable[[], Iterable[StreamPipeline]]) -> CollectorRegistry:
    """A registry of its own (not the global one) holding a :class:`StreamCollector`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamCollector(pipelines))
    return registry


def render(registry: CollectorRegistry) -> str:
    """The registry in Prometheus text format."""
    return generate_latest(registry).decode()
