"""Transient state-store trouble is waited out, never taken for a refusal: the rule
(:func:`~framepipe.jobs.transient.is_transient_store_error`) on the errors real drivers raise,
and the embedded engine running through a connection pool with no connection to give and a
server that terminates its sessions. (A commit refused for its data fails only its execution:
``test_jobs_hostile_text.py``.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from conftest import fast_settings
from framepipe import Pipeline, StepContext
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.jobs.engine import JobEngine
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus
from framepipe.jobs.records import get_execution, list_events
from framepipe.jobs.transient import is_transient_store_error

WITHIN = 60.0
"""Longer than any of these executions takes, store trouble included."""


def raised(fn: Callable[[], object]) -> Exception:
    """The exception ``fn`` raises (the test fails if it raises none)."""
    try:
        fn()
    except Exception as exc:
        return exc
    pytest.fail("no exception was raised")


def closed_port() -> int:
    """A loopback TCP port nothing listens on (a connection to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def pg_admin(pg_url: str) -> Iterator[sa.Engine]:
    """A second, autocommit connection to the PostgreSQL server under test."""
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    yield admin
    admin.dispose()


def terminate(admin: sa.Engine, application_name: str) -> int:
    """Terminate every server session of ``application_name`` (as a restart or an operator
    would); return how many there were."""
    with admin.connect() as conn:
        return len(
            conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (application_name,),
            ).fetchall()
        )


# -- the rule, on what real drivers raise -------------------------------------------------------


def test_lost_and_busy_connections_are_transient(tmp_path: Path) -> None:
    """SQLite: a write lock not granted in time, and a pool with no connection to give."""
    path = tmp_path / "t.db"
    sqlite3.connect(path).execute("CREATE TABLE t (id INTEGER PRIMARY KEY)").connection.close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    engine = sa.create_engine(
        f"sqlite:///{path}",
        connect_args={"timeout": 0.05},
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.05,
    )
    try:

        def write() -> None:
            with engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO t (id) VALUES (1)")

        locked = raised(write)
        assert isinstance(locked, sa.exc.OperationalError), locked
        assert "locked" in str(locked)
        assert is_transient_store_error(locked)

        with engine.connect():
            pool_empty = raised(engine.connect)
        assert isinstance(pool_empty, sa.exc.TimeoutError), pool_empty
        assert is_transient_store_error(pool_empty)
    finally:
        holder.close()
        engine.dispose()


@pytest.mark.postgres
def test_a_refused_or_terminated_connection_is_transient(pg_url: str, pg_admin: sa.Engine) -> None:
    """PostgreSQL: a server that refuses the connection (down, restarting), and a session the
    server terminated (restart, failover, an operator's ``pg_terminate_backend``)."""
    refused = raised(
        lambda: sa.create_engine(f"postgresql+psycopg://127.0.0.1:{closed_port()}/test").connect()
    )
    assert isinstance(refused, sa.exc.OperationalError), refused
    assert is_transient_store_error(refused)

    name = f"fp_transient_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(f"{pg_url}&application_name={name}")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            conn.rollback()
            assert terminate(pg_admin, name) == 1
            terminated = raised(lambda: conn.exec_driver_sql("SELECT 1"))
        assert isinstance(terminated, sa.exc.DBAPIError), terminated
        assert terminated.connection_invalidated
        assert is_transient_store_error(terminated)
    finally:
        engine.dispose()


def test_what_the_store_refuses_for_its_data_is_not_transient(database_url: str) -> None:
    """A duplicate key, text the driver cannot encode, and (PostgreSQL) a NUL in text or an
    index row over the server's limit: the same write fails the same way however often it is
    retried."""
    with StateStore(database_url) as store:
        with store.write() as conn:
            conn.exec_driver_sql("CREATE TABLE fp_t (id INTEGER PRIMARY KEY, s TEXT)")
            conn.exec_driver_sql("INSERT INTO fp_t (id, s) VALUES (1, 'a')")
        table = sa.table("fp_t", sa.column("id"), sa.column("s"))

        def insert(**row: Any) -> Callable[[], None]:
            def go() -> None:
                with store.write() as conn:
                    conn.execute(table.insert().values(**row))

            return go

        refusals = [raised(insert(id=1, s="b")), raised(insert(id=2, s="caf\udce9"))]
        if store.dialect == "postgresql":
            refusals.append(raised(insert(id=3, s="a\x00b")))
            with store.write() as conn:
                conn.exec_driver_sql("CREATE INDEX fp_t_s ON fp_t (s)")
            # an index row over PostgreSQL's btree limit: an OperationalError (SQLSTATE 54000)
            noise = random.Random(4)  # incompressible: PostgreSQL compresses index rows
            text = "".join(chr(noise.randrange(0x4E00, 0x9FFF)) for _ in range(3000))
            too_large = raised(insert(id=4, s=text))
            assert isinstance(too_large, sa.exc.OperationalError), too_large
            assert getattr(too_large.orig, "sqlstate", None) == "54000"
            refusals.append(too_large)
        assert [type(e).__name__ for e in refusals][:2] == ["IntegrityError", "UnicodeEncodeError"]
        assert not any(is_transient_store_error(e) for e in refusals), refusals


