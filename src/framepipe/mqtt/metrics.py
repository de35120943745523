"""The MQTT sink's counters in an app's Prometheus metrics: :class:`SinkCollector`, which
:meth:`~framepipe.mqtt.sink.MqttEventSink.attach` registers on the app's registry and
:meth:`~framepipe.mqtt.sink.MqttEventSink.aclose` unregisters.

Each scrape reads the sink's counters as they are then (labelled with the broker's URL, its
password masked): ``framepipe_mqtt_published``, ``framepipe_mqtt_dropped`` (counters),
``framepipe_mqtt_pending`` and ``framepipe_mqtt_connected`` (gauges)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from framepipe.telemetry import label_value

__all__ = ["SinkCollector"]


class _Counted(Protocol):
    """What the collector reads of a sink (:class:`~framepipe.mqtt.sink.MqttEventSink`)."""

    @property
    def url(self) -> str: ...
    @property
    def published(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def connected(self) -> bool: ...


class SinkCollector(Collector):
    """The sink's counters in the app's Prometheus metrics."""

    def __init__(self, sink: _Counted) -> None:
        self._sink = sink

    def collect(self) -> Iterator[Metric]:
        sink = self._sink
        labels = ["broker"]
        values = [label_value(sink.url)]
        published = CounterMetricFamily(
            "framepipe_mqtt_published", "Events the MQTT broker acknowledged", labels=labels
        )
        published.add_metric(values, sink.published)
        dropped = CounterMetricFamily(
            "framepipe_mqtt_dropped",
            "Events dropped: the queue was full, or the sink closed before they were published",
            labels=labels,
        )
        dropped.add_metric(values, sink.dropped)
        pending = GaugeMetricFamily("framepipe_mqtt_pending", "Events queued", labels=labels)
        pending.add_metric(values, sink.pending)
        up = GaugeMetricFamily(
            "framepipe_mqtt_connected", "1 while connected to the broker", labels=labels
        )
        up.add_metric(values, 1.0 if sink.connected else 0.0)
        yield from (published, dropped, pending, up)
