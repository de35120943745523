"""What the jobs tables hold, counted for monitoring (the metrics' scrape).

Guarantees: :func:`count_jobs` counts executions, steps and workers in one read, a scrape's
worth of queries whatever the number of steps; a sum over no rows counts as 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, steps, workers
from framepipe.jobs.models import StepStatus

__all__ = ["JobCounts", "count_jobs"]


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
