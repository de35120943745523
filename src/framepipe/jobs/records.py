"""Reading and writing jobs in the state store (executions, steps, events, ledger).

This is the jobs' store module: the queries of the jobs tables that the job client
(:mod:`framepipe.jobs.client`), the engine, a worker's step context, control, the event feed
and the metrics make live here, so the command line, the HTTP service,
:func:`~framepipe.run_pipeline` and the examples never write SQL. The workers' transitions
are in :mod:`framepipe.jobs.dispatch` and :mod:`framepipe.jobs.transitions`, the recovery of
dead engines' executions in :mod:`framepipe.jobs.recovery` and the ledger's queries in
:mod:`framepipe.jobs.ledger`; no other module queries these tables (``tests/test_layers.py``
holds it so).

The engine batches its writes: :func:`write_batch` commits a whole group of state changes in one
transaction, so they become durable together or not at all.

One concept, longer than most: the jobs tables' queries, kept together on purpose so that a
schema change or a query rule is made in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from framepipe.backends.state import StateStore, events, executions, ledger, steps, workers
from framepipe.backends.state.event_log import insert_events, wait_for_event_writers
from framepipe.backends.state.schema import EVENT_ID_MAX
from framepipe.errors import ExecutionNotFoundError, ExecutionStateError
from framepipe.events import Event
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepInfo, StepStatus

__all__ = [
    "Batch",
    "JobCounts",
    "TakenOver",
    "cancel_or_flag",
    "cancel_requested",
    "completed_data",
    "count_jobs",
    "events_data",
    "execution_mode",
    "execution_status",
    "fail_refused",
    "find_execution",
    "get_execution",
    "give_back",
    "has_step",
    "insert_events",
    "last_event_at",
    "list_events",
    "list_executions",
    "newest_event_id",
    "step_dependencies",
    "take_over",
    "upsert_ledger",
    "write_batch",
    "write_batch_in",
]

_STEP_COLS = [c.name for c in steps.columns]
# cancel_requested is not here: only request_cancel sets it and only a claim clears it, so an
# engine's routine write can never undo a cancel request made by another process.
_EXEC_MUTABLE = [
    "status",
    "progress",
    "error",
    "owner",
    "heartbeat_at",
    "runs",
    "started_at",
    "finished_at",
]
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
    .values({c: sa.bindparam(f"b_{c}") for c in _EXEC_MUTABLE})
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


# -- reads -----------------------------------------------------------------------------------


def find_execution(store: StateStore, id_or_prefix: str) -> str:
    """The full id of the execution whose id is or starts with ``id_or_prefix``, in any case:
    ids are lower-case hex, and the argument is lower-cased, so a prefix matches alike on
    SQLite (whose LIKE ignores case) and PostgreSQL (whose LIKE does not)."""
    wanted = id_or_prefix.lower()
    with store.read() as conn:
        if conn.execute(sa.select(executions.c.id).where(executions.c.id == wanted)).first():
            return wanted
        if len(wanted) < 4:
            raise ExecutionNotFoundError(
                f"no execution {id_or_prefix!r} (give at least 4 characters of its id)",
                execution_id=id_or_prefix,
            )
        found = (
            conn.execute(
                sa.select(executions.c.id)
                .where(executions.c.id.startswith(wanted, autoescape=True))
                .limit(2)
            )
            .scalars()
            .all()
        )
    if not found:
        raise ExecutionNotFoundError(f"no execution {id_or_prefix!r}", execution_id=id_or_prefix)
    if len(found) > 1:
        raise ExecutionNotFoundError(
            f"execution id prefix {id_or_prefix!r} is ambiguous", execution_id=id_or_prefix
        )
    return str(found[0])


def _step_info(row: sa.Row[Any]) -> StepInfo:
    m = row._mapping
    return StepInfo(
        key=m["key"],
        name=m["name"],
        status=StepStatus(m["status"]),
        params=m["params"],
        depends_on=m["depends_on"],
        weight=m["weight"],
        progress=m["progress"],
        message=m["message"],
        attempt=m["attempt"],
        failures=m["failures"],
        crashes=m["crashes"],
        output=m["output"],
        error=m["error"],
        spawned_by=m["spawned_by"],
        created_at=m["created_at"],
        ready_at=m["ready_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
    )


def _execution_info(row: sa.Row[Any]) -> ExecutionInfo:
    m = row._mapping
    return ExecutionInfo(
        id=m["id"],
        pipeline=m["pipeline"],
        pipeline_ref=m["pipeline_ref"],
        status=ExecutionStatus(m["status"]),
        inputs=m.get("inputs") or {},
        progress=m["progress"],
        error=m["error"],
        owner=m["owner"],
        runs=m["runs"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
    )


def get_execution(
    store: StateStore, execution_id: str, *, with_steps: bool = True
) -> ExecutionInfo:
    """The execution (by id or unique prefix) with its steps in creation order and its data."""
    execution_id = find_execution(store, execution_id)
    with store.read() as conn:
        row = conn.execute(sa.select(executions).where(executions.c.id == execution_id)).one()
        info = _execution_info(row)
        if with_steps:
            rows = conn.execute(
                sa.select(steps).where(steps.c.execution_id == execution_id).order_by(steps.c.seq)
            ).all()
            info.steps = [_step_info(r) for r in rows]
            done = sorted((s for s in rows if s.done_seq is not None), key=lambda r: r.done_seq)
            for r in done:
                info.data.update(r.output or {})
    return info


def list_executions(
    store: StateStore,
    *,
    limit: int = 50,
    status: Sequence[str] | None = None,
    pipeline: str | None = None,
    with_inputs: bool = True,
) -> list[tuple[ExecutionInfo, int, int]]:
    """Newest executions first, each with (completed steps, total steps).

    ``with_inputs=False`` does not read the inputs (left empty): a listing stays small
    whatever a client submitted."""
    counts = (
        sa.select(
            steps.c.execution_id,
            sa.func.count().label("total"),
            sa.func.sum(sa.case((steps.c.status == "completed", 1), else_=0)).label("done"),
        )
        .group_by(steps.c.execution_id)
        .subquery()
    )
    columns = [c for c in executions.c if with_inputs or c.name != "inputs"]
    query = (
        sa.select(*columns, counts.c.total, counts.c.done)
        .outerjoin(counts, counts.c.execution_id == executions.c.id)
        .order_by(executions.c.created_at.desc())
        .limit(limit)
    )
    if status:
        query = query.where(executions.c.status.in_(list(status)))
    if pipeline:
        query = query.where(executions.c.pipeline == pipeline)
    with store.read() as conn:
        rows: Sequence[Any] = conn.execute(query).all()
    return [(_execution_info(r), int(r.done or 0), int(r.total or 0)) for r in rows]


def list_events(
    store: StateStore, execution_id: str | None = None, *, after_id: int = 0, limit: int = 1000
) -> list[Event]:
    """Stored events after ``after_id``, oldest first. An ``after_id`` at or beyond the
    largest id the column can hold has none after it (an empty list, not the database's
    "integer out of range")."""
    if after_id >= EVENT_ID_MAX:
        return []
    query = sa.select(events).where(events.c.id > after_id).order_by(events.c.id).limit(limit)
    if execution_id is not None:
        query = query.where(events.c.execution_id == execution_id)
    with store.read() as conn:
        wait_for_event_writers(store, conn)
        rows = conn.execute(query).all()
    return [
        Event(
            type=r.type,
            ts=r.ts,
            execution_id=r.execution_id,
            step_key=r.step_key,
            data=r.data,
            id=r.id,
        )
        for r in rows
    ]


def load_rows(store: StateStore, execution_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The raw execution row and its step rows (creation order), for an engine to resume."""
    with store.read() as conn:
        row = conn.execute(sa.select(executions).where(executions.c.id == execution_id)).first()
        if row is None:
            raise ExecutionNotFoundError(
                f"no execution {execution_id!r}", execution_id=execution_id
            )
        rows = conn.execute(
            sa.select(steps).where(steps.c.execution_id == execution_id).order_by(steps.c.seq)
        ).all()
    return dict(row._mapping), [dict(r._mapping) for r in rows]


