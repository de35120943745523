"""Chaos on the job broker under real ``framepipe worker`` processes: a private RabbitMQ node
frozen (SIGSTOP) while workers run steps on the real PostgreSQL. A broker that does not answer
costs delays and log lines, never a step's attempt: its calls do not hold up the worker's lease
renewals or commits."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

import test_jobs_chaos_pipelines as cp
from brokers import PrivateRabbitMQ
from framepipe.backends.state import events, steps
from framepipe.jobs.models import ExecutionStatus
from test_jobs_workers import Cluster, cluster_factory
from waiting import wait_until

__all__ = ["cluster_factory"]  # the fixture, shared with the worker tests

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.rabbitmq]


@pytest.fixture
def rabbit() -> Iterator[PrivateRabbitMQ]:
    node = PrivateRabbitMQ()
    try:
        node.start()
        yield node
    finally:
        if node.proc is not None:
            os.killpg(node.proc.pid, signal.SIGCONT)
        node.stop()


def freeze(node: PrivateRabbitMQ, *, frozen: bool) -> None:
    """SIGSTOP (or SIGCONT) the node: it keeps its sockets open and answers nothing."""
    assert node.proc is not None
    os.killpg(node.proc.pid, signal.SIGSTOP if frozen else signal.SIGCONT)


def step_row(cluster: Cluster, execution_id: str, key: str) -> sa.Row[tuple[int, int]]:
    with cluster.store.read() as conn:
        return conn.execute(
            sa.select(steps.c.attempt, steps.c.crashes).where(
                steps.c.execution_id == execution_id, steps.c.key == key
            )
        ).one()


def event_types(cluster: Cluster, execution_id: str) -> list[str]:
    with cluster.store.read() as conn:
        return list(
            conn.execute(
                sa.select(events.c.type).where(events.c.execution_id == execution_id)
            ).scalars()
        )


def test_a_frozen_broker_costs_no_running_step_its_lease(
    cluster_factory: Callable[..., Cluster], pg_url: str, rabbit: PrivateRabbitMQ
) -> None:
    # Worker 1 (one slot, busy) publishes the child its step spawns while RabbitMQ is frozen:
    # that publish waits for the broker's timeout (10 s), five leases. Its lease renewals and
    # commits must go on meanwhile, or worker 2's sweep takes the healthy step over (a lost
    # attempt, counted toward poison) and runs it a second time.
    cluster = cluster_factory(pg_url, "rabbitmq", broker_url=rabbit.url)
    first = cluster.worker(concurrency=1)
    cluster.wait_registered(first)
    execution_id = cluster.submit_running(cp.gated_spawn)
    second = cluster.worker(concurrency=1)
    cluster.wait_registered(second)

    freeze(rabbit, frozen=True)
    (cluster.dir / "spawn").touch()
    wait_until(
        "worker 1's publish of the child to fail on the frozen broker",
        lambda: "publishing 1 step(s)" in cluster.log(1),
        timeout=60,
        explain=lambda: cluster.log(1)[-2000:],
    )
    freeze(rabbit, frozen=False)
    (cluster.dir / "finish").touch()

    info = cluster.wait(execution_id, timeout=90)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    hold = step_row(cluster, execution_id, "hold")
    assert (hold.attempt, hold.crashes) == (1, 0), event_types(cluster, execution_id)
    types = event_types(cluster, execution_id)
    assert "step.lease_expired" not in types
    assert "step.crashed" not in types
    assert [r[:2] for r in cluster.runs_log() if r[1] == "hold"] == [
        ["start", "hold"],
        ["end", "hold"],
    ]
    assert first.poll() is None
    assert second.poll() is None
