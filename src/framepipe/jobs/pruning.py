"""Retention of executions: :func:`prune_executions` deletes the records of executions that
finished long ago, so the state database does not keep every job ever run.

Guarantees:

* Only executions that finished (``completed``, ``failed``, ``cancelled``, ``interrupted``, or
  those of ``statuses``) more than ``older_than`` seconds ago are deleted, with their steps,
  dependencies and events; a pending or running one never is, nor one a retry resumed since it
  was chosen: each batch is chosen and deleted in one transaction, with the executions' rows
  locked on PostgreSQL (SQLite serialises writers), and the status re-checked.
* Each batch of ``batch`` executions is its own transaction, so a long prune never holds a
  lock that stops the engine or a worker for long.
* The ledger stays: it is what incremental imports remember (which files were imported), and
  it outlives the executions that wrote it.
* Objects go only when asked, after the records (so an execution a retry resumed never
  loses its intermediates): :func:`delete_objects` deletes those under a prefix template per
  pruned execution (``framepipe jobs prune --objects 'ml/{execution_id}/'``, or the setting
  ``executions_retention_objects`` of ``framepipe serve``), the template checked first by
  :func:`~framepipe.config_checks.check_prune_objects`. What it cannot delete it names, with
  the store's error, and, given the state store, records in ``fp_objects_left``: the next
  prune with objects deletes it then (the executions' records are gone by then).
* No object is forgotten between the two: given ``objects``, :func:`prune_executions` records
  each pruned execution's prefix in ``fp_objects_left`` in the transaction that deletes its
  records, and :func:`delete_objects` forgets a prefix only once its objects are gone. A
  prune killed, or a service stopped, after the records went leaves the prefixes for the next
  prune of that object store (``stop`` ends a :func:`delete_objects` between two objects).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from framepipe.backends.objects import ObjectStore
from framepipe.backends.state import (
    StateStore,
    events,
    executions,
    objects_left,
    step_deps,
    steps,
)
from framepipe.config_checks import check_prune_objects
from framepipe.errors import InvalidKeyError, ObjectStoreError
from framepipe.jobs.models import ExecutionStatus
from framepipe.urls import safe_url

__all__ = [
    "FINISHED",
    "ObjectsAfter",
    "ObjectsLeft",
    "PrunedExecution",
    "PrunedObjects",
    "check_objects_prefix",
    "delete_objects",
    "prune_executions",
]

FINISHED = frozenset(s for s in ExecutionStatus if s.finished)
"""The statuses an execution may be pruned in: it runs no more."""


@dataclass(frozen=True)
class PrunedExecution:
    """One deleted execution."""

    id: str
    pipeline: str
    status: ExecutionStatus
    finished_at: float


@dataclass(frozen=True)
class ObjectsAfter:
    """The objects to delete after the records: those under ``template`` (a prefix template
    :func:`check_objects_prefix` accepted) in the object store ``objects``."""

    objects: ObjectStore
    template: str

    @property
    def where(self) -> str:
        """The object store as ``fp_objects_left`` names it (its URL, secrets masked)."""
        return safe_url(self.objects.url)


def prune_executions(
    store: StateStore,
    older_than: float,
    *,
    statuses: Collection[ExecutionStatus] = FINISHED,
    pipeline: str | None = None,
    batch: int = 20,
    now: float | None = None,
    dry_run: bool = False,
    objects: ObjectsAfter | None = None,
    stop: threading.Event | None = None,
) -> list[PrunedExecution]:
    """Delete the executions in ``statuses`` (of ``pipeline``, when given) that finished more
    than ``older_than`` seconds ago, with their steps, dependencies and events; return them,
    oldest first. With ``objects``, each one's prefix is recorded in ``fp_objects_left`` in
    the same transaction, for :func:`delete_objects`. ``stop`` set: it returns after the batch
    under way (each batch is a transaction of its own, its prefixes recorded with it).
    ``dry_run``: delete nothing, return what would go. ValueError for a negative age, an empty
    ``statuses`` or one that is not finished."""
    if older_than < 0:
        raise ValueError(f"older_than must be >= 0 seconds, got {older_than}")
    chosen = {ExecutionStatus(s) for s in statuses}
    if not chosen:
        raise ValueError("no status to prune")
    running = sorted(s.value for s in chosen - FINISHED)
    if running:
        raise ValueError(f"executions that are {', '.join(running)} are never pruned")
    cutoff = (time.time() if now is None else now) - older_than
    query = (
        sa.select(
            executions.c.id, executions.c.pipeline, executions.c.status, executions.c.finished_at
        )
        .where(
            executions.c.status.in_(sorted(s.value for s in chosen)),
            executions.c.finished_at.is_not(None),
            executions.c.finished_at < cutoff,
        )
        .order_by(executions.c.finished_at, executions.c.id)
    )
    if pipeline is not None:
        query = query.where(executions.c.pipeline == pipeline)
    if dry_run:
        with store.read() as conn:
            return [_pruned(r) for r in conn.execute(query)]
    pruned: list[PrunedExecution] = []
    while True:
        page = query.limit(batch)
        if store.dialect == "postgresql":
            page = page.with_for_update(skip_locked=True)
        with store.write() as conn:
            rows = [_pruned(r) for r in conn.execute(page)]
            ids = [r.id for r in rows]
            if ids:
                conn.execute(events.delete().where(events.c.execution_id.in_(ids)))
                conn.execute(step_deps.delete().where(step_deps.c.execution_id.in_(ids)))
                conn.execute(steps.delete().where(steps.c.execution_id.in_(ids)))
                conn.execute(executions.delete().where(executions.c.id.in_(ids)))
                if objects is not None:
                    _record_intents(conn, objects, rows)
        pruned.extend(rows)
        if len(rows) < batch or (stop is not None and stop.is_set()):
            return pruned


def _record_intents(
    conn: sa.Connection, objects: ObjectsAfter, rows: list[PrunedExecution]
) -> None:
    """Record the prefix of each of ``rows`` as left (not deleted yet, tried 0 times); a
    prefix recorded already (two executions, one prefix) is kept as it is."""
    where = objects.where
    prefixes = {objects.template.format(execution_id=r.id, pipeline=r.pipeline): r for r in rows}
    known = set(
        conn.execute(
            sa.select(objects_left.c.prefix).where(
                objects_left.c.store == where, objects_left.c.prefix.in_(sorted(prefixes))
            )
        ).scalars()
    )
    now = time.time()
    new = [
        {
            "store": where,
            "prefix": prefix,
            "execution_id": row.id,
            "error": "not deleted yet: its execution's records were pruned",
            "since": now,
            "tries": 0,
        }
        for prefix, row in prefixes.items()
        if prefix not in known
    ]
    if new:
        conn.execute(objects_left.insert(), new)


def _pruned(row: Any) -> PrunedExecution:
    return PrunedExecution(row.id, row.pipeline, ExecutionStatus(row.status), row.finished_at)


@dataclass(frozen=True)
class ObjectsLeft:
    """The objects of one pruned execution that could not all be deleted."""

    prefix: str
    error: str


@dataclass(frozen=True)
class PrunedObjects:
    """What :func:`delete_objects` did: how many objects went, and where some are left."""

    deleted: int
    left: list[ObjectsLeft]


def check_objects_prefix(objects: ObjectStore, template: str, pipeline: str | None = None) -> str:
    """``template`` if it is a prefix template (:func:`~framepipe.config_checks.
    check_prune_objects`) whose prefixes ``objects`` can list; ValueError saying why not.
    Run before any record is deleted: a template refused after would leave objects no
    record names."""
    checked = check_prune_objects(template)
    if checked is None:
        raise ValueError("the prefix template is blank")
    sample = checked.format(execution_id="0" * 32, pipeline=pipeline or "pipeline")
    try:
        next(iter(objects.list(sample)), None)
    except InvalidKeyError as exc:
        raise ValueError(f"{template!r}: {exc}") from None
    return checked


def delete_objects(
    objects: ObjectStore,
    template: str,
    pruned: Collection[PrunedExecution],
    *,
    store: StateStore | None = None,
    stop: threading.Event | None = None,
) -> PrunedObjects:
    """Delete, for each of ``pruned``, the objects under ``template`` formatted with its
    ``execution_id`` and ``pipeline`` (a template :func:`check_objects_prefix` accepted).
    An object store error stops that execution's prefix, which is then named with the error
    in :attr:`PrunedObjects.left`; the other executions' objects are still deleted.

    With ``store``, nothing is given up: the prefixes recorded in this object store's
    ``fp_objects_left`` (by the store's URL: never another store's), those the prune just
    recorded (:func:`prune_executions` with ``objects``) and those earlier prunes left, are
    deleted, each forgotten once its objects are gone; a prefix left now is recorded there
    for the next prune. ``stop`` set: it returns before the next object, what it did not
    reach still recorded (with ``store``)."""
    deleted = 0
    left: list[ObjectsLeft] = []
    where = safe_url(objects.url)
    earlier = _objects_left(store, where) if store is not None else {}
    for prefix, execution_id in earlier.items():
        if stop is not None and stop.is_set():
            return PrunedObjects(deleted, left)
        gone, error = _delete_prefix(objects, prefix, stop)
        if error == _STOPPED:
            return PrunedObjects(deleted + gone, left)
        deleted += gone
        if error is None:
            _forget_left(store, where, prefix)
        else:
            left.append(ObjectsLeft(prefix, error))
            _remember_left(store, where, prefix, execution_id, error)
    for p in pruned:
        prefix = template.format(execution_id=p.id, pipeline=p.pipeline)
        if prefix in earlier:
            continue
        if stop is not None and stop.is_set():
            gone, error = 0, _STOPPED
        else:
            gone, error = _delete_prefix(objects, prefix, stop)
        deleted += gone
        if error is not None:
            left.append(ObjectsLeft(prefix, error))
            _remember_left(store, where, prefix, p.id, error)
    return PrunedObjects(deleted, left)


_STOPPED = "stopped before all its objects were deleted"
_DELETE_BATCH = 1000  # objects deleted between two looks at ``stop`` (one S3 request)


def _delete_prefix(
    objects: ObjectStore, prefix: str, stop: threading.Event | None = None
) -> tuple[int, str | None]:
    """How many objects under ``prefix`` were deleted (a batch at a time,
    :meth:`~framepipe.backends.objects.ObjectStore.delete_many`), and the store's error that
    stopped it (:data:`_STOPPED` when ``stop`` was set)."""
    deleted = 0
    try:
        listed = [info.key for info in objects.list(prefix)]
        for start in range(0, len(listed), _DELETE_BATCH):
            if stop is not None and stop.is_set():
                return deleted, _STOPPED
            deleted += objects.delete_many(listed[start : start + _DELETE_BATCH])
    except ObjectStoreError as exc:
        return deleted, str(exc)
    return deleted, None


def _objects_left(store: StateStore, where: str) -> dict[str, str]:
    with store.read() as conn:
        rows = conn.execute(
            sa.select(objects_left.c.prefix, objects_left.c.execution_id)
            .where(objects_left.c.store == where)
            .order_by(objects_left.c.since, objects_left.c.prefix)
        )
        return {row.prefix: row.execution_id for row in rows}


def _remember_left(
    store: StateStore | None, where: str, prefix: str, execution_id: str, error: str
) -> None:
    if store is None:
        return
    row = (objects_left.c.store == where) & (objects_left.c.prefix == prefix)
    again = objects_left.update().where(row).values(error=error, tries=objects_left.c.tries + 1)
    try:
        with store.write() as conn:
            if not conn.execute(again).rowcount:
                conn.execute(
                    objects_left.insert().values(
                        store=where,
                        prefix=prefix,
                        execution_id=execution_id,
                        error=error,
                        since=time.time(),
                        tries=1,
                    )
                )
    except sa.exc.IntegrityError:  # another prune (serve's, the CLI's) recorded it meanwhile
        with store.write() as conn:
            conn.execute(again)


def _forget_left(store: StateStore | None, where: str, prefix: str) -> None:
    if store is None:
        return
    row = (objects_left.c.store == where) & (objects_left.c.prefix == prefix)
    with store.write() as conn:
        conn.execute(objects_left.delete().where(row))
