"""Leases of distributed steps: what keeps a worker's claim alive, and what recovers the
steps nobody holds any more.

* :func:`renew` extends the leases of the attempts a worker runs and records its heartbeat;
  it reports the attempts it lost and the executions cancelled under them.
* :func:`sweep` (run by every worker) makes ready again the running steps whose lease expired
  or whose worker is dead, releases due retries (:func:`release_due`), republishes ready
  steps the broker lost, and marks ``lost`` the workers that are gone without a word (killed).
  Every write to a step is fenced by attempt, under the execution's lock
  (:class:`~framepipe.jobs.transitions.Transaction`).

An attempt taken back from its worker is a lost attempt, counted in the step's ``crashes``
whether the worker died (killed, ``os._exit``, a native crash; on another host: no heartbeat)
or lived but let the lease lapse (its event loop blocked by an ``async`` step doing blocking
work, or the process paused). ``max_crashes`` lost attempts fail the step as poison, with an
error that says how the last one was lost, what to do about it, and the worker's last output:
a step that keeps blocking its worker's event loop past the lease ends failed instead of
being taken over forever.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, steps, workers
from framepipe.events import Event
from framepipe.jobs.claims import held_by
from framepipe.jobs.execution_row import MODE, RUNNING, ExecutionRow
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.rounds import Delivery
from framepipe.jobs.rules import interrupted_status
from framepipe.jobs.transitions import Transaction
from framepipe.liveness import owner_is_dead, this_host

__all__ = ["release_due", "renew", "sweep"]


def release_due(store: StateStore) -> list[Delivery]:
    """Make the steps whose retry delay has passed ready again; return them to publish."""
    now = time.time()
    due = (
        steps.c.status == StepStatus.RETRYING.value,
        steps.c.next_attempt_at <= now,
        steps.c.execution_id.in_(
            sa.select(executions.c.id).where(
                executions.c.status == RUNNING, executions.c.mode == MODE
            )
        ),
    )
    with store.read() as conn:
        if conn.execute(sa.select(steps.c.key).where(*due).limit(1)).first() is None:
            return []
    with store.write() as conn:
        rows = conn.execute(sa.select(steps.c.execution_id, steps.c.key).where(*due)).all()
        out: list[Delivery] = []
        for r in rows:
            n = conn.execute(
                steps.update()
                .where(
                    steps.c.execution_id == r.execution_id,
                    steps.c.key == r.key,
                    steps.c.status == StepStatus.RETRYING.value,
                )
                .values(status=StepStatus.READY.value, ready_at=now, published_at=now)
            ).rowcount
            if n:
                out.append(Delivery(r.execution_id, r.key))
    return out


def renew(
    store: StateStore,
    worker: str,
    held: Sequence[tuple[str, str, int]],
    *,
    lease: float,
    concurrency: int,
    output_tail: str | None = None,
    status: str = "running",
    steps_done: int = 0,
) -> tuple[set[tuple[str, str, int]], set[str]]:
    """Renew the leases of ``held`` attempts and the worker's heartbeat.

    Returns the attempts whose lease was lost (another worker may run them: stop them and
    commit nothing) and the executions among them that were cancelled (stop their steps; a
    failed execution's running steps finish and keep their results)."""
    now = time.time()
    lost: set[tuple[str, str, int]] = set()
    with store.write(durable=False) as conn:
        for execution_id, key, attempt in held:
            n = conn.execute(
                steps.update()
                .where(*held_by(execution_id, key, attempt, worker))
                .values(lease_until=now + lease)
            ).rowcount
            if not n:
                lost.add((execution_id, key, attempt))
        host, _, rest = worker.partition(":")
        pid = int(rest.partition(":")[0] or 0)
        values: dict[str, Any] = {
            "status": status,
            "heartbeat_at": now,
            "concurrency": concurrency,
            "steps_done": steps_done,
        }
        if output_tail is not None:
            values["output_tail"] = output_tail
        if not conn.execute(
            workers.update().where(workers.c.id == worker).values(**values)
        ).rowcount:
            conn.execute(
                workers.insert().values(id=worker, host=host, pid=pid, started_at=now, **values)
            )
        ids = sorted({e for e, _k, _a in held})
        cancelled = ExecutionStatus.CANCELLED.value
        stopped = (
            set(
                conn.execute(
                    sa.select(executions.c.id).where(
                        executions.c.id.in_(ids),
                        sa.or_(
                            executions.c.status == cancelled, executions.c.stopping == cancelled
                        ),
                    )
                ).scalars()
            )
            if ids
            else set()
        )
    return lost, stopped


def sweep(
    store: StateStore,
    *,
    max_crashes: int,
    stale_after: float,
    republish_after: float,
    lease: float,
    spare_live: bool = False,
) -> tuple[list[Delivery], list[Event]]:
    """Recover what no worker holds: running steps whose lease expired or whose worker is
    dead (ready again, or failed as poison at ``max_crashes`` lost attempts), retries that
    are due, and ready steps not taken ``republish_after`` seconds after their last
    publication. A worker on another host is dead once its heartbeat is ``stale_after``
    seconds old; ``lease`` (the sweeping worker's ``lease_seconds``) is named in the errors.
    Returns the steps to publish and the committed events. Safe to run in every worker.

    ``spare_live``: the sweeping worker could not reach the store until a moment ago. Every
    worker's renewals and heartbeats failed in that outage alike, so leases that lapsed and
    heartbeats that went stale say nothing of their workers: only the steps of a worker that
    stopped, or whose process is gone (on this host), are taken back; the others are left to
    their workers to renew (the caller spares them for a lease)."""
    now = time.time()
    out = release_due(store)
    if not spare_live:
        _mark_lost(store, stale_after, now)
    with store.read() as conn:
        running = conn.execute(
            sa.select(
                steps.c.execution_id,
                steps.c.key,
                steps.c.attempt,
                steps.c.worker,
                steps.c.lease_until,
            ).where(
                steps.c.status == StepStatus.RUNNING.value,
                steps.c.execution_id.in_(
                    sa.select(executions.c.id).where(executions.c.mode == MODE)
                ),
            )
        ).all()
        holders = {r.worker for r in running if r.worker}
        known = (
            {
                r.id: r
                for r in conn.execute(
                    sa.select(
                        workers.c.id,
                        workers.c.heartbeat_at,
                        workers.c.status,
                        workers.c.output_tail,
                    ).where(workers.c.id.in_(sorted(holders)))
                )
            }
            if holders
            else {}
        )
    dead = {
        w
        for w in holders
        if (known[w].status == "stopped" if w in known else False)
        or owner_is_dead(
            w,
            # Spared: a heartbeat of now leaves only the pid check (same host) to tell.
            now if spare_live else known[w].heartbeat_at if w in known else None,
            stale_after,
        )
    }
    lapsed = [
        r
        for r in running
        if r.worker in dead
        or (not spare_live and r.lease_until is not None and r.lease_until < now)
    ]
    committed: list[Event] = []
    if lapsed:
        with store.write() as conn:
            tx = Transaction(store, conn, now)
            for r in sorted(lapsed, key=lambda r: (r.execution_id, r.key)):
                x = tx.lock(r.execution_id)
                if x is None:
                    continue
                info = known.get(r.worker)
                loss = _Loss(
                    _how(r.worker, info.status if info else None, r.worker in dead),
                    r.worker,
                    stale_after,
                    lease,
                    info.output_tail if info else None,
                )
                _reclaim(tx, x, r, loss, max_crashes)
                tx.settle(x)
            committed = tx.save()
        out.extend(tx.ready)
    forgotten = (
        steps.c.status == StepStatus.READY.value,
        steps.c.published_at < now - republish_after,
        steps.c.execution_id.in_(
            sa.select(executions.c.id).where(
                executions.c.status == RUNNING,
                executions.c.stopping.is_(None),
                executions.c.mode == MODE,
            )
        ),
    )
    with store.read() as conn:
        if conn.execute(sa.select(steps.c.key).where(*forgotten).limit(1)).first() is None:
            return out, committed
    with store.write(durable=False) as conn:
        stale: Sequence[Any] = conn.execute(
            sa.select(steps.c.execution_id, steps.c.key).where(*forgotten).limit(5000)
        ).all()
        for r in stale:
            conn.execute(
                steps.update()
                .where(steps.c.execution_id == r.execution_id, steps.c.key == r.key)
                .values(published_at=now)
            )
        out.extend(Delivery(r.execution_id, r.key) for r in stale)
    return out, committed


def _mark_lost(store: StateStore, stale_after: float, now: float) -> None:
    """Mark ``lost`` the workers that say they run but sent no heartbeat for ``stale_after``
    seconds and are gone (on this host: the process; elsewhere: that silence), so they are no
    longer counted as running. One that lives writes ``running`` again with its next beat."""
    silent = (
        workers.c.status == "running",
        workers.c.heartbeat_at < now - stale_after,
    )
    with store.read() as conn:
        rows = conn.execute(sa.select(workers.c.id, workers.c.heartbeat_at).where(*silent)).all()
    gone = [r.id for r in rows if owner_is_dead(r.id, r.heartbeat_at, stale_after)]
    if gone:
        with store.write(durable=False) as conn:
            conn.execute(
                workers.update().where(workers.c.id.in_(gone), *silent).values(status="lost")
            )


Lost = Literal["stopped", "died", "silent", "lapsed"]
"""How a worker lost its attempt: it stopped without handing it back; it died (its process is
gone, on this host); it went silent (another host's worker, no heartbeat: died, or its event
loop is blocked); or it lives but did not renew the lease in time (the lease lapsed)."""


def _how(worker: str | None, status: str | None, dead: bool) -> Lost:
    if not dead:
        return "lapsed"
    if status == "stopped" or not worker:
        return "stopped"
    return "died" if worker.partition(":")[0] == this_host() else "silent"


@dataclass(frozen=True)
class _Loss:
    """Why an attempt is taken back from ``worker``, and the words for it; ``tail`` is the
    worker's last output, if it kept one."""

    how: Lost
    worker: str | None
    stale_after: float
    lease: float
    tail: str | None

    @property
    def crashed(self) -> bool:
        """The worker is gone (or, another host's, silent): the attempt's event is
        ``step.crashed``; else ``step.lease_expired``."""
        return self.how != "lapsed"

    def why(self) -> str:
        w = self.worker
        if self.how == "died":
            return f"worker {w} died while running it (killed, os._exit or a native crash)"
        if self.how == "stopped":
            return f"worker {w} stopped without handing it back"
        if self.how == "silent":
            return (
                f"worker {w} (another host) sent no heartbeat for {self.stale_after:g} s "
                "while running it: it died (killed, os._exit or a native crash), or its event "
                "loop was blocked"
            )
        return (
            f"the lease of worker {w} expired: the worker is alive but did not renew it "
            f"within {self.lease:g} s (FRAMEPIPE_LEASE_SECONDS); its event loop was blocked "
            "(an async step doing blocking work) or the process was paused"
        )

    def advice(self) -> str:
        """What to do about a step that keeps losing its worker this way ('' if nothing)."""
        if self.how in ("lapsed", "silent"):
            return (
                "; an async step must not block the worker's event loop: run blocking work in "
                "a thread (await asyncio.to_thread(...)), or raise FRAMEPIPE_LEASE_SECONDS "
                "above its longest blocking call"
            )
        return ""


def _reclaim(tx: Transaction, x: ExecutionRow, r: Any, loss: _Loss, max_crashes: int) -> None:
    """Take attempt ``r`` back from its worker: ready again (or the status its stopping
    execution gives), counted as a lost attempt; failed as poison at ``max_crashes``."""
    fenced = held_by(x.id, r.key, r.attempt, r.worker)
    row = tx.conn.execute(sa.select(steps.c.crashes).where(*fenced)).first()
    if row is None:
        return
    crashes = row.crashes + 1
    why = loss.why()
    if crashes >= max_crashes:
        if loss.crashed:
            text = (
                f"StepCrashedError: pipeline '{x.pipeline}', step '{r.key}': {why}; crash "
                f"{crashes} of at most {max_crashes}, failed as poison{loss.advice()}"
            )
            cause = f"crashed its worker {crashes} times; failed as poison"
        else:
            text = (
                f"StepCrashedError: pipeline '{x.pipeline}', step '{r.key}': attempt "
                f"{r.attempt} lost its lease: {why}; {crashes} of at most {max_crashes} "
                "attempts lost (to lapsed leases or dead workers, FRAMEPIPE_MAX_STEP_CRASHES), "
                f"failed as poison{loss.advice()}"
            )
            cause = (
                f"lost its worker {crashes} times, the last time its lease of "
                f"{loss.lease:g} s lapsed while its worker's event loop was blocked (or the "
                "process paused); failed as poison"
            )
        if loss.tail:
            text += f"\n\nlast output of the worker:\n{loss.tail}"
        if tx.conn.execute(
            steps.update()
            .where(*fenced)
            .values(
                status=StepStatus.FAILED.value,
                crashes=crashes,
                error=text,
                finished_at=tx.now,
                lease_until=None,
            )
        ).rowcount:
            x.active -= 1
            tx.emit(
                "step.failed",
                x,
                r.key,
                {"attempt": r.attempt, "crashes": crashes, "error": text.splitlines()[0]},
            )
            tx.fail_execution(x, f"pipeline '{x.pipeline}': step {r.key} {cause}")
        return
    why += f"; attempt {r.attempt} lost, {crashes} of at most {max_crashes}"
    status = (
        StepStatus.READY
        if x.running
        else interrupted_status(ExecutionStatus(x.stopping or x.status))
    )
    if not tx.conn.execute(
        steps.update()
        .where(*fenced)
        .values(
            status=status.value,
            crashes=crashes,
            error=why,
            lease_until=None,
            worker=None,
            ready_at=tx.now,
            published_at=tx.now,
        )
    ).rowcount:
        return
    if status is StepStatus.READY:
        tx.ready.append(Delivery(x.id, r.key))
    else:
        x.active -= 1
    tx.emit(
        "step.crashed" if loss.crashed else "step.lease_expired",
        x,
        r.key,
        {"attempt": r.attempt, "crashes": crashes, "error": why},
    )
