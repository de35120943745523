"""The engine's batched writes of the jobs tables: a :class:`Batch` of state changes and its commit.

Guarantees:

* :func:`write_batch` commits a whole batch in one transaction: its new executions and steps,
  its changed ones, its ledger rows and its events become durable together or not at all;
  :func:`write_batch_in` writes it in a transaction the caller commits.
* An engine's routine write never undoes what another process owns: an execution's cancel
  request is not among the columns it writes (only a cancel request sets it, only a claim
  clears it), nor are a step's distributed columns (the workers' alone).
* The events come back with their ids, in the batch's order.
* A ledger row is inserted or, for an identity already recorded, replaced
  (:func:`upsert_ledger`), on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, ledger, steps
from framepipe.backends.state.event_log import insert_events
from framepipe.events import Event

__all__ = ["EXECUTION_COLUMNS", "Batch", "upsert_ledger", "write_batch", "write_batch_in"]

_STEP_COLS = [c.name for c in steps.columns]
# cancel_requested is not here: only request_cancel sets it and only a claim clears it, so an
# engine's routine write can never undo a cancel request made by another process.
EXECUTION_COLUMNS = (
    "status",
    "progress",
    "error",
    "owner",
    "heartbeat_at",
    "runs",
    "started_at",
    "finished_at",
)
"""The columns of an execution row a batch writes (with its ``id``, which names it)."""
# The distributed columns (waiting, lease_until, worker, published_at) are the workers' alone.
_STEP_MUTABLE = [
    c
    for c in _STEP_COLS
    if c
    not in (
        "execution_id",
        "key",
        "name",
        "params",
        "depends_on",
        "spawned_by",
        "created_at",
        "seq",
        "waiting",
        "lease_until",
        "worker",
        "published_at",
    )
]

_update_step = (
    steps.update()
    .where(
        steps.c.execution_id == sa.bindparam("b_execution_id"), steps.c.key == sa.bindparam("b_key")
    )
    .values({c: sa.bindparam(f"b_{c}") for c in _STEP_MUTABLE})
)
_update_exec = (
    executions.update()
    .where(executions.c.id == sa.bindparam("b_id"))
    .values({c: sa.bindparam(f"b_{c}") for c in EXECUTION_COLUMNS})
)


@dataclass
class Batch:
    """State changes committed together by :func:`write_batch`."""

    new_executions: list[dict[str, Any]] = field(default_factory=list)
    executions: list[dict[str, Any]] = field(default_factory=list)
    new_steps: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    ledger: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.new_executions
            or self.executions
            or self.new_steps
            or self.steps
            or self.events
            or self.ledger
        )

    def by_execution(self) -> dict[str | None, Batch]:
        """This batch split by execution id, each part in this batch's order (None: what
        belongs to no execution); committing every part commits the same changes."""
        parts: dict[str | None, Batch] = {}

        def part(execution_id: str | None) -> Batch:
            return parts.setdefault(execution_id, Batch())

        for row in self.new_executions:
            part(row["id"]).new_executions.append(row)
        for row in self.executions:
            part(row["id"]).executions.append(row)
        for row in self.new_steps:
            part(row["execution_id"]).new_steps.append(row)
        for row in self.steps:
            part(row["execution_id"]).steps.append(row)
        for event in self.events:
            part(event.execution_id).events.append(event)
        for row in self.ledger:
            part(row.get("execution_id")).ledger.append(row)
        return parts


def write_batch(store: StateStore, batch: Batch) -> list[Event]:
    """Commit ``batch`` in one transaction; return its events with their ids."""
    with store.write() as conn:
        return write_batch_in(store, conn, batch)


def write_batch_in(store: StateStore, conn: sa.Connection, batch: Batch) -> list[Event]:
    """Write ``batch`` in the transaction of ``conn`` (committed with it); return its events
    with their ids."""
    if batch.new_executions:
        conn.execute(executions.insert(), batch.new_executions)
    if batch.new_steps:
        conn.execute(steps.insert(), batch.new_steps)
    if batch.executions:
        conn.execute(
            _update_exec, [{f"b_{k}": v for k, v in row.items()} for row in batch.executions]
        )
    if batch.steps:
        conn.execute(
            _update_step,
            [
                {f"b_{k}": row[k] for k in ("execution_id", "key", *_STEP_MUTABLE)}
                for row in batch.steps
            ],
        )
    if batch.ledger:
        upsert_ledger(store, conn, batch.ledger)
    return insert_events(store, conn, batch.events)


def upsert_ledger(store: StateStore, conn: sa.Connection, rows: list[dict[str, Any]]) -> None:
    if store.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(ledger)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(ledger)  # type: ignore[assignment]
    excluded = stmt.excluded
    stmt = stmt.on_conflict_do_update(
        index_elements=["namespace", "identity"],
        set_={
            c: excluded[c]
            for c in ("content_hash", "size", "meta", "execution_id", "step_key", "imported_at")
        },
    )
    conn.execute(stmt, rows)
