"""Chaos on the state database under real ``framepipe worker`` processes, for longer than the
lease while every worker runs a step: a private PostgreSQL server stopped at once (as a crash)
and started again, or the real one frozen behind a TCP relay (SIGSTOP: connections stay open
and nothing answers, as in a network partition). The outage cost every worker its renewals
alike, so no worker takes the others' (or its own) steps when it ends: each step completes
once, under its first attempt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

import test_jobs_chaos_pipelines as cp
from framepipe.backends.state import events, executions, steps
from framepipe.jobs.models import ExecutionStatus
from test_jobs_workers import Cluster, PrivatePostgres, broker, cluster_factory
from waiting import free_port, wait_until

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


_RELAY = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def handle(reader, writer):
    try:
        upstream = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    except OSError:
        writer.close()
        return
    await asyncio.gather(pipe(reader, upstream[1]), pipe(upstream[0], writer))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    print("listening", flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


@pytest.fixture
def relayed_pg_url(pg_url: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The real PostgreSQL's URL (a fresh schema) through a TCP relay of the test's own, and
    the relay's process (SIGSTOP freezes every connection through it)."""
    url = sa.engine.make_url(pg_url)
    port = free_port()
    relay = subprocess.Popen(
        [sys.executable, "-c", _RELAY, str(port), str(url.port or 5432)], stdout=subprocess.PIPE
    )
    try:
        assert relay.stdout is not None
        assert relay.stdout.readline() == b"listening\n"
        yield url.set(port=port).render_as_string(hide_password=False), relay
    finally:
        os.kill(relay.pid, signal.SIGCONT)
        relay.kill()
        relay.wait()


def finished(cluster: Cluster, execution_id: str) -> ExecutionStatus:
    """The status the execution finished with, waited for up to 60 s; the test's own pool
    meets the database's restart too, so a failed read is tried again."""

    def status() -> ExecutionStatus | None:
        try:
            with cluster.store.read() as conn:
                read = ExecutionStatus(
                    conn.execute(
                        sa.select(executions.c.status).where(executions.c.id == execution_id)
                    ).scalar_one()
                )
        except sa.exc.OperationalError:
            return None
        return read if read.finished else None

    result: ExecutionStatus = wait_until("the execution to finish", status, timeout=60)
    return result


def run_two_holds_through_an_outage(
    cluster: Cluster, outage: Callable[[], None], recovery: Callable[[], None]
) -> None:
    """Two workers each run a step; the database goes away (``outage``) for twice the lease,
    the steps end meanwhile, then it comes back (``recovery``). Each step completes once,
    under its first attempt, and no worker ends."""
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
    outage()
    # Away for twice the lease (2 s): every lease lapses. The steps end meanwhile, so their
    # outcomes wait for the database with the workers' retries.
    time.sleep(2 * cluster.settings.lease_seconds)
    (cluster.dir / "finish").touch()
    wait_until(
        "both steps to end while the database is away",
        lambda: sum(1 for r in cluster.runs_log() if r[0] == "end") == 2,
    )
    recovery()
    assert finished(cluster, execution_id) is ExecutionStatus.COMPLETED
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


def test_a_database_outage_longer_than_the_lease_costs_no_attempt(
    cluster_factory: Callable[..., Cluster], broker: str, postgres: PrivatePostgres
) -> None:
    cluster = cluster_factory(postgres.url, broker)
    run_two_holds_through_an_outage(cluster, postgres.crash, postgres.start)


@pytest.mark.postgres
@pytest.mark.rabbitmq
def test_a_database_that_hangs_longer_than_the_lease_costs_no_attempt(
    cluster_factory: Callable[..., Cluster],
    relayed_pg_url: tuple[str, subprocess.Popen[bytes]],
) -> None:
    # Nothing fails: every call to the database waits, then goes on. The workers say so
    # while it lasts, and once it answers again.
    url, relay = relayed_pg_url
    cluster = cluster_factory(url, "rabbitmq")
    run_two_holds_through_an_outage(
        cluster,
        lambda: os.kill(relay.pid, signal.SIGSTOP),
        lambda: os.kill(relay.pid, signal.SIGCONT),
    )
    for n in (1, 2):
        assert "the state store has not answered for 2 s" in cluster.log(n), cluster.log(n)
        wait_until(
            f"worker {n} to say the state store answers again",
            lambda n=n: "the state store answered again after" in cluster.log(n),
            explain=lambda n=n: cluster.log(n)[-2000:],
        )


@pytest.mark.postgres
def test_a_claim_the_database_refuses_is_said_once_and_redone_when_it_is_back(
    cluster_factory: Callable[..., Cluster], broker: str, postgres: PrivatePostgres
) -> None:
    # One slot: hold_a runs, hold_b waits in the broker. The database goes away and hold_a
    # ends, freeing its slot for hold_b: the reader takes it and cannot claim hold_b, or the
    # round committing hold_a's outcome takes it (to claim hold_b with that commit) and
    # cannot commit; which one is a race. Either way the log says what failed (claiming or
    # committing, in the state store) once, not once per retry, and when it is over.
    cluster = cluster_factory(postgres.url, broker)
    worker = cluster.worker(concurrency=1)
    cluster.wait_registered(worker)
    execution_id = cluster.submit(cp.two_holds)
    wait_until("one step to run", lambda: len(cluster.running(execution_id)) == 1)
    with cluster.store.read() as conn:
        conn.exec_driver_sql("CHECKPOINT")  # the claim survives the crash (see above)
    postgres.crash()
    (cluster.dir / "finish").touch()
    wait_until("the first step to end", lambda: any(r[0] == "end" for r in cluster.runs_log()))
    back_after = {
        "claiming delivered steps in the state store failed": "the state store answers again after",
        "committing step results failed": "committing step results works again after",
    }
    said: str = wait_until(
        "the worker to say it cannot claim or commit",
        lambda: next((m for m in back_after if m in cluster.log(1)), ""),
        explain=lambda: cluster.log(1)[-2000:],
        timeout=30,
    )
    time.sleep(3.0)  # retries go on meanwhile
    postgres.start()
    wait_until(
        "the worker to say the state store is back",
        lambda: back_after[said] in cluster.log(1),
        explain=lambda: cluster.log(1)[-2000:],
        timeout=60,
    )
    assert finished(cluster, execution_id) is ExecutionStatus.COMPLETED
    assert sorted(r[1] for r in cluster.runs_log() if r[0] == "end") == ["hold_a", "hold_b"]
    log = cluster.log(1)
    assert log.count(said) == 1, log
    assert worker.poll() is None
