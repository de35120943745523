"""Distributed jobs: ``framepipe worker`` processes on the real PostgreSQL (and SQLite for the
basic cases), delivered steps by the real Redis and the real RabbitMQ (the ``broker`` fixture:
every test about delivery runs on both), killed, paused, stopped and cut off from their broker
or database mid-run."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import worker_pipelines as wp
from brokers import (
    AMQP_URL,
    BROKERS,
    PrivateRabbitMQ,
    broker_namespace,
    free_port,
    queue_of,
)
from conftest import REDIS_URL, service_missing
from framepipe.backends.state import StateStore, events, steps, workers
from framepipe.config import Settings
from framepipe.errors import BrokerError, ExecutionFailedError
from framepipe.jobs.control import request_cancel
from framepipe.jobs.delivery import open_delivery
from framepipe.jobs.engine import JobEngine
from framepipe.jobs.keys import step_key
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import get_execution, list_events
from framepipe.jobs.rounds import Delivery
from framepipe.jobs.runner import run_pipeline
from redis_servers import PrivateRedis, running
from waiting import wait_until

# real `framepipe worker` processes and private broker/database servers
pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent


class Cluster:
    """Worker processes sharing one database and one broker namespace with the test."""

    def __init__(
        self, tmp_path: Path, database_url: str, broker_url: str, namespace: str, **overrides: Any
    ) -> None:
        values: dict[str, Any] = {
            "home": tmp_path / "home",
            "database_url": database_url,
            "broker_url": broker_url,
            "broker_namespace": namespace,
            "lease_seconds": 2.0,
            "sweep_interval": 0.2,
            "republish_after": 3.0,
            "retry_initial_delay": 0.05,
            "retry_max_delay": 0.2,
            "shutdown_grace": 2.0,
            "max_step_crashes": 3,
            "log_level": "INFO",
            **overrides,
        }
        self.settings = Settings(**values)
        self.dir = tmp_path / "work"
        self.dir.mkdir()
        self.env = {
            **os.environ,
            "PYTHONPATH": str(TESTS),
            "PYTHONUNBUFFERED": "1",
            **{f"FRAMEPIPE_{k.upper()}": str(v) for k, v in values.items()},
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.database_url = database_url
        self.store = StateStore(database_url)
        self._n = 0

    def worker(self, concurrency: int = 2, **env: str) -> subprocess.Popen[bytes]:
        self._n += 1
        log = open(self.dir.parent / f"worker{self._n}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "framepipe", "worker", "-c", str(concurrency)],
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def wait_registered(self, *procs: subprocess.Popen[bytes]) -> None:
        pids = {p.pid for p in procs}

        def registered() -> bool:
            with self.store.read() as conn:
                found = set(
                    conn.execute(
                        sa.select(workers.c.pid).where(workers.c.status == "running")
                    ).scalars()
                )
            return pids <= found

        wait_until("the workers to register", registered)

    def pause(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGSTOP ``proc`` outside a write transaction: SQLite has one write lock for every
        process, and a worker stopped holding it would stall the others' writes (a new
        worker's registration too) until it is continued."""
        url = sa.engine.make_url(self.database_url)
        path = url.database if url.get_backend_name() == "sqlite" else None
        for _ in range(100):
            os.kill(proc.pid, signal.SIGSTOP)
            if path is None:
                return
            probe = sqlite3.connect(path, timeout=0.5)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.rollback()
                return
            except sqlite3.OperationalError:  # stopped holding the lock: let it commit
                os.kill(proc.pid, signal.SIGCONT)
                time.sleep(0.05)
            finally:
                probe.close()
        raise AssertionError(f"worker {proc.pid} kept the SQLite write lock at 100 tries")

    def log(self, n: int) -> str:
        return (self.dir.parent / f"worker{n}.log").read_text(errors="replace")

    def submit(self, pipeline: Pipeline, **inputs: Any) -> str:
        async def main() -> str:
            async with JobEngine(settings=self.settings) as engine:
                return await engine.submit(pipeline, {"dir": str(self.dir), **inputs})

        return asyncio.run(main())

    def submit_running(self, pipeline: Pipeline, **inputs: Any) -> str:
        """Submit and wait until one of its steps runs on a worker."""
        execution_id = self.submit(pipeline, **inputs)
        wait_until("a step to start", lambda: self.running(execution_id))
        return execution_id

    def wait(self, execution_id: str, timeout: float = 60.0) -> ExecutionInfo:
        return wait_until(
            f"execution {execution_id[:8]} to finish",
            lambda: (
                info if (info := get_execution(self.store, execution_id)).status.finished else None
            ),
            timeout,
        )

    def running(self, execution_id: str) -> list[Any]:
        with self.store.read() as conn:
            return list(
                conn.execute(
                    sa.select(steps.c.key, steps.c.worker, steps.c.attempt).where(
                        steps.c.execution_id == execution_id,
                        steps.c.status == StepStatus.RUNNING.value,
                    )
                )
            )

    def completions(self, execution_id: str) -> collections.Counter[str]:
        with self.store.read() as conn:
            keys = conn.execute(
                sa.select(events.c.step_key).where(
                    events.c.execution_id == execution_id, events.c.type == "step.completed"
                )
            ).scalars()
            return collections.Counter(keys)

    def runs_log(self) -> list[list[str]]:
        path = self.dir / "runs.log"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.store.close()


