"""Reading the job records in the state store: executions, their steps and their events.

These are the reads the job client (:mod:`framepipe.jobs.client`), the engine, a worker's step
context, the event feed and the charts make, so the command line, the HTTP service,
:func:`~framepipe.run_pipeline` and the examples never write SQL. The other queries of the jobs
tables are in the modules named for what they do: the engine's batched writes
(:mod:`framepipe.jobs.batches`), an engine's hold on an execution
(:mod:`framepipe.jobs.ownership`), cancelling (:mod:`framepipe.jobs.cancel_requests`), the
monitoring counts (:mod:`framepipe.jobs.counts`), the workers' transitions
(:mod:`framepipe.jobs.dispatch`, :mod:`framepipe.jobs.transitions` and the modules it uses),
the recovery of dead engines' executions (:mod:`framepipe.jobs.recovery`) and the ledger
(:mod:`framepipe.jobs.ledger`); no other module queries these tables (``tests/test_layers.py``
holds it so).

Guarantees:

* An execution is found by its id or a unique prefix of at least 4 characters, in any case, alike
  on SQLite and PostgreSQL; an unknown or ambiguous one is :class:`ExecutionNotFoundError`.
* Steps come in creation order, and an execution's data merges its completed steps' outputs in
  completion order (later outputs win), as a step's ``ctx.data`` sees them.
* Events come oldest first, and no event with a lower id becomes visible after a read returned
  a higher one (:func:`wait_for_event_writers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore, events, executions, steps
from framepipe.backends.state.event_log import wait_for_event_writers
from framepipe.backends.state.schema import EVENT_ID_MAX
from framepipe.errors import ExecutionNotFoundError
from framepipe.events import Event
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepInfo, StepStatus

__all__ = [
    "completed_data",
    "completed_step_durations",
    "events_data",
    "execution_mode",
    "execution_status",
    "find_execution",
    "get_execution",
    "has_step",
    "last_event_at",
    "list_events",
    "list_executions",
    "load_rows",
    "newest_event_id",
    "step_dependencies",
]


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


def execution_mode(store: StateStore, execution_id: str) -> str:
    """Where the execution with the full id ``execution_id`` runs: ``embedded`` or
    ``workers``."""
    with store.read() as conn:
        return str(
            conn.execute(
                sa.select(executions.c.mode).where(executions.c.id == execution_id)
            ).scalar_one()
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
