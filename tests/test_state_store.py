"""The state store: migrations, SQLite concurrency, schema version checks."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from framepipe.backends.state import SCHEMA_HEAD, StateStore, events, executions
from framepipe.errors import SchemaVersionError, StateStoreError


def test_fresh_database_is_migrated_to_head(database_url: str) -> None:
    with StateStore(database_url) as store:
        assert store.current_revision() == SCHEMA_HEAD
        names = set(sa.inspect(store.engine).get_table_names())
        expected = {"fp_executions", "fp_steps", "fp_events", "fp_ledger", "fp_alembic_version"}
        assert expected <= names
        assert "alembic_version" not in names  # Alembic's default table is left to applications


def test_stores_opened_at_once_on_a_fresh_database_migrate_it_once(database_url: str) -> None:
    """Processes starting together (a server and its workers) do not trip over each other's
    migration: one migrates, the others wait for it and find the schema at head."""
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []
    revisions: list[str | None] = []

    def open_store() -> None:
        try:
            barrier.wait(10)
            with StateStore(database_url) as store:
                revisions.append(store.current_revision())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert revisions == [SCHEMA_HEAD] * 4


def test_reopening_keeps_data_and_revision(database_url: str) -> None:
    with StateStore(database_url) as store, store.write() as conn:
        conn.execute(
            executions.insert().values(
                id="x" * 32,
                pipeline="p",
                status="completed",
                inputs={},
                progress=100.0,
                cancel_requested=False,
                runs=1,
                created_at=time.time(),
            )
        )
    with StateStore(database_url) as store, store.read() as conn:
        assert conn.execute(sa.select(executions.c.pipeline)).scalar_one() == "p"


def test_a_0001_database_is_upgraded_keeping_its_rows(database_url: str) -> None:
    from alembic import command

    from framepipe.backends.state.store import _alembic_config

    with StateStore(database_url, migrate=False) as store:
        with store.write() as conn:
            command.upgrade(_alembic_config(conn), "0001")
        with store.write() as conn:
            conn.exec_driver_sql(
                "INSERT INTO fp_executions (id, pipeline, status, inputs, progress, "
                "cancel_requested, runs, created_at) VALUES "
                "('old1', 'p', 'completed', '{}', 100.0, false, 1, 1.0)"
            )
        assert store.current_revision() == "0001"
    with StateStore(database_url) as store, store.read() as conn:
        assert store.current_revision() == SCHEMA_HEAD
        row = conn.execute(
            sa.select(executions.c.id, executions.c.mode, executions.c.unfinished)
        ).one()
        assert tuple(row) == ("old1", "local", 0)
        assert {"fp_step_deps", "fp_workers"} <= set(sa.inspect(store.engine).get_table_names())


def test_an_applications_own_alembic_version_is_left_alone(database_url: str) -> None:
    # A team's database, its own Alembic revision in alembic_version: framepipe adds its
    # tables and its own version table beside them.
    engine = sa.create_engine(database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)"
        )
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('ae1027a6acf')")
    engine.dispose()
    with StateStore(database_url) as store, store.read() as conn:
        assert store.current_revision() == SCHEMA_HEAD
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").all() == [
            ("ae1027a6acf",)
        ]


def test_a_database_stamped_by_an_earlier_framepipe_moves_its_stamp(database_url: str) -> None:
    # Earlier framepipe kept its revision in Alembic's default alembic_version: the stamp
    # moves to fp_alembic_version (then the schema is upgraded from it), rows are kept, and
    # framepipe's old table is dropped.
    from alembic import command

    from framepipe.backends.state.store import _alembic_config

    with StateStore(database_url, migrate=False) as store:
        with store.write() as conn:
            command.upgrade(_alembic_config(conn), "0007")
            conn.exec_driver_sql("ALTER TABLE fp_alembic_version RENAME TO alembic_version")
            if store.dialect == "postgresql":  # Alembic names the key after its table
                conn.exec_driver_sql(
                    "ALTER TABLE alembic_version "
                    "RENAME CONSTRAINT fp_alembic_version_pkc TO alembic_version_pkc"
                )
            conn.exec_driver_sql(
                "INSERT INTO fp_executions (id, pipeline, status, inputs, progress, "
                "cancel_requested, runs, created_at) VALUES "
                "('old1', 'p', 'completed', '{}', 100.0, false, 1, 1.0)"
            )
        assert store.current_revision() is None
    with StateStore(database_url) as store, store.read() as conn:
        assert store.current_revision() == SCHEMA_HEAD
        names = set(sa.inspect(conn).get_table_names())
        assert "fp_objects_left" in names  # 0008 ran after the stamp moved
        assert "alembic_version" not in names
        assert conn.execute(sa.select(executions.c.id)).scalars().all() == ["old1"]


def test_newer_schema_is_refused_not_touched(database_url: str) -> None:
    with StateStore(database_url) as store, store.write() as conn:
        conn.exec_driver_sql("UPDATE fp_alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaVersionError, match=r"9999.*upgrade framepipe"):
        StateStore(database_url)
    with StateStore(database_url, migrate=False) as store:
        assert store.current_revision() == "9999"


def test_sqlite_is_wal_with_busy_timeout(tmp_path: Path) -> None:
    with StateStore(f"sqlite:///{tmp_path / 's.db'}") as store, store.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 5000
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_use_after_close_raises(tmp_path: Path) -> None:
    store = StateStore(f"sqlite:///{tmp_path / 's.db'}")
    store.close()
    with pytest.raises(StateStoreError, match="closed"), store.read():
        pass


def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(StateStoreError, match="cannot open database"):
        StateStore("postgresql+psycopg://127.0.0.1:1/nothing?connect_timeout=2")


def _hammer(url: str, worker: int, count: int) -> None:
    with StateStore(url) as store:
        for i in range(count):
            with store.write() as conn:
                n = conn.execute(sa.select(sa.func.count()).select_from(executions)).scalar_one()
                conn.execute(
                    executions.insert().values(
                        id=f"{worker:04d}{i:028d}",
                        pipeline=f"w{worker}",
                        status="pending",
                        inputs={"seen": n},
                        progress=0.0,
                        cancel_requested=False,
                        runs=0,
                        created_at=time.time(),
                    )
                )


@pytest.mark.slow
def test_concurrent_writer_processes_never_see_database_is_locked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    StateStore(url).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(url, w, 150)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with StateStore(url) as store, store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(executions)).scalar_one() == 600


def test_event_ids_are_never_given_twice_also_across_the_0006_upgrade(database_url: str) -> None:
    """Once the newest events are deleted (a prune), the next event still gets a higher id
    than any before it: on SQLite fp_events.id was a plain rowid, which gave the deleted ids
    again, below the id a reader had paged past (found in review). A database at 0005 keeps
    its events and ids through the upgrade (and a downgrade and upgrade again)."""
    from alembic import command

    from framepipe.backends.state.event_log import append_events, insert_events
    from framepipe.backends.state.store import _alembic_config
    from framepipe.events import Event

    def batch(kind: str, n: int) -> list[Event]:
        return [Event(type=kind, ts=1.0 + i, data={"n": i}) for i in range(n)]

    def stored(store: StateStore) -> list[tuple[int, str, dict[str, int]]]:
        with store.read() as conn:
            rows = conn.execute(sa.select(events.c.id, events.c.type, events.c.data)).all()
        return sorted((r.id, r.type, r.data) for r in rows)

    with StateStore(database_url, migrate=False) as store:
        with store.write() as conn:
            command.upgrade(_alembic_config(conn), "0005")
        with store.write() as conn:
            old = insert_events(store, conn, batch("old", 5))
        assert [e.id for e in old] == [1, 2, 3, 4, 5]
        before = stored(store)
        assert store.current_revision() == "0005"
    with StateStore(database_url) as store:
        assert store.current_revision() == SCHEMA_HEAD
        assert stored(store) == before
        with store.write() as conn:
            conn.execute(events.delete().where(events.c.id > 3))
        assert [e.id for e in append_events(store, batch("new", 2))] == [6, 7]
        with store.write() as conn:
            command.downgrade(_alembic_config(conn), "0005")
        with store.write() as conn:
            command.upgrade(_alembic_config(conn), "head")
        kept = stored(store)
        assert [row[0] for row in kept] == [1, 2, 3, 6, 7]
        assert kept[:3] == before[:3]
        with store.write() as conn:
            conn.execute(events.delete().where(events.c.id > 3))
        assert [e.id for e in append_events(store, batch("newer", 1))] == [8]
        with store.read() as conn:
            assert [i["name"] for i in sa.inspect(conn).get_indexes("fp_events")] == [
                "ix_fp_events_execution"
            ]


BIG = 2**31 + 10  # past a 32-bit integer, the PostgreSQL column's type before 0007


def _event_column_types(store: StateStore) -> tuple[str, str]:
    """PostgreSQL: the type of fp_events.id and of the sequence its ids are drawn from."""
    with store.read() as conn:
        column = conn.exec_driver_sql(
            "SELECT data_type FROM information_schema.columns WHERE table_schema = "
            "current_schema() AND table_name = 'fp_events' AND column_name = 'id'"
        ).scalar_one()
        sequence = conn.exec_driver_sql(
            "SELECT s.seqtypid::regtype::text FROM pg_sequence s "
            "WHERE s.seqrelid = pg_get_serial_sequence('fp_events', 'id')::regclass"
        ).scalar_one()
    return str(column), str(sequence)


def test_event_ids_past_32_bits_are_given_stored_and_read_back(database_url: str) -> None:
    """A live deployment writing many events a second for years passes 2**31 ids: an id past
    it is stored, the next ones are drawn after it, and readers page past it (the column was
    a 32-bit integer on PostgreSQL: "integer out of range")."""
    from framepipe.backends.state.event_log import append_events, insert_events
    from framepipe.events import Event
    from framepipe.jobs.records import list_events

    def event(n: int) -> Event:
        return Event(type="big", ts=float(n), data={"n": n})

    with StateStore(database_url) as store:
        with store.write() as conn:
            conn.execute(events.insert().values(id=BIG, ts=0.0, type="big", data={"n": 0}))
            if store.dialect == "postgresql":  # the sequence, as if BIG ids had been drawn
                conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('fp_events', 'id'), {BIG})"
                )
        assert [e.id for e in append_events(store, [event(1), event(2)])] == [BIG + 1, BIG + 2]
        with store.write() as conn:
            assert [e.id for e in insert_events(store, conn, [event(3)])] == [BIG + 3]
        read = list_events(store, after_id=BIG)
        assert [(e.id, e.data) for e in read] == [(BIG + i, {"n": i}) for i in (1, 2, 3)]
        assert [e.id for e in list_events(store, after_id=2**31)] == [BIG + i for i in range(4)]
        assert list_events(store, after_id=2**62) == []
        if store.dialect == "postgresql":
            assert _event_column_types(store) == ("bigint", "bigint")


@pytest.mark.postgres
def test_a_0006_postgresql_database_is_upgraded_to_64_bit_event_ids(pg_url: str) -> None:
    """A database at 0006 (fp_events.id an integer, its sequence too) keeps its events, their
    ids and its sequence's place through the upgrade (and a downgrade and upgrade again);
    afterwards ids past 2**31 are drawn."""
    from alembic import command

    from framepipe.backends.state.event_log import append_events
    from framepipe.backends.state.store import _alembic_config
    from framepipe.events import Event

    def batch(n: int) -> list[Event]:
        return [Event(type="old", ts=1.0 + i, execution_id=None, data={"n": i}) for i in range(n)]

    def stored(store: StateStore) -> list[tuple[int, str, dict[str, int]]]:
        with store.read() as conn:
            rows = conn.execute(sa.select(events.c.id, events.c.type, events.c.data)).all()
        return sorted((r.id, r.type, r.data) for r in rows)

    with StateStore(pg_url, migrate=False) as store:
        with store.write() as conn:
            command.upgrade(_alembic_config(conn), "0006")
        assert [e.id for e in append_events(store, batch(3))] == [1, 2, 3]
        assert _event_column_types(store) == ("integer", "integer")
        before = stored(store)
    with StateStore(pg_url) as store:
        assert store.current_revision() == SCHEMA_HEAD
        assert _event_column_types(store) == ("bigint", "bigint")
        assert stored(store) == before
        assert [e.id for e in append_events(store, batch(1))] == [4]
        with store.write() as conn:
            command.downgrade(_alembic_config(conn), "0006")
        assert _event_column_types(store) == ("integer", "integer")
        with store.write() as conn:
            command.upgrade(_alembic_config(conn), "head")
        assert [e.id for e in append_events(store, batch(1))] == [5]
        with store.write() as conn:
            conn.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('fp_events', 'id'), {BIG})")
        assert [e.id for e in append_events(store, batch(1))] == [BIG + 1]
        assert [row[0] for row in stored(store)] == [1, 2, 3, 4, 5, BIG + 1]
        with store.read() as conn:
            indexes = sa.inspect(conn).get_indexes("fp_events")
        assert [(i["name"], i["column_names"]) for i in indexes] == [
            ("ix_fp_events_execution", ["execution_id", "id"])
        ]


@pytest.mark.postgres
@pytest.mark.slow  # waits the 10 s connect timeout
def test_a_postgresql_server_that_never_answers_is_given_up_and_dead_peers_are_found(
    pg_url: str,
) -> None:
    """A server that takes the connection and never speaks (a hung host, a half-open
    failover address): opening the store fails after the 10 s connect timeout instead of
    waiting for ever; and its connections carry TCP keepalives and a user timeout, so a server
    gone without a word is found within about a minute. A URL's own options win."""
    import socket

    from waiting import wait_until

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    outcome: list[BaseException | None] = []

    def open_it() -> None:
        try:
            StateStore(f"postgresql+psycopg://app:pw@127.0.0.1:{port}/prod").close()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    try:
        threading.Thread(target=open_it, daemon=True).start()
        wait_until("the open given up", lambda: outcome, 40)  # for ever before
    finally:
        silent.close()
    [error] = outcome
    assert isinstance(error, StateStoreError), error
    assert "pw@" not in str(error)

    with StateStore(pg_url) as store, store.engine.connect() as conn:
        given = conn.connection.dbapi_connection.info.get_parameters()
    assert {k: given[k] for k in ("connect_timeout", "keepalives", "tcp_user_timeout")} == {
        "connect_timeout": "10",
        "keepalives": "1",
        "tcp_user_timeout": "60000",
    }
    sep = "&" if "?" in pg_url else "?"
    with StateStore(f"{pg_url}{sep}connect_timeout=3") as store, store.engine.connect() as conn:
        assert conn.connection.dbapi_connection.info.get_parameters()["connect_timeout"] == "3"
