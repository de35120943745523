"""Chaos on the workers themselves: a ``framepipe worker`` killed with SIGKILL leaves its row in
the workers table, which the survivors' sweep marks ``lost``, so the service's
``framepipe_workers{status="running"}`` counts the workers that run, not every one that ever
ran since the last clean stop."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from subprocess import Popen

import pytest
import sqlalchemy as sa

import worker_pipelines as wp
from framepipe.backends.state import steps, workers
from framepipe.jobs.counts import count_jobs
from framepipe.jobs.models import ExecutionStatus
from test_jobs_workers import Cluster, broker, cluster_factory
from waiting import wait_until

__all__ = ["broker", "cluster_factory"]  # the fixtures, shared with the worker tests

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_a_killed_worker_is_no_longer_counted_running(
    cluster_factory: Callable[..., Cluster], pg_url: str, broker: str
) -> None:
    cluster = cluster_factory(pg_url, broker)
    survivor, victim = cluster.worker(), cluster.worker()
    cluster.wait_registered(survivor, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    def status_of(pid: int) -> str:
        with cluster.store.read() as conn:
            return str(
                conn.execute(sa.select(workers.c.status).where(workers.c.pid == pid)).scalar_one()
            )

    wait_until(
        "the killed worker's row to stop saying it runs",
        lambda: status_of(victim.pid) != "running",
        explain=lambda: cluster.log(1)[-2000:],
    )
    assert status_of(victim.pid) == "lost"
    assert status_of(survivor.pid) == "running"
    assert count_jobs(cluster.store).workers == {"running": 1, "lost": 1}
    assert survivor.poll() is None


def _busy_step_started(
    cluster: Cluster, *, seconds: float, concurrency: int = 2
) -> tuple[Popen[bytes], str]:
    """A worker, and an execution whose one step (``busy``, reporting every 50 ms for
    ``seconds``) has started on it."""
    first = cluster.worker(concurrency=concurrency)
    cluster.wait_registered(first)
    execution_id = cluster.submit(wp.reporting, seconds=seconds)
    wait_until(
        "the step to start", lambda: ["start", "busy", "1", str(first.pid)] in cluster.runs_log()
    )
    return first, execution_id


def _attempt_1_stopped(cluster: Cluster, first: Popen[bytes], timeout: float = 30.0) -> None:
    wait_until(
        "attempt 1 to be stopped",
        lambda: ["stopped", "busy", "1", str(first.pid)] in cluster.runs_log(),
        timeout,
        explain=lambda: cluster.log(1)[-2000:],
    )


def _times_said(cluster: Cluster, execution_id: str) -> int:
    """How often the first worker's log says attempt 1 of ``busy`` was taken from it."""
    said = re.compile(
        rf"lost the lease of step busy of {execution_id[:8]} \(attempt 1\)"
        rf"|step busy of {execution_id[:8]} attempt 1 no longer held"
    )
    return len(said.findall(cluster.log(1)))


def test_a_worker_stops_a_step_its_reports_find_taken_over_and_says_so_once(
    cluster_factory: Callable[..., Cluster], pg_url: str, broker: str
) -> None:
    # The step is taken over under the worker's feet, as a second claim of the same attempt
    # after a database crash lost the first: the row names another worker. The step reports
    # every 50 ms, so its next round of reports is fenced (sooner than the lease renewal
    # notices): the step is stopped at once and the log says so once for the attempt, not
    # once per round of reports.
    cluster = cluster_factory(pg_url, broker, lease_seconds=3.0)
    first, execution_id = _busy_step_started(cluster, seconds=8)
    with cluster.store.write() as conn:
        conn.execute(
            sa.update(steps)
            .where(steps.c.execution_id == execution_id, steps.c.key == "busy")
            .values(worker="elsewhere#0:1:gone", lease_until=time.time() - 1)
        )
    _attempt_1_stopped(cluster, first, timeout=10)
    info = cluster.wait(execution_id)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data == {"busy_attempt": 2}
    assert _times_said(cluster, execution_id) == 1, cluster.log(1)
    assert first.poll() is None


def test_a_woken_worker_stops_its_taken_over_step_and_says_so_once(
    cluster_factory: Callable[..., Cluster], pg_url: str
) -> None:
    # A paused worker's step reports progress all the time: when it wakes, its reports (or
    # its lease renewal, whichever comes first) find the step taken over. The step is stopped
    # at once, and the log says so once for the attempt, not once per round of reports.
    # On Redis only: RabbitMQ may push the step, made ready again, to the frozen worker's
    # consumer, where it sits until the broker gives up on that connection (a broker's way,
    # not the worker's; the test above runs on both).
    cluster = cluster_factory(pg_url, "redis", lease_seconds=1.5)
    first, execution_id = _busy_step_started(cluster, seconds=20, concurrency=1)
    os.kill(first.pid, signal.SIGSTOP)
    second = cluster.worker()
    try:
        wait_until(
            "another worker to take the step over",
            lambda: [r for r in cluster.running(execution_id) if r.attempt == 2],
            timeout=20,
        )
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _attempt_1_stopped(cluster, first)
    info = cluster.wait(execution_id)
    assert info.status is ExecutionStatus.COMPLETED
    assert info.data == {"busy_attempt": 2}
    assert ["end", "busy", "1", str(first.pid)] not in cluster.runs_log()
    assert _times_said(cluster, execution_id) == 1, cluster.log(1)
    assert second.poll() is None