def execution_status(store: StateStore, execution_id: str) -> ExecutionStatus:
    """The stored status of the execution with the full id ``execution_id``."""
    with store.read() as conn:
        status = conn.execute(
            sa.select(executions.c.status).where(executions.c.id == execution_id)
        ).scalar()
    if status is None:
        raise ExecutionNotFoundError(f"no execution {execution_id!r}", execution_id=execution_id)
    return ExecutionStatus(status)


CancelHow = Literal["flagged", "cancelled", "workers"]


def cancel_or_flag(
    store: StateStore, execution_id: str, *, workers_mode: str, now: float
) -> tuple[CancelHow, list[Event]]:
    """Cancel the execution with the full id ``execution_id`` as far as the store alone can.

    In one transaction: completed or already cancelled is :class:`ExecutionStateError`;
    running in an embedded engine sets ``cancel_requested`` for that engine to act on
    (``"flagged"``, no events); running on workers (its ``mode`` is ``workers_mode``) changes
    nothing and answers ``"workers"``, for the caller to cancel it with the workers'
    transaction; anything else (pending, failed, interrupted) is cancelled at once, its
    unfinished steps ``cancelled`` and ``execution.cancelled`` committed with it
    (``"cancelled"`` and that event, with its id)."""
    with store.write() as conn:
        row = conn.execute(
            sa.select(executions.c.status, executions.c.pipeline, executions.c.mode).where(
                executions.c.id == execution_id
            )
        ).first()
        if row is None:
            raise ExecutionNotFoundError(
                f"no execution {execution_id!r}", execution_id=execution_id
            )
        status = ExecutionStatus(row.status)
        if status in (ExecutionStatus.COMPLETED, ExecutionStatus.CANCELLED):
            raise ExecutionStateError(
                f"execution {execution_id[:12]} of pipeline "
                f"'{row.pipeline}' is already {status.value}",
                execution_id=execution_id,
            )
        if status is ExecutionStatus.RUNNING:
            if row.mode == workers_mode:
                return "workers", []
            conn.execute(
                executions.update()
                .where(executions.c.id == execution_id)
                .values(cancel_requested=True)
            )
            return "flagged", []
        conn.execute(
            steps.update()
            .where(
                steps.c.execution_id == execution_id,
                steps.c.status.notin_([StepStatus.COMPLETED.value, StepStatus.FAILED.value]),
            )
            .values(status=StepStatus.CANCELLED.value)
        )
        conn.execute(
            executions.update()
            .where(executions.c.id == execution_id)
            .values(
                status=ExecutionStatus.CANCELLED.value,
                finished_at=now,
                error="cancelled by request",
            )
        )
        return "cancelled", insert_events(
            store,
            conn,
            [
                Event(
                    "execution.cancelled",
                    now,
                    execution_id,
                    None,
                    {"error": "cancelled by request"},
                )
            ],
        )


