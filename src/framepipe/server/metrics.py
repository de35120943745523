"""``/metrics``: the state store's jobs and the broker's backlog in Prometheus text format,
read at scrape time (nothing is counted per step for Prometheus)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from framepipe.backends.state import StateStore, executions, steps, workers
from framepipe.config import Settings
from framepipe.logs import get_logger
from framepipe.stream.pipeline import StreamPipeline
from framepipe.telemetry import StreamCollector

__all__ = ["jobs_registry"]

_log = get_logger("server.metrics")


class _JobsCollector(Collector):
    def __init__(self, store: StateStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily("framepipe_executions", "Executions by pipeline and status.",
                                 labels=["pipeline", "status"])
        by_step = GaugeMetricFamily("framepipe_steps", "Steps by pipeline, step and status.",
                                    labels=["pipeline", "step", "status"])
        took = SummaryMetricFamily("framepipe_step_duration_seconds",
                                   "Run time of completed steps (last attempt).",
                                   labels=["pipeline", "step"])
        retried = GaugeMetricFamily("framepipe_step_failures",
                                    "Failed attempts of the steps' current run (a retry of the "
                                    "execution starts them again from 0).",
                                    labels=["pipeline", "step"])
        crashed = GaugeMetricFamily("framepipe_step_crashes",
                                    "Times steps' processes died under them.",
                                    labels=["pipeline", "step"])
        alive = GaugeMetricFamily("framepipe_workers", "Workers by status.", labels=["status"])
        with self.store.read() as conn:
            for r in conn.execute(sa.select(executions.c.pipeline, executions.c.status,
                                            sa.func.count()).group_by(executions.c.pipeline,
                                                                      executions.c.status)):
                runs.add_metric([r[0], r[1]], r[2])
            joined = steps.join(executions, executions.c.id == steps.c.execution_id)
            for r in conn.execute(sa.select(
                    executions.c.pipeline, steps.c.name, steps.c.status, sa.func.count())
                    .select_from(joined)
                    .group_by(executions.c.pipeline, steps.c.name, steps.c.status)):
                by_step.add_metric([r[0], r[1], r[2]], r[3])
            fails: dict[tuple[str, str], float] = {}
            crashes: dict[tuple[str, str], float] = {}
            for r in conn.execute(sa.select(
                    executions.c.pipeline, steps.c.name, sa.func.sum(steps.c.failures),
                    sa.func.sum(steps.c.crashes)).select_from(joined)
                    .group_by(executions.c.pipeline, steps.c.name)):
                fails[(r[0], r[1])] = float(r[2] or 0)
                crashes[(r[0], r[1])] = float(r[3] or 0)
            for r in conn.execute(sa.select(
                    executions.c.pipeline, steps.c.name, sa.func.count(),
                    sa.func.sum(steps.c.finished_at - steps.c.started_at))
                    .select_from(joined)
                    .where(steps.c.status == "completed", steps.c.started_at.is_not(None),
                           steps.c.finished_at.is_not(None))
                    .group_by(executions.c.pipeline, steps.c.name)):
                took.add_metric([r[0], r[1]], count_value=r[2], sum_value=float(r[3] or 0.0))
            for r in conn.execute(sa.select(workers.c.status, sa.func.count())
                                  .group_by(workers.c.status)):
                alive.add_metric([r[0]], r[1])
        for key, value in fails.items():
            retried.add_metric(list(key), value)
        for key, value in crashes.items():
            crashed.add_metric(list(key), value)
        yield from (runs, by_step, took, retried, crashed, alive)
        yield from self._broker()

    def _broker(self) -> Iterator[Metric]:
        if not self.settings.distributed_jobs:
            return
        backlog = GaugeMetricFamily("framepipe_broker_backlog",
                                    "Job broker: ready steps not yet delivered (lag: Redis "
                                    "entries, or RabbitMQ messages of up to 16 steps) and "
                                    "delivered but not acknowledged (pending; Redis only).",
                                    labels=["kind"])
        try:
            from framepipe.jobs.delivery import open_delivery

            delivery = open_delivery(self.settings.broker_url, self.settings.broker_namespace,
                                     timeout=2.0)
            try:
                held = delivery.backlog()
            finally:
                delivery.close()
        except Exception as exc:  # broker down: say so, do not fail the scrape
            _log.debug("broker backlog not read: %s", exc)
            return
        backlog.add_metric(["lag"], float(held.waiting))
        if held.unacked is not None:
            backlog.add_metric(["pending"], float(held.unacked))
        yield backlog


def jobs_registry(store: StateStore, settings: Settings,
                  pipelines: Callable[[], Iterable[StreamPipeline]] | None = None,
                  ) -> CollectorRegistry:
    """A Prometheus registry that reads the jobs when scraped, and with ``pipelines`` the live
    pipelines' metrics too (per stage fps, latency, queue depth, drops; per source restarts)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_JobsCollector(store, settings))
    if pipelines is not None:
        registry.register(StreamCollector(pipelines))
    return registry