# -- the engine, through real store trouble -----------------------------------------------------

waits = Pipeline("tr_waits")


@waits.step()
def work(ctx: StepContext) -> dict[str, Any]:
    time.sleep(0.8)  # long enough for the store trouble to happen while it runs
    ctx.progress(50, "half way")
    time.sleep(0.8)
    return {"worked": ctx.inputs["n"]}


@waits.step(depends_on=["work"])
def after(ctx: StepContext) -> dict[str, Any]:
    return {"after": ctx.data["worked"]}


@pytest.fixture
def engine_log() -> Iterator[list[str]]:
    """The messages the engine logs (a handler on its own logger: whatever the test session
    configured for the ``framepipe`` logger, they are seen)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("framepipe.jobs.engine")
    handler = Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def small_pool_store(database_url: str, size: int, monkeypatch: pytest.MonkeyPatch) -> StateStore:
    """A store whose connection pool holds ``size`` connections and gives up waiting for one
    after 0.1 s (a pool sized too small for a burst)."""
    real_create_engine = sa.create_engine

    def small_pool(*args: Any, **kwargs: Any) -> sa.Engine:
        kwargs.update(pool_size=size, max_overflow=0, pool_timeout=0.1)
        return real_create_engine(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(sa, "create_engine", small_pool)
        return StateStore(database_url)


def assert_completed(store: StateStore, infos: list[ExecutionInfo]) -> None:
    for info in infos:
        assert info.status is ExecutionStatus.COMPLETED, info.error
        assert info.data == {"worked": info.inputs["n"], "after": info.inputs["n"]}
        assert info.runs == 1
        stored = get_execution(store, info.id)
        assert stored.status is ExecutionStatus.COMPLETED
        types = [e.type for e in list_events(store, info.id)]
        assert "execution.failed" not in types
        assert types[-1] == "execution.completed"


def test_the_engine_waits_for_a_connection_pool_with_none_to_give(
    database_url: str,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    engine_log: list[str],
) -> None:
    """Every connection of the engine's pool is held elsewhere for a while (a pool sized too
    small for a burst): its commits and its heartbeat get no connection in time, and wait,
    and every execution completes once connections are free again, none failed."""
    store = small_pool_store(database_url, 2, monkeypatch)

    def hold_every_connection() -> list[sa.Connection]:
        held: list[sa.Connection] = []
        while len(held) < 2:
            with contextlib.suppress(sa.exc.TimeoutError):  # the engine has it: try again
                held.append(store.engine.connect())
        return held

    async def main() -> list[ExecutionInfo]:
        async with JobEngine(store, settings=settings, concurrency=4) as engine:
            ids = [await engine.submit(waits, {"n": n}) for n in range(3)]
            await asyncio.sleep(0.2)  # the steps are running
            held = await asyncio.to_thread(hold_every_connection)
            try:
                await asyncio.sleep(2.0)  # the steps end meanwhile; nothing can be committed
            finally:
                for conn in held:
                    conn.close()
            return [
                await asyncio.wait_for(engine.wait(i, raise_on_failure=False), WITHIN) for i in ids
            ]

    try:
        infos = asyncio.run(main())
        assert_completed(store, infos)
    finally:
        store.close()
    assert any("TimeoutError" in m or "QueuePool limit" in m for m in engine_log), engine_log


@pytest.mark.postgres
def test_the_engine_goes_on_when_the_server_terminates_its_sessions(
    pg_url: str, pg_admin: sa.Engine, tmp_path: Path, engine_log: list[str]
) -> None:
    """PostgreSQL terminates every session of the engine while its steps run (a restart, a
    failover, an operator), twice: the engine reconnects and every execution completes."""
    name = f"fp_transient_{uuid.uuid4().hex[:8]}"
    url = f"{pg_url}&application_name={name}"
    terminated: list[int] = []
    stop = threading.Event()

    def terminator() -> None:
        for _ in range(2):
            if stop.wait(0.5):
                return
            terminated.append(terminate(pg_admin, name))

    async def main() -> list[ExecutionInfo]:
        async with JobEngine(
            settings=fast_settings(tmp_path / "home", url), concurrency=4
        ) as engine:
            ids = [await engine.submit(waits, {"n": n}) for n in range(3)]
            killer = threading.Thread(target=terminator)
            killer.start()
            try:
                waited = asyncio.gather(*(engine.wait(i, raise_on_failure=False) for i in ids))
                return await asyncio.wait_for(waited, WITHIN)
            finally:
                stop.set()
                await asyncio.to_thread(killer.join)

    infos = asyncio.run(main())
    assert len(terminated) == 2 and all(terminated), terminated
    with StateStore(pg_url) as store:
        assert_completed(store, infos)
    assert any("terminating connection" in m for m in engine_log), engine_log


def test_wait_rides_out_a_pool_with_none_to_give(
    database_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine waiting for an execution another engine runs polls the store: every
    connection of its pool is held elsewhere for a while, and ``wait`` waits for one instead
    of raising the pool's TimeoutError; it returns the completed execution."""
    waiter_store = small_pool_store(database_url, 1, monkeypatch)
    runner_store = StateStore(database_url)

    def hold_the_connection() -> sa.Connection:
        while True:
            with contextlib.suppress(sa.exc.TimeoutError):  # the waiter has it: try again
                return waiter_store.engine.connect()

    async def main() -> ExecutionInfo:
        async with (
            JobEngine(runner_store, settings=settings, concurrency=2) as runner,
            JobEngine(waiter_store, settings=settings, concurrency=1) as waiter,
        ):
            execution_id = await runner.submit(waits, {"n": 7})
            waiting = asyncio.ensure_future(
                waiter.wait(execution_id, raise_on_failure=False, poll_interval=0.02)
            )
            await asyncio.sleep(0.3)  # the waiter is polling
            held = await asyncio.to_thread(hold_the_connection)
            try:
                await asyncio.sleep(1.0)  # its polls get no connection meanwhile
                assert not waiting.done(), waiting
            finally:
                held.close()
            return await asyncio.wait_for(waiting, WITHIN)

    try:
        info = asyncio.run(main())
        assert info.status is ExecutionStatus.COMPLETED, info.error
        assert info.data == {"worked": 7, "after": 7}
    finally:
        waiter_store.close()
        runner_store.close()