def execution_mode(store: StateStore, execution_id: str) -> str:
    """Where the execution with the full id ``execution_id`` runs: ``embedded`` or
    ``workers``."""
    with store.read() as conn:
        return str(
            conn.execute(
                sa.select(executions.c.mode).where(executions.c.id == execution_id)
            ).scalar_one()
        )


@dataclass(frozen=True, slots=True)
class TakenOver:
    """The columns :func:`take_over` changes in an execution, as they were before it: what
    :func:`give_back` puts back."""

    id: str
    status: str
    owner: str | None
    heartbeat_at: float | None
    cancel_requested: bool
    finished_at: float | None
    error: str | None
    runs: int
    pipeline_ref: str | None


def take_over(
    store: StateStore,
    execution_id: str,
    status: str,
    owner: str,
    now: float,
    ref: str | None = None,
) -> TakenOver | None:
    """Make ``owner`` the engine of an execution to resume, if it is still ``status`` (so two
    processes resuming it at once cannot both win): running again, a new run counted, its
    error and any cancel request cleared; ``ref``, when given, becomes its stored pipeline
    reference. Returns what it changed as it was, read in the same transaction (for
    :func:`give_back`); None if the execution was not ``status`` any more."""
    with store.write() as conn:
        before = conn.execute(
            sa.select(
                executions.c.status,
                executions.c.owner,
                executions.c.heartbeat_at,
                executions.c.cancel_requested,
                executions.c.finished_at,
                executions.c.error,
                executions.c.runs,
                executions.c.pipeline_ref,
            )
            .where(executions.c.id == execution_id, executions.c.status == status)
            .with_for_update()
        ).first()
        if before is None:
            return None
        conn.execute(
            executions.update()
            .where(executions.c.id == execution_id, executions.c.status == status)
            .values(
                status=ExecutionStatus.RUNNING.value,
                owner=owner,
                heartbeat_at=now,
                cancel_requested=False,
                finished_at=None,
                error=None,
                runs=executions.c.runs + 1,
                **({"pipeline_ref": ref} if ref else {}),
            )
        )
        return TakenOver(
            id=execution_id,
            status=before.status,
            owner=before.owner,
            heartbeat_at=before.heartbeat_at,
            cancel_requested=bool(before.cancel_requested),
            finished_at=before.finished_at,
            error=before.error,
            runs=before.runs,
            pipeline_ref=before.pipeline_ref,
        )


