"""A worker's claim of a step, and the fence every write of a claimed attempt passes.

Guarantees:

* :func:`claim_statement` claims only steps that are still ``ready``: a new attempt, running
  under the claiming worker with a lease; both ways a worker claims use it.
* :func:`held_by` fences every write of a running attempt by its attempt number and, when the
  writer is named, by the worker that claimed it: a worker whose claim was lost (its lease
  taken back, or the claim lost in a database crash and made again by another worker) writes
  nothing.
* :func:`held_attempts` reads, under the same fence, which of an execution's attempts are
  still held (locking their rows on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sqlalchemy as sa

from framepipe.backends.state import StateStore, steps
from framepipe.jobs.models import StepStatus
from framepipe.jobs.step_graph import CHUNK

__all__ = ["claim_statement", "held_attempts", "held_by"]


def held_by(
    execution_id: str, key: str, attempt: int, worker: str | None
) -> tuple[sa.ColumnElement[bool], ...]:
    """The rule every write of a running attempt is fenced by: the step still runs
    ``attempt`` and, when the writer is named, under ``worker``'s claim.

    The attempt number alone is not enough: a claim commits without waiting for the WAL
    flush, so after a PostgreSQL crash that lost one, another worker can claim the step again
    under the same number. The worker condition leaves the step to that second claimant: the
    first one's lease renewal fails (it stops the run) and its outcome, progress and spawns
    are discarded. When the same worker claims it again, the worker does not start a second
    run of an attempt it runs (:class:`~framepipe.jobs.worker.Worker`)."""
    rule = (
        steps.c.execution_id == execution_id,
        steps.c.key == key,
        steps.c.attempt == attempt,
        steps.c.status == StepStatus.RUNNING.value,
    )
    return rule if worker is None else (*rule, steps.c.worker == worker)


def claim_statement(
    execution_id: str, keys: Iterable[str], worker: str, lease: float, now: float
) -> sa.Update:
    """The claim of those ``keys`` of an execution that are still ``ready``, by ``worker``: a
    new attempt, running with a lease until ``now + lease``; returns the claimed rows. Both
    ways a worker claims (from the broker's deliveries, and in the commit that made them
    ready) use it, with their own further conditions."""
    return (
        steps.update()
        .where(
            steps.c.execution_id == execution_id,
            steps.c.key.in_(sorted(keys)),
            steps.c.status == StepStatus.READY.value,
        )
        .values(
            status=StepStatus.RUNNING.value,
            attempt=steps.c.attempt + 1,
            worker=worker,
            lease_until=now + lease,
            started_at=now,
            message=None,
            next_attempt_at=None,
        )
        .returning(
            steps.c.execution_id,
            steps.c.key,
            steps.c.name,
            steps.c.params,
            steps.c.attempt,
            steps.c.weight,
            steps.c.progress,
            steps.c.ready_at,
        )
    )


def held_attempts(
    store: StateStore,
    conn: sa.Connection,
    execution_id: str,
    keys: Sequence[str],
    holder: str | None,
) -> dict[tuple[str, int], float | None]:
    """The attempts of steps ``keys`` of the execution that still run (under ``holder``'s
    claim when it is named), each ``(key, attempt)`` with the time it started."""
    held: dict[tuple[str, int], float | None] = {}
    for i in range(0, len(keys), CHUNK):
        query = sa.select(steps.c.key, steps.c.attempt, steps.c.started_at).where(
            steps.c.execution_id == execution_id,
            steps.c.key.in_(keys[i : i + CHUNK]),
            steps.c.status == StepStatus.RUNNING.value,
        )
        if holder is not None:
            query = query.where(steps.c.worker == holder)
        if store.dialect == "postgresql":
            query = query.with_for_update()
        held.update(((r.key, r.attempt), r.started_at) for r in conn.execute(query))
    return held