@pytest.fixture(params=[pytest.param(b, marks=getattr(pytest.mark, b)) for b in BROKERS])
def broker(request: pytest.FixtureRequest) -> str:
    """The broker delivering the steps: 'redis' (Streams) or 'rabbitmq' (AMQP)."""
    return str(request.param)


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``make(database_url, broker='redis', broker_url=None, **settings)``: a cluster on a
    namespace of its own on that broker (``broker_url`` overrides its URL, for a private
    server or an unreachable one); what it made on the broker is deleted afterwards."""
    made: list[Cluster] = []
    with contextlib.ExitStack() as stack:
        namespaces: dict[str, tuple[str, str]] = {}

        def make(
            database_url: str,
            broker: str = "redis",
            broker_url: str | None = None,
            **overrides: Any,
        ) -> Cluster:
            if broker not in namespaces:
                namespaces[broker] = stack.enter_context(broker_namespace(broker, "fp-workers-"))
            url, namespace = namespaces[broker]
            cluster = Cluster(tmp_path, database_url, broker_url or url, namespace, **overrides)
            made.append(cluster)
            return cluster

        try:
            yield make
        finally:
            for cluster in made:
                cluster.close()


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[1])


# -- the basics, on SQLite and PostgreSQL ----------------------------------------------------


def test_user_code_runs_unchanged_on_two_workers(
    cluster_factory: Callable[..., Cluster], database_url: str, broker: str
) -> None:
    cluster = cluster_factory(database_url, broker)
    a, b = cluster.worker(), cluster.worker()
    cluster.wait_registered(a, b)
    info = run_pipeline(
        wp.fanout, {"dir": str(cluster.dir), "n": 40, "sleep": 0.05}, settings=cluster.settings
    )
    assert info.status is ExecutionStatus.COMPLETED
    assert info.data["joined"] == 40
    assert info.progress == 100.0
    assert {info.data[f"w{i}"] for i in range(40)} == {a.pid, b.pid}
    assert all(s.status is StepStatus.COMPLETED and s.attempt == 1 for s in info.steps)
    assert set(cluster.completions(info.id).values()) == {1}
    assert len(info.steps) == 42


def test_retries_failure_and_resume_on_workers(
    cluster_factory: Callable[..., Cluster], database_url: str, broker: str
) -> None:
    cluster = cluster_factory(database_url, broker)
    cluster.wait_registered(cluster.worker())
    execution_id = cluster.submit(wp.chain)
    info = cluster.wait(execution_id)
    assert info.status is ExecutionStatus.FAILED
    assert "step 'gated' failed after 1 attempt: FileNotFoundError: gate file" in (info.error or "")
    by_key = {s.key: s for s in info.steps}
    assert by_key["flaky"].status is StepStatus.COMPLETED
    assert by_key["flaky"].output == {"c": 3, "flaky_attempt": 3}
    assert by_key["gated"].status is StepStatus.FAILED
    (cluster.dir / "gate").touch()

    async def retry() -> ExecutionInfo:
        async with JobEngine(settings=cluster.settings) as engine:
            await engine.retry(execution_id[:8], wp.chain)
            return await engine.wait(execution_id)

    info = asyncio.run(retry())
    assert info.status is ExecutionStatus.COMPLETED
    assert info.data == {"a": 1, "b": 2, "c": 3, "flaky_attempt": 3, "d": 4}
    ran = collections.Counter(line[1] for line in cluster.runs_log())
    assert ran == {"flaky": 3, "gated": 2}  # completed steps were not run again
    with cluster.store.read() as conn:
        progress = (
            conn.execute(
                sa.select(events.c.data).where(
                    events.c.execution_id == execution_id,
                    events.c.type == "step.progress",
                    events.c.step_key == "first",
                )
            )
            .scalars()
            .first()
        )
    assert progress is not None
    assert progress["message"] == "halfway"


def test_cancel_stops_a_running_step(
    cluster_factory: Callable[..., Cluster], database_url: str
) -> None:
    cluster = cluster_factory(database_url)
    proc = cluster.worker()
    cluster.wait_registered(proc)
    execution_id = cluster.submit_running(wp.slow, seconds=60)
    request_cancel(cluster.store, execution_id)
    # The step's end and the execution's are two commits: wait for the execution's.
    info = wait_until(
        "the execution to end cancelled",
        lambda: (
            i
            if (i := get_execution(cluster.store, execution_id)).status is ExecutionStatus.CANCELLED
            else None
        ),
        timeout=15,
    )
    assert info.steps[0].status is StepStatus.CANCELLED
    assert proc.poll() is None  # the worker lives on


def test_a_worker_started_later_takes_the_queued_work(
    cluster_factory: Callable[..., Cluster], database_url: str, broker: str
) -> None:
    cluster = cluster_factory(database_url, broker)
    execution_id = cluster.submit(wp.fanout, n=5)
    # The submitting engine has closed: with no worker, the first step stays queued, unrun.
    info = get_execution(cluster.store, execution_id)
    assert info.status is ExecutionStatus.RUNNING
    statuses = {s.key: s.status for s in info.steps}
    assert statuses["start"] is StepStatus.READY
    assert not {StepStatus.RUNNING, StepStatus.COMPLETED} & set(statuses.values())
    cluster.worker()
    assert cluster.wait(execution_id).status is ExecutionStatus.COMPLETED


def test_long_steps_are_not_hoarded_by_one_worker(
    cluster_factory: Callable[..., Cluster], database_url: str, broker: str
) -> None:
    # Quick steps let the first worker claim ahead (prefetch); once the long ones show how
    # long they take, it hands back the claimed ones it has not started. On RabbitMQ the full
    # worker also pauses its consumer, so the handed-back steps are not pushed to it again.
    # The long steps take 1 s each: a second worker that needs longer than that to start
    # (a loaded machine) would find them all run. So the first one is paused while it holds
    # them ahead, until the second one is up; a long lease keeps the pause from costing the
    # first worker its claims.
    cluster = cluster_factory(database_url, broker, worker_prefetch=4, lease_seconds=120.0)
    first = cluster.worker(concurrency=1)
    cluster.wait_registered(first)
    execution_id = cluster.submit(wp.mixed)
    long_parts = {step_key("slow_part", {"i": i}) for i in range(4)}
    wait_until(
        "the first worker to claim all four long steps (one runs, three wait)",
        lambda: {r.key for r in cluster.running(execution_id)} >= long_parts,
    )
    cluster.pause(first)
    try:
        second = cluster.worker(concurrency=1)
        cluster.wait_registered(second)
        wait_until("the second worker to read", lambda: "started:" in cluster.log(2), 60)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    info = cluster.wait(execution_id, timeout=60)
    assert info.status is ExecutionStatus.COMPLETED
    # all four were the first worker's: those the second one ran were handed back
    ran_by = {info.data[f"part{i}"] for i in range(4)}
    assert ran_by == {first.pid, second.pid}
    assert "handing back" in cluster.log(1)


# -- failures of workers, on PostgreSQL ---------------------------------------------------------


@pytest.mark.postgres
def test_kill_9_in_a_loop_loses_and_doubles_nothing(
    cluster_factory: Callable[..., Cluster], pg_url: str, broker: str
) -> None:
    cluster = cluster_factory(pg_url, broker, max_step_crashes=100)
    live = [cluster.worker(), cluster.worker(), cluster.worker()]
    cluster.wait_registered(*live)
    n = 120
    execution_id = cluster.submit(wp.fanout, n=n, sleep=0.3)
    kills = 0
    for _cycle in range(20):
        held = wait_until(
            "a worker to hold a step",
            lambda: [
                r
                for r in cluster.running(execution_id)
                if r.worker and pid_of(r.worker) in {p.pid for p in live}
            ],
            timeout=30,
        )
        victim = next(p for p in live if p.pid == pid_of(held[0].worker))
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        kills += 1
        live.remove(victim)
        live.append(cluster.worker())
        time.sleep(0.2)
    info = cluster.wait(execution_id, timeout=120)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["joined"] == n
    completions = cluster.completions(execution_id)
    assert len(completions) == n + 2
    assert set(completions.values()) == {1}  # no step completed twice
    crashed = [s for s in info.steps if s.crashes]
    assert kills == 20
    assert sum(s.crashes for s in crashed) >= 20  # every kill hit a running step
    assert all(s.status is StepStatus.COMPLETED for s in info.steps)


@pytest.mark.postgres
def test_a_paused_worker_loses_its_lease_and_its_late_result(
    cluster_factory: Callable[..., Cluster], pg_url: str, broker: str
) -> None:
    cluster = cluster_factory(pg_url, broker, lease_seconds=1.5)
    first = cluster.worker()
    cluster.wait_registered(first)
    execution_id = cluster.submit_running(wp.slow, seconds=2.5)
    os.kill(first.pid, signal.SIGSTOP)
    second = cluster.worker()
    try:
        taken = wait_until(
            "another worker to take the step over",
            lambda: [r for r in cluster.running(execution_id) if r.attempt == 2],
            timeout=20,
        )
        assert pid_of(taken[0].worker) == second.pid
    finally:
        os.kill(first.pid, signal.SIGCONT)
    info = cluster.wait(execution_id)
    assert info.status is ExecutionStatus.COMPLETED
    assert info.data == {"long_done_by": second.pid, "long_attempt": 2}
    assert cluster.completions(execution_id) == {"long": 1}
    step = info.steps[0]
    # A paused worker is alive: its attempt was lost to a lapsed lease, not a crash, and
    # counts toward max_step_crashes all the same (1 of 3: the step ran again and completed).
    assert step.crashes == 1
    lapsed = [
        e
        for e in list_events(cluster.store, execution_id)
        if e.type == "step.lease_expired" and e.step_key == "long"
    ]
    assert [e.data["attempt"] for e in lapsed] == [1]
    assert "is alive but did not renew it within 1.5 s" in lapsed[0].data["error"]
    # The woken worker drops its late attempt: its heartbeat finds the lease lost and stops
    # the step, or the step ends first and the commit fences its outcome; either is logged.
    fenced = wait_until(
        "the woken worker to drop attempt 1",
        lambda: re.search(
            rf"lost the lease of step long of {execution_id[:8]} \(attempt 1\)"
            rf"|step long of {execution_id[:8]} attempt 1 no longer held",
            cluster.log(1),
        ),
    )
    assert fenced
    assert cluster.completions(execution_id) == {"long": 1}
    assert get_execution(cluster.store, execution_id).data["long_attempt"] == 2


_BLOCKED = re.compile(
    r"Worker (\S+): its event loop has not run for [\d.]+ s, a third of the 1\.5 s lease: "
    r"async step hog of (\w{8}) \(attempt (\d+)\) holds it, blocked at "
    r"worker_pipelines\.py:\d+ in hog; .*\(await asyncio\.to_thread"
)


@pytest.mark.postgres
def test_a_worker_warns_while_a_step_blocks_its_event_loop(
    cluster_factory: Callable[..., Cluster], pg_url: str
) -> None:
    """An async step that blocks the worker's event loop for a third of the lease is named
    in a warning while it blocks, with the line it blocks at: once per stall, not once per
    check. Short of the lease, nothing is lost: the step completes on its first attempt."""
    cluster = cluster_factory(pg_url, lease_seconds=1.5)
    proc = cluster.worker()
    cluster.wait_registered(proc)
    execution_id = cluster.submit(wp.blocker, block=1.1)
    info = cluster.wait(execution_id)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["hog_attempt"] == 1
    assert info.steps[0].crashes == 0
    log = wait_until(
        "the stall to end in the log",
        lambda: t if "its event loop runs again after" in (t := cluster.log(1)) else None,
    )
    warnings = _BLOCKED.findall(log)
    assert warnings == [(warnings[0][0], execution_id[:8], "1")], log
    assert log.count("its event loop has not run for") == 1, log


@pytest.mark.postgres
def test_an_async_step_that_keeps_blocking_the_loop_past_its_lease_fails(
    cluster_factory: Callable[..., Cluster], pg_url: str
) -> None:
    """An async step blocking its worker's event loop longer than the lease loses its lease
    every attempt: another worker takes it over and the first one's late result is discarded.
    Each lost attempt counts toward max_step_crashes, so the step ends failed, with an error
    that says what happened and what to do, instead of being taken over forever; the workers
    warned about the blocked loop before they lost the lease."""
    cluster = cluster_factory(pg_url, lease_seconds=1.5, max_step_crashes=3)
    a, b = cluster.worker(), cluster.worker()
    cluster.wait_registered(a, b)
    execution_id = cluster.submit(wp.blocker, block=5.0)
    info = cluster.wait(execution_id, timeout=90)
    assert info.status is ExecutionStatus.FAILED
    hog = info.step("hog")
    assert hog.status is StepStatus.FAILED
    assert hog.crashes == 3
    error = hog.error or ""
    assert error.startswith(
        f"StepCrashedError: pipeline 'wk_blocker', step 'hog': attempt {hog.attempt} lost its "
        "lease: the lease of worker "
    ), error
    assert "is alive but did not renew it within 1.5 s (FRAMEPIPE_LEASE_SECONDS)" in error
    assert "3 of at most 3 attempts lost" in error
    assert "run blocking work in a thread (await asyncio.to_thread(...))" in error
    assert "lost its worker 3 times" in (info.error or "")
    assert cluster.completions(execution_id) == {}  # no late result was written
    # Every worker that lost the lease of an attempt warned about its blocked loop first.
    for n in (1, 2):
        log = cluster.log(n)
        lost = re.search(r"lost the lease of step hog|step hog of \w+ attempt \d+ no longer", log)
        if lost:
            warned = _BLOCKED.search(log)
            assert warned and warned.start() < lost.start(), log


@pytest.mark.postgres
def test_a_step_that_kills_its_worker_is_failed_as_poison_with_the_output_tail(
    cluster_factory: Callable[..., Cluster], pg_url: str, broker: str
) -> None:
    cluster = cluster_factory(pg_url, broker, max_step_crashes=2)
    proc = cluster.worker()
    cluster.wait_registered(proc)
    execution_id = cluster.submit(wp.crasher)
    deaths = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        info = get_execution(cluster.store, execution_id)
        if info.status.finished:
            break
        if proc.poll() is not None:
            assert proc.returncode == 3
            deaths += 1
            proc = cluster.worker()  # what a process supervisor would do
        time.sleep(0.1)
    assert info.status is ExecutionStatus.FAILED
    assert deaths == 2
    by_key = {s.key: s for s in info.steps}
    assert by_key["fine"].status is StepStatus.COMPLETED
    crash = by_key["crash"]
    assert crash.status is StepStatus.FAILED
    assert crash.crashes == 2
    assert (crash.error or "").startswith(
        "StepCrashedError: pipeline 'wk_crasher', step 'crash': worker "
    )
    assert "about to take the worker down (attempt 2)" in (crash.error or "")
    assert "crashed its worker 2 times; failed as poison" in (info.error or "")


@pytest.mark.postgres
def test_sigterm_finishes_or_hands_back_the_running_step(
    cluster_factory: Callable[..., Cluster], pg_url: str, broker: str
) -> None:
    cluster = cluster_factory(pg_url, broker, shutdown_grace=5.0)
    proc = cluster.worker()
    cluster.wait_registered(proc)
    execution_id = cluster.submit_running(wp.slow, seconds=1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    info = get_execution(cluster.store, execution_id)
    assert info.status is ExecutionStatus.COMPLETED  # finished within the grace period
    assert info.data["long_done_by"] == proc.pid

    cluster.settings = cluster.settings.model_copy(update={"shutdown_grace": 0.5})
    short = cluster.worker(FRAMEPIPE_SHUTDOWN_GRACE="0.5")
    cluster.wait_registered(short)
    execution_id = cluster.submit_running(wp.slow, seconds=3.0)
    short.send_signal(signal.SIGTERM)
    assert short.wait(timeout=20) == 0
    step = get_execution(cluster.store, execution_id).steps[0]
    assert step.status is StepStatus.READY  # handed back, not failed
    assert (step.failures, step.crashes) == (0, 0)
    other = cluster.worker()
    info = cluster.wait(execution_id)
    assert info.status is ExecutionStatus.COMPLETED
    assert info.data == {"long_done_by": other.pid, "long_attempt": 2}
    assert "handing it back" in cluster.log(2)


# -- the broker failing ----------------------------------------------------------------------


@pytest.mark.postgres
def test_redis_restarting_mid_run_loses_nothing(
    cluster_factory: Callable[..., Cluster], pg_url: str, private_redis: PrivateRedis
) -> None:
    cluster = cluster_factory(pg_url, broker_url=private_redis.url)
    a, b = cluster.worker(), cluster.worker()
    cluster.wait_registered(a, b)
    n = 80
    execution_id = cluster.submit(wp.fanout, n=n, sleep=0.1)
    wait_until("some steps to complete", lambda: len(cluster.completions(execution_id)) > 10)
    private_redis.kill()  # no persistence: the stream and the group are gone
    time.sleep(1.0)
    private_redis.start()
    info = cluster.wait(execution_id, timeout=90)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["joined"] == n
    assert set(cluster.completions(execution_id).values()) == {1}
    assert a.poll() is None
    assert b.poll() is None
    assert "retrying" in cluster.log(1) + cluster.log(2)


def _error_lines(text: str, words: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line and words in line]


def test_a_worker_given_a_wrong_redis_password_stops_at_once_saying_so(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    """A setting to fix, not a broker to wait for: the worker exits (code 2, a configuration
    error) naming the broker, its URL with the password masked and what is wrong; it kept
    retrying it as a broker that fails, for ever."""
    with running(PrivateRedis(tmp_path, password="right-secret")) as server:
        wrong = server.url.replace("right-secret", "wrong-secret")
        cluster = cluster_factory(f"sqlite:///{tmp_path / 'state.db'}", broker_url=wrong)
        proc = cluster.worker()
        assert proc.wait(timeout=60) == 2
    text = cluster.log(1)
    assert (
        f"job broker: Redis at redis://:***@127.0.0.1:{server.port}/0 refuses the credentials"
        in text
    ), text
    assert "wrong-secret" not in text
    assert "retrying" not in text


def test_a_redis_password_changed_under_a_worker_is_said_once_and_waited_out(
    cluster_factory: Callable[..., Cluster], tmp_path: Path
) -> None:
    """The password changed on the server under a running worker: one error line says the
    credentials are refused (the worker keeps retrying); set back, one line says they are
    accepted again and the worker runs steps."""
    with running(PrivateRedis(tmp_path, password="right-secret")) as server:
        right = server.url
        cluster = cluster_factory(f"sqlite:///{tmp_path / 'state.db'}", broker_url=right)
        proc = cluster.worker()
        cluster.wait_registered(proc)
        server.change_password("other-secret")
        wait_until(
            "the refused credentials to be said",
            lambda: _error_lines(cluster.log(1), "refuses the credentials"),
            timeout=30,
        )
        time.sleep(3)  # retried meanwhile, not said again
        assert proc.poll() is None
        server.change_password("right-secret")
        wait_until(
            "the credentials accepted again",
            lambda: "Redis accepts the credentials again" in cluster.log(1),
            timeout=30,
        )
        info = cluster.wait(cluster.submit(wp.fanout, n=3, sleep=0.0))
        assert info.status is ExecutionStatus.COMPLETED, info.error
        assert proc.poll() is None
    text = cluster.log(1)
    [said] = _error_lines(text, "refuses the credentials")
    assert f"job broker redis://:***@127.0.0.1:{server.port}/0: Redis at " in said
    assert "unreachable" not in said
    assert "right-secret" not in text and "other-secret" not in text


@pytest.mark.postgres
@pytest.mark.rabbitmq
@pytest.mark.parametrize("data", ["kept", "lost"])
def test_rabbitmq_restarting_mid_run_loses_nothing(
    cluster_factory: Callable[..., Cluster], pg_url: str, data: str
) -> None:
    # A private node, SIGKILLed mid-run and booted again: on its data (the quorum queue and
    # its messages come back) or on an empty folder (the queue is gone: workers declare it
    # again and the sweep publishes the ready steps again).
    rabbit = PrivateRabbitMQ()
    try:
        rabbit.start()
        cluster = cluster_factory(pg_url, "rabbitmq", broker_url=rabbit.url)
        if data == "kept":
            # A queue of some age: RabbitMQ writes the registry of its quorum queues to disk
            # every few minutes or on a clean stop; one SIGKILLed sooner comes back unusable.
            delivery = open_delivery(rabbit.url, cluster.settings.broker_namespace)
            delivery.prepare()
            delivery.close()
            rabbit.shutdown()
            rabbit.start()
        a, b = cluster.worker(), cluster.worker()
        cluster.wait_registered(a, b)
        n = 80
        execution_id = cluster.submit(wp.fanout, n=n, sleep=0.1)
        wait_until("some steps to complete", lambda: len(cluster.completions(execution_id)) > 10)
        rabbit.crash()
        if data == "lost":
            shutil.rmtree(rabbit.root / "mnesia")
        time.sleep(1.0)
        rabbit.start()
        info = cluster.wait(execution_id, timeout=90)
        assert info.status is ExecutionStatus.COMPLETED, info.error
        assert info.data["joined"] == n
        assert set(cluster.completions(execution_id).values()) == {1}
        assert a.poll() is None
        assert b.poll() is None
        assert "retrying" in cluster.log(1) + cluster.log(2)
    finally:
        rabbit.stop()


def _pg_tool(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        service_missing(
            f"PostgreSQL's {name} (apt-get install postgresql)", FileNotFoundError(name)
        )
    return str(found[-1])


class PrivatePostgres:
    """A PostgreSQL server of the test's own on a free port (as user ``postgres`` when the
    tests run as root, which PostgreSQL refuses)."""

    def __init__(self) -> None:
        self.port = free_port()
        # Outside pytest's temp folder, which only root may enter.
        self.root = Path(tempfile.mkdtemp(prefix="fp-pg-"))
        self.data = self.root / "pgdata"
        self.run_as: list[str] = []
        self.data.mkdir()
        if os.geteuid() == 0:
            self.run_as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(self.data, "postgres", "postgres")
        subprocess.run(
            [
                *self.run_as,
                _pg_tool("initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(
            [
                *self.run_as,
                _pg_tool("pg_ctl"),
                "-D",
                str(self.data),
                "-w",
                "-l",
                str(self.data / "server.log"),
                "-o",
                f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1",
                "start",
            ],
            check=True,
            capture_output=True,
        )

    def crash(self) -> None:
        """Stop at once, as a crash would (no checkpoint; recovery replays the WAL)."""
        subprocess.run(
            [*self.run_as, _pg_tool("pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        subprocess.run(
            [*self.run_as, _pg_tool("pg_ctl"), "-D", str(self.data), "-m", "fast", "stop"],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.root, ignore_errors=True)


def test_postgres_restarting_mid_run_loses_nothing(
    cluster_factory: Callable[..., Cluster], broker: str
) -> None:
    # Claims fail while it is down: what was delivered goes back to the broker at once.
    pg = PrivatePostgres()
    pg.start()
    try:
        cluster = cluster_factory(pg.url, broker)
        a, b = cluster.worker(), cluster.worker()
        cluster.wait_registered(a, b)
        n = 60
        execution_id = cluster.submit(wp.fanout, n=n, sleep=0.1)
        wait_until("some steps to complete", lambda: len(cluster.completions(execution_id)) > 10)
        pg.crash()
        time.sleep(2.0)
        pg.start()

        def finished() -> ExecutionInfo | None:
            try:
                info = get_execution(cluster.store, execution_id)
            except sa.exc.OperationalError:  # the test's own pool meets the restart too
                return None
            return info if info.status.finished else None

        info = wait_until("the execution to finish after the restart", finished, timeout=90)
        assert info.status is ExecutionStatus.COMPLETED, info.error
        assert info.data["joined"] == n
        assert set(cluster.completions(execution_id).values()) == {1}
        assert a.poll() is None
        assert b.poll() is None
        assert "retrying" in cluster.log(1) + cluster.log(2)
    finally:
        pg.stop()


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["memory://", "http://127.0.0.1:5672/", "amqp+ssl://u:secret@h/"])
def test_a_worker_needs_a_redis_or_rabbitmq_broker(tmp_path: Path, url: str) -> None:
    from framepipe.jobs.worker import Worker

    settings = Settings(home=tmp_path, broker_url=url, jobs_mode="workers")
    with pytest.raises(
        BrokerError, match="a worker needs a Redis or RabbitMQ broker: FRAMEPIPE_BROKER_URL is"
    ) as caught:
        Worker(settings)
    assert "redis://, rediss://, unix://, amqp:// or amqps://" in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "workers"),
    [
        ("memory://", False),
        ("redis://127.0.0.1:6379/0", True),
        ("rediss://h/0", True),
        ("unix:///run/redis.sock", True),
        ("amqp://guest:guest@127.0.0.1:5672/", True),
        ("amqps://u:p@rabbit.example/vhost", True),
        ("http://127.0.0.1/", False),
    ],
)
def test_auto_mode_runs_steps_on_workers_for_redis_and_amqp_urls(url: str, workers: bool) -> None:
    assert Settings(broker_url=url).distributed_jobs is workers
    assert Settings(broker_url=url, jobs_mode="local").distributed_jobs is False


def test_a_worker_waits_for_an_unreachable_broker_and_stops_on_sigterm(
    cluster_factory: Callable[..., Cluster], database_url: str, broker: str
) -> None:
    port = free_port()  # nothing listens there
    url = (
        f"redis://127.0.0.1:{port}/0"
        if broker == "redis"
        else f"amqp://guest:guest@127.0.0.1:{port}/"
    )
    cluster = cluster_factory(database_url, broker, broker_url=url)
    proc = cluster.worker()
    wait_until("the worker to report the broker", lambda: "retrying" in cluster.log(1), timeout=20)
    text = cluster.log(1)
    shown = (
        f"redis://127.0.0.1:{port}/0"
        if broker == "redis"
        else f"amqp://guest:***@127.0.0.1:{port}/"
    )  # the password masked
    assert f"job broker {shown}" in text
    assert "registering the worker failed" in text
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert "stopped before it could register" in cluster.log(1)


def test_a_step_delivered_again_to_the_worker_running_it_runs_once(
    cluster_factory: Callable[..., Cluster], database_url: str, broker: str
) -> None:
    # What a claim lost in a database crash leaves: the step ready again under the attempt its
    # worker runs, and delivered again; the same worker claims it again and must not start
    # a second run of it.
    cluster = cluster_factory(database_url, broker)
    proc = cluster.worker(concurrency=2)
    cluster.wait_registered(proc)
    execution_id = cluster.submit(wp.fanout, n=1, sleep=2.0)
    runs = cluster.dir / "runs.log"
    wait_until("the work step to start", lambda: runs.exists() and "start" in runs.read_text())
    # Its spawner may still be running: the spawn and the spawner's outcome can be committed
    # in two rounds, and the work step started between them.
    ((key, _worker, attempt),) = [
        row for row in cluster.running(execution_id) if row[0].startswith("work")
    ]
    with cluster.store.write() as conn:
        conn.execute(
            steps.update()
            .where(steps.c.execution_id == execution_id, steps.c.key == key)
            .values(status=StepStatus.READY.value, attempt=attempt - 1, worker=None)
        )
    delivery = open_delivery(cluster.settings.broker_url, cluster.settings.broker_namespace)
    try:
        delivery.publish([Delivery(execution_id, key)])
    finally:
        delivery.close()
    info = cluster.wait(execution_id)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    started = [line for line in runs.read_text().splitlines() if line.startswith("start")]
    assert started == [f"start {key} {attempt} {proc.pid}"], started
    assert "delivered again while it runs here; not started twice" in cluster.log(1)


@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_a_stop_while_registering_fails_returns_cleanly(tmp_path: Path, scheme: str) -> None:
    # The stop and the failure of the registration attempt it interrupts can be seen at once:
    # the worker still stops as stopped, not with the broker's error (10 tries: the order in
    # which the two are seen varies).
    from framepipe.jobs.worker import Worker

    port = free_port()  # nothing listens there
    url = f"redis://127.0.0.1:{port}/0" if scheme == "redis" else f"amqp://127.0.0.1:{port}/"
    for i in range(10):
        settings = Settings(home=tmp_path / str(i), broker_url=url, jobs_mode="workers")
        worker = Worker(settings)
        worker.request_stop()
        asyncio.run(asyncio.wait_for(worker.run(), 30))  # returns; raises nothing


def test_a_registration_refused_for_good_ends_the_worker_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store that refuses the worker's row (not a lost connection, so not retried) ends the
    # worker with that error: it hung, its stop thread still waiting. The refusal is injected:
    # none can be produced on demand from the store here.
    from framepipe.jobs.worker import Worker

    def refused(self: Worker) -> None:
        raise ValueError("the workers table refused the row")

    monkeypatch.setattr(Worker, "_register", refused)
    settings = Settings(home=tmp_path, broker_url=REDIS_URL, jobs_mode="workers")
    worker = Worker(settings)
    with pytest.raises(ValueError, match="refused the row"):
        asyncio.run(asyncio.wait_for(worker.run(), 20))


def _publish_raw_amqp(queue: str, body: bytes) -> None:
    import aio_pika

    async def main() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)

    asyncio.run(main())


def test_malformed_entries_and_unknown_pipelines_fail_clearly(
    cluster_factory: Callable[..., Cluster], database_url: str, broker: str, tmp_path: Path
) -> None:
    cluster = cluster_factory(database_url, broker)
    proc = cluster.worker()
    cluster.wait_registered(proc)
    queue = queue_of(cluster.settings.broker_namespace)
    if broker == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        client.xadd(queue, {"bogus": "1"})
        wait_until("the malformed entry to be reported", lambda: "is malformed" in cluster.log(1))
        wait_until(
            "the malformed entry to be acknowledged (it cannot be handled)",
            lambda: client.xpending(queue, "workers")["pending"] == 0,
            timeout=10,
        )
        client.close()
    else:
        _publish_raw_amqp(queue, b"bogus")
        wait_until("the malformed message to be reported", lambda: "is malformed" in cluster.log(1))

    module = tmp_path / "elsewhere.py"
    module.write_text(
        "from framepipe import Pipeline\n"
        "lost = Pipeline('wk_lost')\n"
        "@lost.step()\n"
        "def only(ctx):\n"
        "    return {}\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import elsewhere  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tmp_path))
    execution_id = cluster.submit(elsewhere.lost)
    info = cluster.wait(execution_id)
    assert info.status is ExecutionStatus.FAILED
    assert "cannot run step 'only'" in (info.error or "")
    assert "pipeline 'wk_lost' (elsewhere:wk_lost) is not known here" in (info.error or "")
    # The worker took the later messages of the same queue: the malformed one, rejected
    # without requeue (or acknowledged, on Redis), was not delivered again before them.
    assert cluster.log(1).count("is malformed") == 1


def test_run_pipeline_raises_for_a_failed_distributed_execution(
    cluster_factory: Callable[..., Cluster], database_url: str
) -> None:
    cluster = cluster_factory(database_url)
    cluster.wait_registered(cluster.worker())
    with pytest.raises(ExecutionFailedError, match="gate file"):
        run_pipeline(wp.chain, {"dir": str(cluster.dir)}, settings=cluster.settings)


def test_a_report_queued_with_its_steps_outcome_is_committed_with_it(
    cluster_factory: Callable[..., Cluster], database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker commits what its steps report in rounds; when a step's last progress report
    and its outcome wait for the same round (the step reported and ended while the round
    before was being committed), the report is committed before the outcome, not dropped.
    Here the reports are held until the outcome is queued, so the two always meet."""
    from framepipe.jobs.worker import Worker

    cluster = cluster_factory(database_url)
    worker = Worker(cluster.settings, pipelines=(wp.last_word,), concurrency=1)
    real_flush = worker._flush

    async def flush() -> None:
        """Holds a round of reports alone until the step's outcome joins it."""
        deadline = time.monotonic() + 30
        while True:
            with worker._lock:
                pending = worker._pending
                waiting = bool(pending.progress) and not pending.outcomes
            if not waiting or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)
        await real_flush()

    monkeypatch.setattr(worker, "_flush", flush)

    async def main() -> ExecutionInfo:
        running = asyncio.create_task(worker.run())
        try:
            async with JobEngine(settings=cluster.settings) as engine:
                execution_id = await engine.submit(wp.last_word, {})
                return await asyncio.wait_for(engine.wait(execution_id, raise_on_failure=False), 60)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)

    info = asyncio.run(main())
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.step("chatty").message == "copied 12 files, 3 skipped"
    with StateStore(database_url) as store:
        stored = [e for e in list_events(store, info.id) if e.step_key == "chatty"]
    types = [e.type for e in stored]
    reports = [e.data["message"] for e in stored if e.type == "step.progress"]
    assert reports[-1] == "copied 12 files, 3 skipped", reports
    assert types[-1] == "step.completed", types