def fail_refused(
    store: StateStore, execution_id: str, owner: str, error: str, now: float
) -> list[Event]:
    """End an execution of ``owner`` whose changes the store refused (not a lost connection:
    their data): ``failed`` with ``error``, its ready, retrying and running steps back to
    ``pending`` (as a failed execution leaves them, so a retry runs them), and an
    ``execution.failed`` event; what it had committed before stays. Returns the event (none
    if the execution is not stored as running under ``owner``)."""
    with store.write() as conn:
        ended = conn.execute(
            executions.update()
            .where(
                executions.c.id == execution_id,
                executions.c.owner == owner,
                executions.c.status == ExecutionStatus.RUNNING.value,
            )
            .values(status=ExecutionStatus.FAILED.value, error=error, finished_at=now)
        ).rowcount
        if not ended:
            return []
        conn.execute(
            steps.update()
            .where(
                steps.c.execution_id == execution_id,
                steps.c.status.in_(
                    [
                        StepStatus.READY.value,
                        StepStatus.RETRYING.value,
                        StepStatus.RUNNING.value,
                    ]
                ),
            )
            .values(status=StepStatus.PENDING.value, next_attempt_at=None)
        )
        return insert_events(
            store,
            conn,
            [Event("execution.failed", now, execution_id, None, {"error": error})],
        )


def give_back(store: StateStore, taken: TakenOver, owner: str) -> bool:
    """Undo :func:`take_over` for an execution that ``owner`` took over but could not adopt:
    every column it changed (status, owner, heartbeat, cancel request, error, end time, run
    count, pipeline reference) as ``taken`` has it, so the execution is as it was before the
    take-over. A cancel request is never dropped: one pending before the take-over is pending
    again, and one made while ``owner`` held it (flagged for this engine) stays. Only while
    ``owner`` still holds it running; True if it was given back."""
    values: dict[str, Any] = {
        "status": taken.status,
        "owner": taken.owner,
        "heartbeat_at": taken.heartbeat_at,
        "finished_at": taken.finished_at,
        "error": taken.error,
        "runs": taken.runs,
        "pipeline_ref": taken.pipeline_ref,
    }
    if taken.cancel_requested:
        values["cancel_requested"] = True
    with store.write() as conn:
        return bool(
            conn.execute(
                executions.update()
                .where(
                    executions.c.id == taken.id,
                    executions.c.owner == owner,
                    executions.c.status == ExecutionStatus.RUNNING.value,
                )
                .values(**values)
            ).rowcount
        )