def test_a_wait_given_up_stops_retrying_and_holds_no_database_thread(
    database_url: str, settings: Settings
) -> None:
    """``wait`` retries its reads while the store is in trouble, but from the event loop: a
    caller that gives up (a timeout, a client that left) ends the retries at once, and the
    engine's other store calls (commits, heartbeats, submits) are never queued behind them.
    The trouble is injected into the waiter's reads only (a read the server keeps timing out,
    SQLSTATE 57014, is one such), so the rest of the engine runs against the real store."""
    store = StateStore(database_url)
    runner_store = StateStore(database_url)
    polls: list[float] = []

    def failing_poll(*_args: Any) -> Any:
        polls.append(time.monotonic())
        raise sa.exc.OperationalError(
            "SELECT status FROM executions", None, Exception("canceling statement due to timeout")
        )

    async def main() -> tuple[float, int, ExecutionInfo]:
        async with (
            JobEngine(runner_store, settings=settings, concurrency=2) as runner,
            JobEngine(store, settings=settings, concurrency=1) as waiter,
        ):
            execution_id = await runner.submit(waits, {"n": 3})
            waiter._poll = failing_poll  # type: ignore[method-assign]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(waiter.wait(execution_id), 1.0)
            given_up = len(polls)
            t0 = time.monotonic()
            await waiter._in_db(lambda: None)  # the database thread is free
            free_after = time.monotonic() - t0
            await asyncio.sleep(1.0)
            retried_after = len(polls) - given_up
            del waiter._poll  # the real reads again
            return free_after, retried_after, await waiter.wait(execution_id)

    try:
        free_after, retried_after, info = asyncio.run(main())
    finally:
        store.close()
        runner_store.close()
    assert polls, "the waiter never polled"
    assert retried_after == 0, f"{retried_after} reads retried after the caller gave up"
    assert free_after < 30.0, f"the database thread was held {free_after:.1f} s"
    assert info.status is ExecutionStatus.COMPLETED, info.error