def _run_in_worker(
    cluster: Cluster, worker: Any, pipeline: Pipeline, inputs: list[dict[str, Any]]
) -> list[ExecutionInfo]:
    """Run an in-process ``worker`` while ``inputs`` are submitted one execution each and
    waited for; stop it once they ended."""

    async def main() -> list[ExecutionInfo]:
        running = asyncio.create_task(worker.run())
        try:
            async with JobEngine(settings=cluster.settings) as engine:
                ids = [await engine.submit(pipeline, given) for given in inputs]
                return [
                    await asyncio.wait_for(engine.wait(i, raise_on_failure=False), 120) for i in ids
                ]
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)

    return asyncio.run(main())


def test_a_worker_keeps_no_timer_of_a_retry_it_released(
    cluster_factory: Callable[..., Cluster], pg_url: str
) -> None:
    """Each retried failure sets a timer that releases the retry when it is due; a worker
    keeps it only until it fires (it kept every one it ever set, for as long as it ran)."""
    from framepipe.jobs.worker import Worker

    cluster = cluster_factory(pg_url)
    worker = Worker(cluster.settings, pipelines=(wp.backoff,), concurrency=2)
    infos = _run_in_worker(cluster, worker, wp.backoff, [{"dir": str(cluster.dir)}] * 6)
    assert [i.status for i in infos] == [ExecutionStatus.COMPLETED] * 6
    assert all(i.step("flaky").attempt == 3 for i in infos)  # two retries each
    assert not worker._retry_timers