def cancel_requested(store: StateStore, ids: Sequence[str]) -> list[str]:
    """Those of ``ids`` whose cancel another process requested (:func:`cancel_or_flag`)."""
    with store.read() as conn:
        return list(
            conn.execute(
                sa.select(executions.c.id).where(
                    executions.c.id.in_(ids), executions.c.cancel_requested.is_(True)
                )
            ).scalars()
        )


def completed_data(store: StateStore, execution_id: str) -> dict[str, Any]:
    """The merged outputs of the execution's completed steps, in completion order (later
    outputs win), as a step's ``ctx.data`` sees them."""
    data: dict[str, Any] = {}
    with store.read() as conn:
        for output in conn.execute(
            sa.select(steps.c.output)
            .where(
                steps.c.execution_id == execution_id, steps.c.status == StepStatus.COMPLETED.value
            )
            .order_by(steps.c.done_seq)
        ).scalars():
            data.update(output or {})
    return data


def step_dependencies(store: StateStore, execution_id: str, key: str) -> list[str] | None:
    """The dependencies of step ``key`` of the execution, or None if it has no such step."""
    with store.read() as conn:
        found = conn.execute(
            sa.select(steps.c.depends_on).where(
                steps.c.execution_id == execution_id, steps.c.key == key
            )
        ).first()
    return None if found is None else list(found.depends_on)


def has_step(store: StateStore, execution_id: str, key: str) -> bool:
    """True if the execution has a step ``key``."""
    with store.read() as conn:
        return (
            conn.execute(
                sa.select(steps.c.key).where(
                    steps.c.execution_id == execution_id, steps.c.key == key
                )
            ).first()
            is not None
        )


def last_event_at(
    store: StateStore, execution_id: str, *, event_type: str | None = None
) -> float | None:
    """When the newest stored event of execution ``execution_id`` (of type ``event_type``
    when given) was made (unix seconds), or None (none stored, or pruned)."""
    query = (
        sa.select(events.c.ts)
        .where(events.c.execution_id == execution_id)
        .order_by(events.c.id.desc())
        .limit(1)
    )
    if event_type is not None:
        query = query.where(events.c.type == event_type)
    with store.read() as conn:
        ts = conn.execute(query).scalar()
    return None if ts is None else float(ts)


def events_data(store: StateStore, execution_id: str, event_type: str) -> list[dict[str, Any]]:
    """The data of the stored events of type ``event_type`` of execution ``execution_id``
    (its full id), oldest first; an event whose data is not an object is left out."""
    query = (
        sa.select(events.c.data)
        .where(events.c.execution_id == execution_id, events.c.type == event_type)
        .order_by(events.c.id)
    )
    with store.read() as conn:
        return [d for d in conn.execute(query).scalars() if isinstance(d, dict)]


def newest_event_id(store: StateStore) -> int:
    """The id of the newest stored event (0 when there is none); no event with a lower id
    becomes visible after it is read (see :func:`wait_for_event_writers`)."""
    with store.read() as conn:
        wait_for_event_writers(store, conn)
        return int(
            conn.execute(sa.select(sa.func.coalesce(sa.func.max(events.c.id), 0))).scalar_one()
        )


