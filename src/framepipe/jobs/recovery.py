"""Recovery of executions whose engine died (killed, crashed, or a step killed the process).

Only executions of an embedded engine (mode ``local``) have an owner; distributed ones are
recovered step by step by the workers' lease sweep (:mod:`framepipe.jobs.dispatch`).

An execution still marked ``running`` whose owner is gone is marked ``interrupted``; the steps
it was running go back to ``pending`` with their ``crashes`` counted, and a step that has now
killed its process ``max_step_crashes`` times is failed as crashed (a poison step) instead of
being run again. Completed steps are untouched, so ``retry`` resumes where the run stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, steps
from framepipe.config import Settings
from framepipe.events import Event
from framepipe.jobs.batches import EXECUTION_COLUMNS, Batch, write_batch_in
from framepipe.jobs.journal import journal_path, read_unfinished
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.liveness import owner_is_dead

__all__ = ["recover_for", "recover_orphans"]


def recover_for(store: StateStore, settings: Settings) -> list[Event]:
    """:func:`recover_orphans` with the thresholds and journal folder of ``settings``."""
    return recover_orphans(
        store,
        max_step_crashes=settings.max_step_crashes,
        stale_after=max(10.0, 5 * settings.heartbeat_interval),
        journal_dir=settings.run_dir,
    )


def recover_orphans(
    store: StateStore,
    *,
    max_step_crashes: int = 3,
    stale_after: float = 30.0,
    journal_dir: Path | None = None,
) -> list[Event]:
    """Mark executions of dead engines interrupted (or failed, for poison steps).

    A step counts as crashed if the store shows it running, or if the dead engine's journal
    (in ``journal_dir``, same host) shows it started and never ended. Returns the committed
    events; safe to call from several processes at once."""
    with store.read() as conn:
        candidates = conn.execute(
            sa.select(executions.c.id, executions.c.owner, executions.c.heartbeat_at).where(
                executions.c.status == ExecutionStatus.RUNNING.value, executions.c.mode == "local"
            )
        ).all()
    dead = [r for r in candidates if owner_is_dead(r.owner, r.heartbeat_at, stale_after)]
    committed: list[Event] = []
    owners = {r.owner for r in dead if r.owner}
    started = {
        owner: read_unfinished(journal_dir, owner) if journal_dir else set() for owner in owners
    }
    for r in dead:
        in_flight = {key for e, key in started.get(r.owner, set()) if e == r.id}
        committed.extend(_recover_one(store, r.id, max_step_crashes, in_flight))
    if journal_dir is not None:
        for owner in owners:
            journal_path(journal_dir, owner).unlink(missing_ok=True)
    return committed


def _recover_one(
    store: StateStore, execution_id: str, max_step_crashes: int, in_flight: set[str]
) -> list[Event]:
    now = time.time()
    with store.read() as conn:
        x = conn.execute(sa.select(executions).where(executions.c.id == execution_id)).one()
        running = conn.execute(
            sa.select(steps).where(
                steps.c.execution_id == execution_id,
                steps.c.status.in_(
                    [StepStatus.RUNNING.value, StepStatus.READY.value, StepStatus.RETRYING.value]
                ),
            )
        ).all()
    batch = Batch()
    crashed: list[str] = []
    poisoned: list[str] = []
    for row in running:
        update: dict[str, Any] = {c: row._mapping[c] for c in row._mapping}
        update["status"] = StepStatus.PENDING.value
        update["next_attempt_at"] = None
        if row.status == StepStatus.RUNNING.value or row.key in in_flight:
            crashes = row.crashes + 1
            update["crashes"] = crashes
            update["finished_at"] = now
            crashed.append(row.key)
            text = (
                f"the process running this step (owner {x.owner}) died without the step "
                f"raising (killed, os._exit or a native crash); crash {crashes}"
            )
            update["error"] = text
            if crashes >= max_step_crashes:
                update["status"] = StepStatus.FAILED.value
                update["error"] = (
                    f"StepCrashedError: pipeline '{x.pipeline}', step "
                    f"'{row.key}': {text} of at most {max_step_crashes}"
                )
                poisoned.append(row.key)
            batch.events.append(
                Event(
                    "step.failed" if row.key in poisoned else "step.crashed",
                    now,
                    execution_id,
                    row.key,
                    {"error": update["error"], "crashes": crashes},
                )
            )
        batch.steps.append(update)
    status = ExecutionStatus.FAILED if poisoned else ExecutionStatus.INTERRUPTED
    if poisoned:
        error = (
            f"pipeline '{x.pipeline}': step(s) {', '.join(poisoned)} crashed their process "
            f"{max_step_crashes} times; failed as poison"
        )
    elif crashed:
        error = (
            f"pipeline '{x.pipeline}': the process {x.owner} died while step(s) "
            f"{', '.join(crashed)} ran; retry to resume"
        )
    else:
        error = f"pipeline '{x.pipeline}': the process {x.owner} stopped; retry to resume"
    row_x = {c: x._mapping[c] for c in ("id", *EXECUTION_COLUMNS)}
    row_x.update(status=status.value, error=error, finished_at=now)
    batch.executions.append(row_x)
    batch.events.append(
        Event(
            f"execution.{status.value}",
            now,
            execution_id,
            None,
            {"error": error, "crashed_steps": crashed},
        )
    )
    # One transaction: only if still running under the dead owner (another process may have
    # recovered it first), and nothing can take it over between the check and the writes.
    with store.write() as conn:
        claimed = conn.execute(
            executions.update()
            .where(
                executions.c.id == execution_id,
                executions.c.status == ExecutionStatus.RUNNING.value,
                executions.c.owner == x.owner,
            )
            .values(status=status.value)
        ).rowcount
        if not claimed:
            return []
        return write_batch_in(store, conn, batch)
