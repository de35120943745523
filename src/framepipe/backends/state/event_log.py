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

__all__ = ["append_events", "insert_events", "stored_app_events"]


_EVENTS_LOCK = 0x66706576  # "fpev": with the table's oid, the key of the lock below
_IN_ID_ORDER = (
    f"SELECT pg_advisory_xact_lock({_EVENTS_LOCK}, '{events.name}'::regclass::oid::integer)"
)


def insert_events(store: StateStore, conn: sa.Connection, batch: Sequence[Event]) -> list[Event]:
    """Insert ``batch`` in the open transaction; return the events with their ids, in order.

    Readers page by id (``id > after``), so ids must become visible in the order they are
    given: an event committed after one with a higher id was read would be skipped for good.
    On SQLite every write transaction holds the database's write lock (``BEGIN IMMEDIATE``)
    until it ends, so that holds. On PostgreSQL ids come from a sequence, which concurrent
    writers (the engine, workers, apps' sinks) draw from in one order and commit in another;
    so the insert first takes a transaction-scoped advisory lock (key: ``_EVENTS_LOCK`` and
    the table's oid, so each schema's table has its own), held until the commit has made the
    events visible: writers of events draw ids and commit one after another, in id order. A
    rolled-back transaction leaves a gap, which readers pass over without waiting.

    Every caller inserts its events last in the transaction (keep it so): no lock is taken
    after this one, so it cannot be part of a deadlock. The lock is held through the
    commit's WAL flush, so event-writing commits no longer share a flush (group commit), and
    that is its cost. Measured on the 2-CPU test machine, PostgreSQL 15 with an fsync of about
    3-4 ms: a burst of commits of 5 events each from 4 threads ran 630-1160 durable
    commits/s without the lock and 225-380/s with it (what one thread reaches alone), and
    1500-1950 ``durable=False`` commits/s without, 1000-1300/s with it;
    ``benchmarks/distributed.py`` (5,000 no-op steps on 2 workers, whose outcome commits are
    durable) took 6.3 s instead of 4.05 s (medians of 4). Cheaper with a faster flush.
    """
    if not batch:
        return []
    if store.dialect == "postgresql":
        conn.exec_driver_sql(_IN_ID_ORDER)
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
