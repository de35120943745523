"""Chaos on the state database under real ``framepipe worker`` processes: a private PostgreSQL
server stopped at once (as a crash) for longer than the lease while every worker runs a step,
then started again. The outage cost every worker its renewals alike, so no worker takes the
others' (or its own) steps when it ends: each step completes once, under its first attempt."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

import test_jobs_chaos_pipelines as cp
from framepipe.backends.state import events, executions, steps
from framepipe.jobs.models import ExecutionStatus
from test_jobs_workers import Cluster, PrivatePostgres, broker, cluster_factory
from waiting import wait_until

__all__ = ["broker", "cluster_factory"]  # the fixtures, shared with the worker tests

pytestmark = [pytest.mark.slow]


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_database_outage_longer_than_the_lease_costs_no_attempt(
    cluster_factory: Callable[..., Cluster], broker: str, postgres: PrivatePostgres
) -> None:
    cluster = cluster_factory(postgres.url, broker)
    first, second = cluster.worker(concurrency=1), cluster.worker(concurrency=1)
    cluster.wait_registered(first, second)
    execution_id = cluster.submit(cp.two_holds)
    wait_until(
        "each worker to run one of the two steps",
        lambda: len({row.worker for row in cluster.running(execution_id)}) == 2,
    )

    with cluster.store.read() as conn:
        # Claims commit without waiting for the WAL (one lost in a crash is made ready and
        # claimed again: tested with the worker tests); this outage is about the leases.
        conn.exec_driver_sql("CHECKPOINT")
    postgres.crash()
    # Down for twice the lease (2 s): every lease lapses. The steps end meanwhile, so their
    # outcomes wait for the database with the workers' retries.
    time.sleep(2 * cluster.settings.lease_seconds)
    (cluster.dir / "finish").touch()
    wait_until(
        "both steps to end while the database is down",
        lambda: sum(1 for r in cluster.runs_log() if r[0] == "end") == 2,
    )
    postgres.start()

    def finished() -> ExecutionStatus | None:
        try:
            with cluster.store.read() as conn:
                status = conn.execute(
                    sa.select(executions.c.status).where(executions.c.id == execution_id)
                ).scalar_one()
        except sa.exc.OperationalError:  # the test's own pool meets the restart too
            return None
        return ExecutionStatus(status) if ExecutionStatus(status).finished else None

    assert wait_until("the execution to finish", finished, timeout=60) is ExecutionStatus.COMPLETED
    with cluster.store.read() as conn:
        attempts = dict(
            conn.execute(
                sa.select(steps.c.key, steps.c.attempt).where(steps.c.execution_id == execution_id)
            ).all()
        )
        types = list(
            conn.execute(
                sa.select(events.c.type).where(events.c.execution_id == execution_id)
            ).scalars()
        )
    assert attempts == {"hold_a": 1, "hold_b": 1}, types
    assert "step.lease_expired" not in types
    assert "step.crashed" not in types
    assert sorted(r[1] for r in cluster.runs_log() if r[0] == "start") == ["hold_a", "hold_b"]
    assert first.poll() is None
    assert second.poll() is None
