"""Distributed executions in the state store: every transition a worker commits.

The database is the source of truth of a distributed execution (``mode = 'workers'``); the
broker only rings the bell (:mod:`framepipe.jobs.delivery`). Guarantees:

* **Atomic scheduling.** A step's completion, its dependents becoming ``ready``, the
  execution's counters (unfinished, active, weighted progress) and the events are one
  transaction, serialised per execution by a lock on its row (``SELECT ... FOR UPDATE`` on
  PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises all writers). A ``ready`` row *is* the
  outbox: a ready step that never reached the broker (crash after commit, broker restart) is
  published again by the sweep (:func:`~framepipe.jobs.leases.sweep`), and a duplicate
  delivery is harmless because a claim only takes a ``ready`` row.
* **Fencing.** A claim increments the step's ``attempt``; every later write of that attempt
  (progress, spawn, outcome, lease renewal) matches ``attempt = :mine AND status = 'running'``.
  A worker that lost its lease (killed, paused, cut off) writes nothing when it comes back: a
  step completes once.
* **Leases.** A running step holds ``lease_until``, renewed by its worker's heartbeat. When it
  expires, or its worker is known dead (same host: the process is gone; elsewhere: no heartbeat
  for ``stale_after`` seconds), the sweep makes the step ready again; a dead worker counts
  as a crash, and so does a lease that lapsed while its worker lived; ``max_step_crashes``
  crashes fail the step as poison with the tail of the worker's output.

This module holds the operations a submitter and a worker's rounds open a transaction for
(submit, resume, cancel, claim, commit a round); the lease upkeep (renew, sweep, due retries)
is :mod:`framepipe.jobs.leases`.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, step_deps, steps
from framepipe.backends.state.event_log import insert_events
from framepipe.errors import ExecutionNotFoundError
from framepipe.events import Event
from framepipe.jobs.claims import claim_statement, held_by
from framepipe.jobs.execution_row import MODE, RUNNING, ExecutionRow
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import find_execution
from framepipe.jobs.retry_checks import check_status_retryable
from framepipe.jobs.rounds import (
    Claimed,
    Delivery,
    Round,
    RoundResult,
    Spawn,
)
from framepipe.jobs.rules import created_data, plan_step
from framepipe.jobs.transitions import Transaction
from framepipe.untrusted import json_size

__all__ = [
    "KNOWN_EXECUTIONS",
    "KNOWN_INPUTS_BYTES",
    "MODE",
    "Known",
    "cancel",
    "claim",
    "commit_round",
    "resume",
    "submit",
]


# -- submission, resume and cancel ---------------------------------------------------------------


def submit(
    store: StateStore,
    pipeline: Pipeline,
    inputs: Mapping[str, Any],
    *,
    ref: str | None,
    input_roots: Sequence[str] | None = None,
    traceparent: str | None = None,
) -> tuple[str, list[Delivery], list[Event]]:
    """Create a distributed execution of ``pipeline``; return its id, the steps to publish and
    the committed events. Nothing runs until a worker takes a published step.

    ``input_roots`` is recorded as given (the engine resolved it:
    :func:`~framepipe.jobs.inputs.recorded_roots`; None: unrestricted); nothing after this
    writes it, and workers hand it to each step with the inputs. So is ``traceparent`` (the
    submit's span, parent of every step attempt's span; None: not traced)."""
    now = time.time()
    execution_id = uuid.uuid4().hex
    with store.write() as conn:
        conn.execute(
            executions.insert().values(
                id=execution_id,
                pipeline=pipeline.name,
                pipeline_ref=ref or pipeline.ref,
                status=RUNNING,
                inputs=dict(inputs),
                input_roots=None if input_roots is None else list(input_roots),
                progress=0.0,
                error=None,
                owner=None,
                heartbeat_at=None,
                cancel_requested=False,
                runs=1,
                created_at=now,
                started_at=now,
                finished_at=None,
                mode=MODE,
                traceparent=traceparent,
            )
        )
        tx = Transaction(store, conn, now)
        x = tx.lock(execution_id)
        assert x is not None
        tx.emit("execution.created", x, None, created_data(pipeline.name, inputs))
        tx.emit("execution.started", x, None, {"run": 1, "mode": MODE})
        tx.insert_steps(
            x,
            [plan_step(pipeline, s.name, {}, s.name) for s in pipeline.initial_steps],
            spawned=False,
        )
        tx.settle(x)
        committed = tx.save()
    return execution_id, tx.ready, committed


def resume(
    store: StateStore, execution_id: str, *, ref: str | None = None
) -> tuple[str, list[Delivery], list[Event]]:
    """Resume a failed, cancelled or interrupted distributed execution from where it stopped:
    completed steps are kept, the others run again with fresh retry budgets (crash counts are
    kept); its inputs and recorded ``input_roots`` are kept. ``ref``, when given, becomes the
    pipeline reference stored with it, in the same transaction, so the workers load the
    pipeline from there from this run on (the code moved; the caller checked it loads a
    pipeline of the execution's name). Returns the full id, the steps to publish and the
    committed events."""
    execution_id = find_execution(store, execution_id)
    now = time.time()
    with store.write() as conn:
        tx = Transaction(store, conn, now)
        x = tx.lock(execution_id)
        if x is None:  # pruned (framepipe jobs prune) since it was found
            raise ExecutionNotFoundError(
                f"execution {execution_id[:12]} was deleted (pruned) meanwhile",
                execution_id=execution_id,
            )
        check_status_retryable(execution_id, x.pipeline, ExecutionStatus(x.status), x.owner)
        conn.execute(
            steps.update()
            .where(
                steps.c.execution_id == execution_id,
                steps.c.status.notin_([StepStatus.COMPLETED.value, StepStatus.RUNNING.value]),
            )
            .values(
                status=StepStatus.PENDING.value,
                failures=0,
                error=None,
                next_attempt_at=None,
                ready_at=None,
            )
        )
        dep = steps.alias("dep")
        unmet = (
            sa.select(sa.func.count())
            .select_from(
                step_deps.join(
                    dep,
                    sa.and_(
                        dep.c.execution_id == step_deps.c.execution_id, dep.c.key == step_deps.c.dep
                    ),
                )
            )
            .where(
                step_deps.c.execution_id == steps.c.execution_id,
                step_deps.c.step_key == steps.c.key,
                step_deps.c.kind == "key",
                dep.c.status != StepStatus.COMPLETED.value,
            )
            .scalar_subquery()
        )
        conn.execute(
            steps.update()
            .where(steps.c.execution_id == execution_id, steps.c.status == StepStatus.PENDING.value)
            .values(waiting=unmet)
        )
        totals = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.sum(sa.case((steps.c.status != StepStatus.COMPLETED.value, 1), else_=0)),
                sa.func.sum(sa.case((steps.c.status == StepStatus.RUNNING.value, 1), else_=0)),
                sa.func.coalesce(sa.func.sum(steps.c.weight * steps.c.progress), 0.0),
                sa.func.coalesce(sa.func.sum(steps.c.weight), 0.0),
            ).where(steps.c.execution_id == execution_id)
        ).one()
        x.unfinished, x.active = int(totals[1] or 0), int(totals[2] or 0)
        x.wsum, x.wtotal = float(totals[3]), float(totals[4])
        x.status, x.error, x.finished_at = RUNNING, None, None
        changed: dict[str, Any] = {"runs": executions.c.runs + 1, "cancel_requested": False}
        if ref:
            changed["pipeline_ref"] = x.pipeline_ref = ref
        runs = conn.execute(
            executions.update()
            .where(executions.c.id == execution_id)
            .values(**changed)
            .returning(executions.c.runs)
        ).scalar_one()
        with_names = sa.select(step_deps.c.step_key).where(
            step_deps.c.execution_id == execution_id, step_deps.c.kind == "name"
        )
        free = list(
            conn.execute(
                sa.select(steps.c.key)
                .where(
                    steps.c.execution_id == execution_id,
                    steps.c.status == StepStatus.PENDING.value,
                    steps.c.waiting == 0,
                    steps.c.key.notin_(with_names),
                )
                .order_by(steps.c.seq)
            ).scalars()
        )
        tx.emit("execution.retried", x, None, {"run": runs, "mode": MODE})
        tx.make_ready(x, free)
        tx.settle(x)
        committed = tx.save()
    return execution_id, tx.ready, committed


def cancel(store: StateStore, execution_id: str) -> list[Event]:
    """Cancel a running distributed execution: its waiting steps end ``cancelled`` at once;
    running ones are stopped by their workers at their next heartbeat, and the execution is
    ``cancelled`` when the last of them has ended (at once if none runs)."""
    with store.write() as conn:
        tx = Transaction(store, conn, time.time())
        x = tx.lock(execution_id)
        if x is None:
            return []
        tx.cancel_execution(x, "cancelled by request")
        tx.settle(x)
        return tx.save()


# -- what workers commit ---------------------------------------------------------------------


Known = dict[str, tuple[str, str | None, dict[str, Any], list[str] | None, str | None, int, int]]
"""What :func:`claim` caches per execution id: (pipeline, reference, inputs, input_roots,
traceparent, runs, size of the inputs as JSON). Only a resume changes any of them (the
reference, when it is given a new one), and it counts a new run: an entry is used only while
the execution's ``runs`` is still the one cached. The cache is kept to the
:data:`KNOWN_EXECUTIONS` executions last claimed from and :data:`KNOWN_INPUTS_BYTES` of
their inputs (the least recently claimed from go first; the entries of one claim are kept
whatever their size), so a long-running worker does not hold the inputs of every execution
it ever ran (each may be up to ``max_inputs_bytes``)."""

KNOWN_EXECUTIONS = 1000
"""At most this many executions in a :data:`Known` cache."""
KNOWN_INPUTS_BYTES = 16 * 1024 * 1024
"""At most this many bytes of inputs (as JSON) in a :data:`Known` cache."""


def claim(
    store: StateStore,
    worker: str,
    deliveries: Sequence[Delivery],
    *,
    lease: float,
    known: Known | None = None,
) -> tuple[list[Claimed], list[Event]]:
    """Take the delivered steps that are still ready in a running execution, each as a new
    attempt with a lease of ``lease`` seconds. Stale deliveries are skipped. ``known`` caches
    each execution's (pipeline, reference, inputs, input_roots, traceparent, runs); it is
    filled here (one query for the executions not in it, none for those that are). A cached
    execution's steps are claimed only while its ``runs`` is the one cached; when that claims
    nothing (resumed since, perhaps with a new reference, or a stale delivery), the entry is
    dropped and the claim made again without it.

    Not a durable commit: if the database loses it in a crash, the step is ready again and
    this attempt's later writes are fenced off. If another worker claimed the step again
    first, under the same attempt number, the step is that worker's: this one's writes are
    fenced by its claim (:func:`~framepipe.jobs.claims.held_by`), its next lease renewal
    fails and it stops the run (a run that ended before that has run twice, as a crash
    re-runs a step anyway). Claimed again by the same worker, the step is not started a
    second time there."""
    if not deliveries:
        return [], []
    with store.write(durable=False) as conn:
        return _claim_in(
            store, conn, worker, deliveries, lease, time.time(), {} if known is None else known
        )


def _claim_in(
    store: StateStore,
    conn: sa.Connection,
    worker: str,
    deliveries: Sequence[Delivery],
    lease: float,
    now: float,
    known: Known,
) -> tuple[list[Claimed], list[Event]]:
    by_exec: dict[str, set[str]] = defaultdict(set)
    for d in deliveries:
        by_exec[d.execution_id].add(d.key)
    running = sa.select(executions.c.id).where(
        executions.c.status == RUNNING, executions.c.stopping.is_(None)
    )
    rows: list[Any] = []
    for execution_id in sorted(by_exec):
        claim = claim_statement(execution_id, by_exec[execution_id], worker, lease, now)
        cached = known.pop(execution_id, None)
        if cached is not None:
            same_run = running.where(executions.c.runs == cached[5])
            got = conn.execute(claim.where(steps.c.execution_id.in_(same_run))).all()
            if got:
                rows.extend(got)
                known[execution_id] = cached  # the most recently claimed from, last
                continue
        rows.extend(conn.execute(claim.where(steps.c.execution_id.in_(running))).all())
    if not rows:
        return [], []
    missing = {r.execution_id for r in rows} - known.keys()
    if missing:
        for x in conn.execute(
            sa.select(
                executions.c.id,
                executions.c.pipeline,
                executions.c.pipeline_ref,
                executions.c.inputs,
                executions.c.input_roots,
                executions.c.traceparent,
                executions.c.runs,
            ).where(executions.c.id.in_(sorted(missing)))
        ):
            known[x.id] = (
                x.pipeline,
                x.pipeline_ref,
                x.inputs,
                x.input_roots,
                x.traceparent,
                x.runs,
                json_size(x.inputs),
            )
    claimed = []
    for r in rows:
        pipeline, ref, inputs, roots, traceparent, _runs, _size = known[r.execution_id]
        claimed.append(
            Claimed(
                execution_id=r.execution_id,
                key=r.key,
                name=r.name,
                params=r.params,
                attempt=r.attempt,
                weight=r.weight,
                progress=r.progress,
                pipeline=pipeline,
                pipeline_ref=ref,
                inputs=inputs,
                input_roots=roots,
                ready_at=r.ready_at,
                started_at=now,
                traceparent=traceparent,
            )
        )
    _trim(known, keep=by_exec.keys())
    committed = insert_events(
        store,
        conn,
        [
            Event(
                "step.started", now, c.execution_id, c.key, {"attempt": c.attempt, "worker": worker}
            )
            for c in claimed
        ],
    )
    return claimed, committed


def _trim(known: Known, *, keep: Iterable[str]) -> None:
    """Drop the least recently claimed from executions of ``known`` (its first entries) past
    :data:`KNOWN_EXECUTIONS` or :data:`KNOWN_INPUTS_BYTES`; never those in ``keep``."""
    kept = set(keep)
    size = sum(entry[6] for entry in known.values())
    for execution_id in list(known):
        if len(known) <= KNOWN_EXECUTIONS and size <= KNOWN_INPUTS_BYTES:
            return
        if execution_id not in kept:
            size -= known.pop(execution_id)[6]


def commit_round(
    store: StateStore, work: Round, *, worker: str | None = None, take: int = 0, lease: float = 0.0
) -> RoundResult:
    """Commit a worker's round (spawns, progress, outcomes) in one transaction, fenced by
    attempt and, with ``worker`` (the worker that ran them), by that worker's claim
    (:func:`~framepipe.jobs.claims.held_by`); dependents of completed steps become ready
    in the same transaction.

    With ``worker`` and ``take > 0``, up to ``take`` of the steps made ready are claimed by
    that worker in the same transaction (``result.claimed``): a worker with free slots runs
    the next step of a chain without a round trip through the broker. The rest are in
    ``result.ready``, to publish."""
    result = RoundResult()
    by_exec: dict[str, Round] = defaultdict(Round)
    for s in work.spawns:
        by_exec[s.execution_id].spawns.append(s)
    for p in work.progress:
        by_exec[p.execution_id].progress.append(p)
    for o in work.outcomes:
        by_exec[o.execution_id].outcomes.append(o)
    # Spawns and progress alone need no flush: the outcome commit of the same attempt is
    # durable and flushes them with it; until then, a crash re-runs the attempt anyway.
    with store.write(durable=bool(work.outcomes)) as conn:
        tx = Transaction(store, conn, time.time(), holder=worker)
        for execution_id in sorted(by_exec):
            part = by_exec[execution_id]
            x = tx.lock(execution_id)
            if x is None:
                continue
            _commit_spawns(tx, x, part.spawns, result)
            for p in part.progress:
                if not tx.progress(x, p):
                    result.fenced.append((p.execution_id, p.key, p.attempt))
            done = [o for o in part.outcomes if o.kind == "done"]
            for o in tx.complete(x, done):
                result.fenced.append((o.execution_id, o.key, o.attempt))
            for o in part.outcomes:
                if o.kind == "done":
                    continue
                ok = tx.fail(x, o) if o.kind == "failed" else tx.end_attempt(x, o)
                if not ok:
                    result.fenced.append((o.execution_id, o.key, o.attempt))
            tx.settle(x)
        if worker is not None and take > 0 and tx.ready:
            result.claimed = tx.claim_ready(worker, take, lease)
        result.events = tx.save()
        result.retry_at = tx.retries_due([o for o in work.outcomes if o.kind == "failed"])
    result.ready = tx.ready
    return result


def _commit_spawns(
    tx: Transaction, x: ExecutionRow, spawns: list[Spawn], result: RoundResult
) -> None:
    if not spawns:
        return
    holders = {(s.spawner, s.attempt) for s in spawns}
    alive = set()
    for spawner, attempt in holders:
        if (
            tx.conn.execute(
                sa.select(steps.c.key).where(*held_by(x.id, spawner, attempt, tx.holder))
            ).first()
            is not None
        ):
            alive.add((spawner, attempt))
        else:
            result.fenced.append((x.id, spawner, attempt))
    specs = [s.spec for s in spawns if (s.spawner, s.attempt) in alive]
    tx.insert_steps(x, specs, spawned=True)
