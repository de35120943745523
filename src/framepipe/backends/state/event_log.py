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


def insert_events(store: StateStore, conn: sa.Connection, batch: Sequence[Event]) -> list[Event]:
    """Insert ``batch`` in the open transaction; return the events with their ids, in order."""
    if not batch:
        return []
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