@dataclass
class JobCounts:
    """What the store holds, counted for monitoring: executions by (pipeline, status); steps by
    (pipeline, step, status); per (pipeline, step) the failed attempts and crashes summed, and
    the completed steps with their summed run time; workers by status."""

    executions: dict[tuple[str, str], int] = field(default_factory=dict)
    steps: dict[tuple[str, str, str], int] = field(default_factory=dict)
    failures: dict[tuple[str, str], float] = field(default_factory=dict)
    crashes: dict[tuple[str, str], float] = field(default_factory=dict)
    durations: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    workers: dict[str, int] = field(default_factory=dict)


def count_jobs(store: StateStore) -> JobCounts:
    """Count executions, steps and workers in one read (a scrape's worth, not per step)."""
    counts = JobCounts()
    joined = steps.join(executions, executions.c.id == steps.c.execution_id)
    with store.read() as conn:
        for r in conn.execute(
            sa.select(executions.c.pipeline, executions.c.status, sa.func.count()).group_by(
                executions.c.pipeline, executions.c.status
            )
        ):
            counts.executions[(r[0], r[1])] = r[2]
        for r in conn.execute(
            sa.select(executions.c.pipeline, steps.c.name, steps.c.status, sa.func.count())
            .select_from(joined)
            .group_by(executions.c.pipeline, steps.c.name, steps.c.status)
        ):
            counts.steps[(r[0], r[1], r[2])] = r[3]
        for r in conn.execute(
            sa.select(
                executions.c.pipeline,
                steps.c.name,
                sa.func.sum(steps.c.failures),
                sa.func.sum(steps.c.crashes),
            )
            .select_from(joined)
            .group_by(executions.c.pipeline, steps.c.name)
        ):
            counts.failures[(r[0], r[1])] = float(r[2] or 0)
            counts.crashes[(r[0], r[1])] = float(r[3] or 0)
        for r in conn.execute(
            sa.select(
                executions.c.pipeline,
                steps.c.name,
                sa.func.count(),
                sa.func.sum(steps.c.finished_at - steps.c.started_at),
            )
            .select_from(joined)
            .where(
                steps.c.status == StepStatus.COMPLETED.value,
                steps.c.started_at.is_not(None),
                steps.c.finished_at.is_not(None),
            )
            .group_by(executions.c.pipeline, steps.c.name)
        ):
            counts.durations[(r[0], r[1])] = (r[2], float(r[3] or 0.0))
        for r in conn.execute(
            sa.select(workers.c.status, sa.func.count()).group_by(workers.c.status)
        ):
            counts.workers[r[0]] = r[1]
    return counts


def completed_step_durations(
    store: StateStore, per_pipeline: int
) -> list[tuple[str, str, str, float]]:
    """``(pipeline, execution id, step name, seconds)`` of the completed steps of each job
    pipeline's newest ``per_pipeline`` completed executions, newest execution first, steps in
    the order they ran."""
    newest = (
        sa.select(executions.c.id, executions.c.pipeline, executions.c.created_at)
        .where(executions.c.status == "completed")
        .order_by(executions.c.created_at.desc())
        .limit(per_pipeline * 20)
    ).subquery()
    query = (
        sa.select(
            newest.c.pipeline, newest.c.id, steps.c.name, steps.c.started_at, steps.c.finished_at
        )
        .select_from(newest.join(steps, steps.c.execution_id == newest.c.id))
        .where(
            steps.c.status == "completed",
            steps.c.started_at.is_not(None),
            steps.c.finished_at.is_not(None),
        )
        .order_by(newest.c.created_at.desc(), newest.c.id, steps.c.seq)
    )
    out: list[tuple[str, str, str, float]] = []
    counted: dict[str, set[str]] = {}
    with store.read() as conn:
        for pipeline, execution_id, name, started, finished in conn.execute(query):
            seen = counted.setdefault(pipeline, set())
            if execution_id not in seen and len(seen) >= per_pipeline:
                continue
            seen.add(execution_id)
            out.append((pipeline, execution_id, name, max(0.0, finished - started)))
    return out
