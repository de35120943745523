"""The event log in the state store: events appended in order, with the ids that order them.

Both the jobs (in the transaction that changes an execution) and the live apps (through
:class:`~framepipe.event_sinks.StoreEventSink`) append here; readers page through it by id.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state.schema import events
from framepipe.backends.state.store import StateStore
from framepipe.events import Event

__all__ = ["append_events", "insert_events", "stored_app_events", "wait_for_event_writers"]


_EVENTS_LOCK = 0x66706576  # "fpev": with the table's oid, the key of the lock below
_KEY = f"{_EVENTS_LOCK}, '{events.name}'::regclass::oid::integer"
_WRITING = f"SELECT pg_advisory_xact_lock_shared({_KEY})"
_READING = f"SELECT pg_advisory_xact_lock({_KEY})"


def wait_for_event_writers(store: StateStore, conn: sa.Connection) -> None:
    """In a read transaction, before reading events by id: on PostgreSQL, wait until every
    transaction that was writing events has ended, so no event with an id below those read
    can become visible later (see :func:`insert_events`). Nothing to wait for on SQLite."""
    if store.dialect == "postgresql":
        conn.exec_driver_sql(_READING)


def insert_events(store: StateStore, conn: sa.Connection, batch: Sequence[Event]) -> list[Event]:
    """Insert ``batch`` in the open transaction; return the events with their ids, in order.

    Readers page by id (``id > after``), so an event must never become visible after one
    with a higher id was read: it would be skipped for good. On SQLite every write
    transaction holds the database's write lock (``BEGIN IMMEDIATE``) until it ends, so ids
    become visible in order. On PostgreSQL ids come from a sequence, which concurrent writers
    (the engine, workers, apps' sinks) draw from in one order and commit in another; so a
    writer takes a transaction-scoped advisory lock in *shared* mode right before inserting
    (key: ``_EVENTS_LOCK`` and the table's oid, so each schema's table has its own), held
    until its commit, and a reader of events takes the same lock in *exclusive* mode before
    it reads (:func:`wait_for_event_writers`): it waits until the writers that may hold
    drawn ids have committed or rolled back, and writers that come meanwhile draw their ids
    after it has read. Writers never wait for each other (their commits still share WAL
    flushes); a writer waits at most for one read of events, a reader for the commits in
    flight. A rolled-back transaction leaves a gap, which readers pass over.

    Every caller inserts its events last in the transaction (keep it so), and no reader of
    events runs inside a transaction that writes them: no lock is taken after this one, so
    it cannot be part of a deadlock.
    """
    if not batch:
        return []
    if store.dialect == "postgresql":
        conn.exec_driver_sql(_WRITING)
    rows = [
        {
            "ts": e.ts,
            "type": e.type,
            "execution_id": e.execution_id,
            "step_key": e.step_key,
            "data": e.data,
        }
        for e in batch
    ]
    if store.dialect == "sqlite":
        # One multi-row INSERT under the write lock assigns increasing ids in row order;
        # asking SQLAlchemy to sort by parameter order would send one INSERT per row.
        ids = sorted(conn.execute(events.insert().returning(events.c.id), rows).scalars().all())
    else:
        ids = list(
            conn.execute(events.insert().returning(events.c.id, sort_by_parameter_order=True), rows)
            .scalars()
            .all()
        )
    return [
        Event(
            type=e.type,
            ts=e.ts,
            execution_id=e.execution_id,
            step_key=e.step_key,
            data=e.data,
            id=i,
        )
        for e, i in zip(batch, ids, strict=True)
    ]


def append_events(store: StateStore, batch: Sequence[Event]) -> list[Event]:
    """Commit ``batch`` in a transaction of its own; return the events with their ids."""
    with store.write() as conn:
        return insert_events(store, conn, batch)


def stored_app_events(
    store: StateStore, app: str, types: Sequence[str], *, limit: int, scan: int = 5000
) -> list[tuple[float, str, dict[str, Any]]]:
    """The newest ``limit`` events of ``types`` that app ``app`` committed to the event log
    (``(ts, type, data)``, newest first), among the newest ``scan`` of those types."""
    query = (
        sa.select(events.c.ts, events.c.type, events.c.data)
        .where(events.c.execution_id.is_(None), events.c.type.in_(list(types)))
        .order_by(events.c.id.desc())
        .limit(scan)
    )
    out: list[tuple[float, str, dict[str, Any]]] = []
    with store.read() as conn:
        for ts, kind, data in conn.execute(query):
            if isinstance(data, dict) and data.get("app") == app:
                out.append((float(ts), str(kind), data))
                if len(out) >= limit:
                    break
    return out
