"""The queries of a distributed execution's step graph: its steps' rows and the dependency
edges between them (``fp_steps``, ``fp_step_deps``), inside a transition's transaction.

Guarantees:

* Every ``IN`` list holds at most :data:`CHUNK` keys, however many steps an execution has.
* :func:`insert` writes new steps with their edges together, and on PostgreSQL refreshes the
  tables' statistics when an execution's step count passes 256, 1024, 4096, ... (x4), so key
  lookups stay index lookups while a young table grows.
* :func:`count_down_dependents` counts each dependent down once per finished step it waited
  for, and answers only the pending ones that now wait for nothing: neither a step key nor
  every instance of a step name.
* Reads and writes take the caller's connection: they are made under the execution's lock
  that :class:`~framepipe.jobs.transitions.Transaction` holds.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore, step_deps, steps
from framepipe.jobs.models import StepStatus
from framepipe.jobs.rules import StepPlan, new_step_row

__all__ = [
    "CHUNK",
    "count_down_dependents",
    "edges",
    "first_pending",
    "insert",
    "name_waiters",
    "statuses",
    "step_row",
]

CHUNK = 500
"""The most keys one ``IN`` list of these queries holds."""


def statuses(conn: sa.Connection, execution_id: str, keys: list[str]) -> dict[str, str]:
    """The status of each of ``keys`` that the execution has as a step."""
    found: dict[str, str] = {}
    for i in range(0, len(keys), CHUNK):
        chunk = keys[i : i + CHUNK]
        found.update(
            (r.key, r.status)
            for r in conn.execute(
                sa.select(steps.c.key, steps.c.status).where(
                    steps.c.execution_id == execution_id, steps.c.key.in_(chunk)
                )
            )
        )
    return found


def step_row(
    execution_id: str,
    s: StepPlan,
    status: StepStatus,
    *,
    waiting: int,
    seq: int,
    created_at: float,
    now: float,
) -> dict[str, Any]:
    """The row of a new step planned as ``s``, ``status`` (a ready one is ready and published
    from ``now``), waiting for ``waiting`` unfinished steps, ``seq`` in its execution."""
    ready = now if status is StepStatus.READY else None
    return {
        **new_step_row(execution_id, s, status, seq=seq, created_at=created_at),
        "ready_at": ready,
        "waiting": waiting,
        "lease_until": None,
        "worker": None,
        "published_at": ready,
    }


def edges(execution_id: str, s: StepPlan) -> list[dict[str, Any]]:
    """The dependency edges of a new step planned as ``s``: one per step key it waits for,
    then one per step name."""
    return [
        *(
            {"execution_id": execution_id, "dep": d, "step_key": s.key, "kind": "key"}
            for d in s.key_deps
        ),
        *(
            {"execution_id": execution_id, "dep": d, "step_key": s.key, "kind": "name"}
            for d in s.name_deps
        ),
    ]


def _crossed(before: int, after: int) -> bool:
    """True when an execution's step count passed 256, 1024, 4096, ... (x4)."""
    mark = 256
    while mark <= after:
        if before < mark:
            return True
        mark *= 4
    return False


def insert(
    store: StateStore,
    conn: sa.Connection,
    rows: list[dict[str, Any]],
    new_edges: list[dict[str, Any]],
    *,
    steps_before: int,
) -> None:
    """Insert new step ``rows`` and their edges into an execution that had ``steps_before``
    steps."""
    conn.execute(steps.insert(), rows)
    if new_edges:
        conn.execute(step_deps.insert(), new_edges)
    if store.dialect == "postgresql" and _crossed(steps_before, steps_before + len(rows)):
        # A burst of new steps in a young table: without fresh statistics PostgreSQL
        # plans key lookups as scans of the whole execution (autovacuum may take a
        # minute to analyze), which makes every claim and completion O(steps).
        conn.exec_driver_sql("ANALYZE fp_steps, fp_step_deps")


def count_down_dependents(conn: sa.Connection, execution_id: str, finished: list[str]) -> list[str]:
    """Count down the steps waiting for the ``finished`` ones; the pending ones that wait for
    nothing any more (no step key, no step name)."""
    waiting: dict[str, int] = defaultdict(int)
    with_names: set[str] = set()
    dependent = step_deps.alias("dependent")
    for i in range(0, len(finished), CHUNK):
        chunk = finished[i : i + CHUNK]
        # The dependents of these steps, and (in the same round trip) which of them also
        # wait for every instance of some step name.
        for r in conn.execute(
            sa.select(step_deps.c.step_key, step_deps.c.kind).where(
                step_deps.c.execution_id == execution_id,
                sa.or_(
                    sa.and_(step_deps.c.kind == "key", step_deps.c.dep.in_(chunk)),
                    sa.and_(
                        step_deps.c.kind == "name",
                        step_deps.c.step_key.in_(
                            sa.select(dependent.c.step_key).where(
                                dependent.c.execution_id == execution_id,
                                dependent.c.kind == "key",
                                dependent.c.dep.in_(chunk),
                            )
                        ),
                    ),
                ),
            )
        ):
            if r.kind == "key":
                waiting[r.step_key] += 1
            else:
                with_names.add(r.step_key)
    if not waiting:
        return []
    by_count: dict[int, list[str]] = defaultdict(list)
    for key, n in waiting.items():
        by_count[n].append(key)
    zero: list[str] = []
    for n, keys in by_count.items():
        for i in range(0, len(keys), CHUNK):
            zero.extend(
                r.key
                for r in conn.execute(
                    steps.update()
                    .where(
                        steps.c.execution_id == execution_id, steps.c.key.in_(keys[i : i + CHUNK])
                    )
                    .values(waiting=steps.c.waiting - n)
                    .returning(steps.c.key, steps.c.waiting, steps.c.status)
                )
                if r.waiting == 0 and r.status == StepStatus.PENDING.value
            )
    return [k for k in zero if k not in with_names]


def name_waiters(conn: sa.Connection, execution_id: str) -> tuple[dict[str, list[str]], set[str]]:
    """The pending steps that wait only for every instance of some step names, each with those
    names; and which of the names have an instance not completed yet."""
    waiters: dict[str, list[str]] = defaultdict(list)
    for r in conn.execute(
        sa.select(step_deps.c.step_key, step_deps.c.dep)
        .join(
            steps,
            sa.and_(
                steps.c.execution_id == step_deps.c.execution_id,
                steps.c.key == step_deps.c.step_key,
            ),
        )
        .where(
            step_deps.c.execution_id == execution_id,
            step_deps.c.kind == "name",
            steps.c.status == StepStatus.PENDING.value,
            steps.c.waiting == 0,
        )
    ):
        waiters[r.step_key].append(r.dep)
    names = {d for deps in waiters.values() for d in deps}
    open_names = set()
    if names:
        open_names = {
            r.name
            for r in conn.execute(
                sa.select(steps.c.name)
                .where(
                    steps.c.execution_id == execution_id,
                    steps.c.name.in_(names),
                    steps.c.status != StepStatus.COMPLETED.value,
                )
                .distinct()
            )
        }
    return waiters, open_names


def first_pending(
    conn: sa.Connection, execution_id: str, limit: int
) -> list[tuple[str, list[str]]]:
    """The first ``limit`` pending steps of the execution in creation order, each with what it
    depends on."""
    return [
        (r.key, r.depends_on)
        for r in conn.execute(
            sa.select(steps.c.key, steps.c.depends_on)
            .where(steps.c.execution_id == execution_id, steps.c.status == StepStatus.PENDING.value)
            .order_by(steps.c.seq)
            .limit(limit)
        )
    ]
