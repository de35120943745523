"""``/metrics``: the state store's jobs and the broker's backlog in Prometheus text format,
read at scrape time (nothing is counted per step for Prometheus)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.jobs.counts import count_jobs
from framepipe.logs import get_logger
from framepipe.outage import cause
from framepipe.stream.pipeline import StreamPipeline
from framepipe.telemetry import (
    EventSinkCollector,
    EventSinkCounts,
    StreamCollector,
    label_value,
)

__all__ = ["jobs_registry"]

_log = get_logger("server.metrics")


class _JobsCollector(Collector):
    def __init__(self, store: StateStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self._backlog_unread: str | None = None  # why the last scrape could not read it

    def collect(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily(
            "framepipe_executions",
            "Executions by pipeline and status.",
            labels=["pipeline", "status"],
        )
        by_step = GaugeMetricFamily(
            "framepipe_steps",
            "Steps by pipeline, step and status.",
            labels=["pipeline", "step", "status"],
        )
        took = SummaryMetricFamily(
            "framepipe_step_duration_seconds",
            "Run time of completed steps (last attempt).",
            labels=["pipeline", "step"],
        )
        retried = GaugeMetricFamily(
            "framepipe_step_failures",
            "Failed attempts of the steps' current run (a retry of the "
            "execution starts them again from 0).",
            labels=["pipeline", "step"],
        )
        crashed = GaugeMetricFamily(
            "framepipe_step_crashes",
            "Times steps' processes died under them.",
            labels=["pipeline", "step"],
        )
        alive = GaugeMetricFamily("framepipe_workers", "Workers by status.", labels=["status"])
        counts = count_jobs(self.store)
        for (pipeline, status), n in counts.executions.items():
            runs.add_metric([label_value(pipeline), status], n)
        for (pipeline, name, status), n in counts.steps.items():
            by_step.add_metric([label_value(pipeline), label_value(name), status], n)
        for (pipeline, name), (n, total) in counts.durations.items():
            took.add_metric(
                [label_value(pipeline), label_value(name)], count_value=n, sum_value=total
            )
        for key, value in counts.failures.items():
            retried.add_metric(list(key), value)
        for key, value in counts.crashes.items():
            crashed.add_metric(list(key), value)
        for status, n in counts.workers.items():
            alive.add_metric([status], n)
        yield from (runs, by_step, took, retried, crashed, alive)
        yield from self._broker()

    def _broker(self) -> Iterator[Metric]:
        if not self.settings.distributed_jobs:
            return
        backlog = GaugeMetricFamily(
            "framepipe_broker_backlog",
            "Job broker: ready steps not yet delivered (lag: Redis "
            "entries, or RabbitMQ messages of up to 16 steps) and "
            "delivered but not acknowledged (pending; Redis only).",
            labels=["kind"],
        )
        seen = GaugeMetricFamily(
            "framepipe_broker_backlog_up",
            "Job broker: 1 when the backlog was read at this scrape, 0 when it could not be "
            "(framepipe_broker_backlog is then left out: not an empty backlog).",
        )
        try:
            from framepipe.jobs.delivery import open_delivery

            delivery = open_delivery(
                self.settings.broker_url, self.settings.broker_namespace, timeout=2.0
            )
            try:
                held = delivery.backlog()
            finally:
                delivery.close()
        except Exception as exc:  # broker down or refusing: say so, do not fail the scrape
            why = cause(exc)
            if why != self._backlog_unread:
                _log.warning("job broker backlog cannot be read (said once): %s", why)
            self._backlog_unread = why
            seen.add_metric([], 0.0)
            yield seen
            return
        if self._backlog_unread is not None:
            _log.info("job broker backlog is read again")
            self._backlog_unread = None
        backlog.add_metric(["lag"], float(held.waiting))
        if held.unacked is not None:
            backlog.add_metric(["pending"], float(held.unacked))
        seen.add_metric([], 1.0)
        yield backlog
        yield seen


def jobs_registry(
    store: StateStore,
    settings: Settings,
    pipelines: Callable[[], Iterable[StreamPipeline]] | None = None,
    event_sinks: Callable[[], Iterable[EventSinkCounts]] | None = None,
) -> CollectorRegistry:
    """A Prometheus registry that reads the jobs when scraped, and with ``pipelines`` the live
    pipelines' metrics too (per stage fps, latency, queue depth, drops; per source restarts),
    with ``event_sinks`` those of the apps' event sinks (written, dropped, pending)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_JobsCollector(store, settings))
    if pipelines is not None:
        registry.register(StreamCollector(pipelines))
    if event_sinks is not None:
        registry.register(EventSinkCollector(event_sinks))
    return registry