def test_a_worker_keeps_a_bounded_share_of_the_inputs_it_ran(
    cluster_factory: Callable[..., Cluster], pg_url: str
) -> None:
    """A worker caches each execution's inputs to claim its next steps without reading
    them again; what it keeps stays within KNOWN_INPUTS_BYTES, the least recently claimed
    from going first (it kept the inputs of its last 1,000 executions, up to
    max_inputs_bytes each: a gigabyte and more of a long-running worker's memory)."""
    from framepipe.jobs import dispatch
    from framepipe.jobs.worker import Worker
    from framepipe.untrusted import json_size

    cluster = cluster_factory(pg_url)
    worker = Worker(cluster.settings, pipelines=(wp.last_word,), concurrency=2)
    blob = "x" * 1_000_000
    limit = 16 * 1024 * 1024
    n = limit // len(blob) + 4
    infos = _run_in_worker(
        cluster, worker, wp.last_word, [{"blob": blob, "n": i} for i in range(n)]
    )
    assert [i.status for i in infos] == [ExecutionStatus.COMPLETED] * n
    kept = sum(json_size(entry[2]) for entry in worker._known.values())
    assert 0 < kept <= limit
    assert infos[-1].id in worker._known  # the most recent is kept
    assert limit == dispatch.KNOWN_INPUTS_BYTES
