"""Chaos on the workers themselves: a ``framepipe worker`` killed with SIGKILL leaves its row in
the workers table, which the survivors' sweep marks ``lost``, so the service's
``framepipe_workers{status="running"}`` counts the workers that run, not every one that ever
ran since the last clean stop."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from framepipe.backends.state import workers
from framepipe.jobs.records import count_jobs
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
