"""The transitions of distributed executions inside one database transaction.

A :class:`Transaction` locks the rows of the executions it changes (``SELECT ... FOR UPDATE``
on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises all writers), applies the rules of
:mod:`framepipe.jobs.rules` to them (insert steps, make them ready, claim, complete, fail, end
an attempt, fail an execution, settle: complete it, release name dependencies or fail it as
stuck) while keeping the execution's counters
(:class:`~framepipe.jobs.execution_row.ExecutionRow`), and saves the counters and the events
with the rest. The operations that open these transactions are in :mod:`framepipe.jobs.dispatch`;
the queries of the step graph are in :mod:`framepipe.jobs.step_graph`, the claim and its fence
in :mod:`framepipe.jobs.claims`.

Guarantees:

* Every change to an execution's steps is made under its lock, with its counters changed in the
  same transaction, so the counters never disagree with the steps' rows.
* A running attempt's progress, completion and failure are written only while the attempt is
  still held (:func:`~framepipe.jobs.claims.held_by`); a fenced one changes nothing.
* The transitions call one another as one step leads to the next (a completion releases its
  dependents, a failure fails the execution, settle finishes it), all on the same locked rows.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, steps
from framepipe.backends.state.event_log import insert_events
from framepipe.events import Event
from framepipe.jobs import step_graph
from framepipe.jobs.batches import upsert_ledger
from framepipe.jobs.claims import claim_statement, held_attempts, held_by
from framepipe.jobs.execution_row import RUNNING, ExecutionRow
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.rounds import Claimed, Delivery, Outcome, ProgressUpdate
from framepipe.jobs.rules import (
    StepPlan,
    after_failure,
    failed_error,
    interrupted_status,
    is_ready,
    missing_dependency_error,
    released_by_names,
    stuck_error,
)

__all__ = ["Transaction"]

_CHUNK = step_graph.CHUNK


_complete_step = (
    steps.update()
    .where(steps.c.execution_id == sa.bindparam("b_e"), steps.c.key == sa.bindparam("b_k"))
    .values(
        status=StepStatus.COMPLETED.value,
        error=None,
        progress=100.0,
        lease_until=None,
        output=sa.bindparam("b_output", type_=steps.c.output.type),
        done_seq=sa.bindparam("b_seq"),
        finished_at=sa.bindparam("b_now"),
    )
)


class Transaction:
    """One transaction's work on one or more executions."""

    def __init__(
        self, store: StateStore, conn: sa.Connection, now: float, *, holder: str | None = None
    ) -> None:
        """``holder``: the worker whose attempts this transaction reports on; its writes are
        fenced by that worker's claim as well as by the attempt (:func:`held_by`)."""
        self.store = store
        self.conn = conn
        self.now = now
        self.holder = holder
        self.events: list[Event] = []
        self.ready: list[Delivery] = []
        self.xs: dict[str, ExecutionRow] = {}

    def lock(self, execution_id: str) -> ExecutionRow | None:
        x = self.xs.get(execution_id)
        if x is not None:
            return x
        query = sa.select(executions).where(executions.c.id == execution_id)
        if self.store.dialect == "postgresql":
            query = query.with_for_update()
        row = self.conn.execute(query).first()
        if row is None:
            return None
        x = self.xs[execution_id] = ExecutionRow(dict(row._mapping))
        return x

    def save(self) -> list[Event]:
        for x in self.xs.values():
            self.conn.execute(
                executions.update().where(executions.c.id == x.id).values(**x.values())
            )
        return insert_events(self.store, self.conn, self.events)

    def emit(self, type_: str, x: ExecutionRow, key: str | None, data: dict[str, Any]) -> None:
        self.events.append(Event(type_, self.now, x.id, key, data))

    # -- transitions ------------------------------------------------------------------------

    def insert_steps(self, x: ExecutionRow, specs: Sequence[StepPlan], *, spawned: bool) -> None:
        keys = list(dict.fromkeys(s.key for s in specs))
        deps = {d for s in specs for d in s.key_deps}
        statuses = step_graph.statuses(self.conn, x.id, list(dict.fromkeys([*keys, *deps])))
        fresh: dict[str, StepPlan] = {}
        for s in specs:
            if s.key not in statuses and s.key not in fresh:
                fresh[s.key] = s
        if not fresh:
            return
        now = time.time()
        rows: list[dict[str, Any]] = []
        edges: list[dict[str, Any]] = []
        ready: list[str] = []
        missing: list[str] = []
        for s in fresh.values():
            waiting = 0
            for dep in s.key_deps:
                if dep in fresh:
                    waiting += 1
                elif dep not in statuses:
                    missing.append(missing_dependency_error(s.key, dep))
                elif statuses[dep] != StepStatus.COMPLETED.value:
                    waiting += 1
            status = StepStatus.PENDING
            if is_ready(waiting, s.name_deps, running=x.running):
                status = StepStatus.READY
                ready.append(s.key)
            rows.append(
                step_graph.step_row(
                    x.id, s, status, waiting=waiting, seq=x.next_seq, created_at=self.now, now=now
                )
            )
            x.next_seq += 1
            edges.extend(step_graph.edges(x.id, s))
            if spawned:
                self.emit(
                    "step.spawned",
                    x,
                    s.key,
                    {
                        "name": s.name,
                        "params": s.params,
                        "depends_on": s.deps,
                        "spawned_by": s.spawned_by,
                    },
                )
        step_graph.insert(self.store, self.conn, rows, edges, steps_before=x.next_seq - len(rows))
        x.unfinished += len(rows)
        x.active += len(ready)
        x.wtotal += sum(r["weight"] for r in rows)
        self.ready.extend(Delivery(x.id, k) for k in ready)
        if missing:
            self.fail_execution(x, f"pipeline '{x.pipeline}': {missing[0]}")

    def claim_ready(self, worker: str, take: int, lease: float) -> list[Claimed]:
        """Claim up to ``take`` of the steps this transaction made ready, for ``worker``."""
        by_exec: dict[str, list[str]] = defaultdict(list)
        for d in self.ready[:take]:
            if self.xs[d.execution_id].running:
                by_exec[d.execution_id].append(d.key)
        claimed: list[Claimed] = []
        now = time.time()
        for execution_id, keys in by_exec.items():
            x = self.xs[execution_id]
            for r in self.conn.execute(claim_statement(execution_id, keys, worker, lease, now)):
                claimed.append(
                    Claimed(
                        execution_id=execution_id,
                        key=r.key,
                        name=r.name,
                        params=r.params,
                        attempt=r.attempt,
                        weight=r.weight,
                        progress=r.progress,
                        pipeline=x.pipeline,
                        pipeline_ref=x.pipeline_ref,
                        inputs=x.inputs,
                        input_roots=x.input_roots,
                        ready_at=r.ready_at,
                        started_at=now,
                        traceparent=x.traceparent,
                    )
                )
                self.emit("step.started", x, r.key, {"attempt": r.attempt, "worker": worker})
        taken = {(c.execution_id, c.key) for c in claimed}
        self.ready = [d for d in self.ready if (d.execution_id, d.key) not in taken]
        return claimed

    def make_ready(self, x: ExecutionRow, keys: Sequence[str]) -> None:
        if not keys or not x.running:
            return
        now = time.time()  # ready from here on, not from the start of the transaction
        for i in range(0, len(keys), _CHUNK):
            n = self.conn.execute(
                steps.update()
                .where(
                    steps.c.execution_id == x.id,
                    steps.c.key.in_(keys[i : i + _CHUNK]),
                    steps.c.status == StepStatus.PENDING.value,
                )
                .values(status=StepStatus.READY.value, ready_at=now, published_at=now)
            ).rowcount
            x.active += n
        self.ready.extend(Delivery(x.id, k) for k in keys)

    def progress(self, x: ExecutionRow, p: ProgressUpdate) -> bool:
        """Commit a running attempt's progress report; False if fenced (nothing written)."""
        committed = bool(
            self.conn.execute(
                steps.update()
                .where(*held_by(x.id, p.key, p.attempt, self.holder))
                .values(progress=p.pct, message=p.message)
            ).rowcount
        )
        if committed:
            x.wsum += p.weight * (p.pct - p.before)
            self.emit(
                "step.progress",
                x,
                p.key,
                {
                    "progress": p.pct,
                    "message": p.message,
                    "execution_progress": x.refresh_progress(),
                },
            )
        return committed

    def retries_due(self, failed: Sequence[Outcome]) -> list[tuple[float, Delivery]]:
        """When each of the ``failed`` attempts that is to be retried runs again."""
        due: list[tuple[float, Delivery]] = []
        for o in failed:
            at = self.conn.execute(
                sa.select(steps.c.next_attempt_at).where(
                    steps.c.execution_id == o.execution_id,
                    steps.c.key == o.key,
                    steps.c.status == StepStatus.RETRYING.value,
                )
            ).scalar()
            if at is not None:
                due.append((at, Delivery(o.execution_id, o.key)))
        return due

    def complete(self, x: ExecutionRow, done: list[Outcome]) -> list[Outcome]:
        """Commit completions; return the fenced ones (not committed)."""
        if not done:
            return []
        held = held_attempts(self.store, self.conn, x.id, [o.key for o in done], self.holder)
        # Under the execution's lock nothing else moves these rows off 'running' (claims take
        # only ready rows; sweeps lock the execution first), so the check above stands.
        ok = [o for o in done if (o.key, o.attempt) in held]
        if ok:
            rows = []
            for o in ok:
                rows.append(
                    {
                        "b_e": x.id,
                        "b_k": o.key,
                        "b_output": o.output,
                        "b_seq": x.next_done_seq,
                        "b_now": self.now,
                    }
                )
                x.next_done_seq += 1
                x.wsum += o.weight * (100.0 - o.before)
                if o.ledger:
                    upsert_ledger(self.store, self.conn, o.ledger)
            self.conn.execute(_complete_step, rows)
            x.unfinished -= len(ok)
            x.active -= len(ok)
            progress = x.refresh_progress()
            for o in ok:
                started = held[(o.key, o.attempt)] or self.now
                self.emit(
                    "step.completed",
                    x,
                    o.key,
                    {
                        "attempt": o.attempt,
                        "duration": self.now - started,
                        "execution_progress": progress,
                    },
                )
            finished = [o.key for o in ok]
            self.make_ready(x, step_graph.count_down_dependents(self.conn, x.id, finished))
        return [o for o in done if (o.key, o.attempt) not in held]

    def fail(self, x: ExecutionRow, o: Outcome) -> bool:
        """Commit a failed attempt (retry, or fail the execution); False if fenced. An attempt
        of a cancelled execution that fails before its worker heard of the cancel ends
        cancelled, as any attempt its execution stops (:func:`interrupted_status`)."""
        if x.cancelling:
            return self.end_attempt(x, o)
        head = (o.error or "failed").splitlines()[0]
        fenced = held_by(x.id, o.key, o.attempt, self.holder)
        row = self.conn.execute(sa.select(steps.c.failures).where(*fenced)).first()
        if row is None:
            return False
        failures = row.failures + 1
        delay = after_failure(failures, o.policy, permanent=o.permanent, running=x.running)
        if delay is not None:
            self.conn.execute(
                steps.update()
                .where(*fenced)
                .values(
                    status=StepStatus.RETRYING.value,
                    failures=failures,
                    error=o.error,
                    finished_at=self.now,
                    next_attempt_at=self.now + delay,
                    lease_until=None,
                )
            )
            self.emit(
                "step.retrying", x, o.key, {"attempt": o.attempt, "error": head, "delay": delay}
            )
            return True
        self.conn.execute(
            steps.update()
            .where(*fenced)
            .values(
                status=StepStatus.FAILED.value,
                failures=failures,
                error=o.error,
                finished_at=self.now,
                lease_until=None,
            )
        )
        x.active -= 1
        self.emit(
            "step.failed", x, o.key, {"attempt": o.attempt, "error": head, "traceback": o.error}
        )
        self.fail_execution(x, failed_error(x.pipeline, o.key, failures, o.error or ""))
        return True

    def end_attempt(self, x: ExecutionRow, o: Outcome) -> bool:
        """A cancelled or handed-back attempt; False if fenced."""
        fenced = held_by(x.id, o.key, o.attempt, self.holder)
        if o.kind == "handback" and x.running:
            n = self.conn.execute(
                steps.update()
                .where(*fenced)
                .values(
                    status=StepStatus.READY.value,
                    ready_at=self.now,
                    published_at=self.now,
                    lease_until=None,
                    worker=None,
                    attempt=steps.c.attempt - (0 if o.ran else 1),
                )
            ).rowcount
            if n:
                self.ready.append(Delivery(x.id, o.key))
                self.emit("step.interrupted", x, o.key, {"attempt": o.attempt})
            return bool(n)
        status = interrupted_status(ExecutionStatus(x.stopping or x.status))
        n = self.conn.execute(
            steps.update()
            .where(*fenced)
            .values(status=status.value, error=o.error, finished_at=self.now, lease_until=None)
        ).rowcount
        if n:
            x.active -= 1
            self.emit(
                "step.cancelled" if status is StepStatus.CANCELLED else "step.interrupted",
                x,
                o.key,
                {"attempt": o.attempt},
            )
        return bool(n)

    def fail_execution(self, x: ExecutionRow, error: str) -> None:
        """Fail fast: nothing new starts; running steps finish and keep their results, and
        the execution ends ``failed`` when the last of them has ended (:meth:`settle`)."""
        if not x.running:
            return
        x.stopping = ExecutionStatus.FAILED.value
        x.error = error
        n = self.conn.execute(
            steps.update()
            .where(
                steps.c.execution_id == x.id,
                steps.c.status.in_([StepStatus.READY.value, StepStatus.RETRYING.value]),
            )
            .values(status=StepStatus.PENDING.value)
        ).rowcount
        x.active -= n
        self.ready = [d for d in self.ready if d.execution_id != x.id]

    def cancel_execution(self, x: ExecutionRow, error: str) -> None:
        """Cancel: its waiting steps end ``cancelled`` now; running ones are stopped by their
        workers, and the execution ends ``cancelled`` when the last of them has ended
        (:meth:`settle`). A failing execution stays failing, as in the embedded engine."""
        if x.status != RUNNING or x.stopping is not None:
            return
        x.stopping = ExecutionStatus.CANCELLED.value
        x.error = error
        self.conn.execute(
            steps.update()
            .where(
                steps.c.execution_id == x.id,
                steps.c.status.in_(
                    [StepStatus.PENDING.value, StepStatus.READY.value, StepStatus.RETRYING.value]
                ),
            )
            .values(status=StepStatus.CANCELLED.value)
        )
        x.active = int(
            self.conn.execute(
                sa.select(sa.func.count()).where(
                    steps.c.execution_id == x.id, steps.c.status == StepStatus.RUNNING.value
                )
            ).scalar_one()
        )
        self.ready = [d for d in self.ready if d.execution_id != x.id]

    def _finish_stopped(self, x: ExecutionRow) -> None:
        """The last running step of a stopping execution has ended: it ends as it stops."""
        assert x.stopping is not None
        x.status, x.stopping = x.stopping, None
        x.finished_at = self.now
        self.emit(
            f"execution.{x.status}",
            x,
            None,
            {
                "error": x.error,
                "progress": x.refresh_progress(),
                "steps": x.next_seq,
                "duration": self.now - (x.started_at or self.now),
            },
        )

    def settle(self, x: ExecutionRow) -> None:
        """With nothing ready, running or retrying: complete the execution, release the steps
        waiting for every instance of a step name, or fail it as stuck."""
        if x.status != RUNNING or x.active > 0:
            return
        if x.stopping is not None:
            self._finish_stopped(x)
            return
        if x.unfinished <= 0:
            x.status = ExecutionStatus.COMPLETED.value
            x.progress = 100.0
            x.finished_at = self.now
            self.emit(
                "execution.completed",
                x,
                None,
                {
                    "error": None,
                    "progress": 100.0,
                    "steps": x.next_seq,
                    "duration": self.now - (x.started_at or self.now),
                },
            )
            return
        released = released_by_names(*step_graph.name_waiters(self.conn, x.id))
        if released:
            self.make_ready(x, released)
            return
        stuck = step_graph.first_pending(self.conn, x.id, limit=5)
        self.fail_execution(x, stuck_error(x.pipeline, x.unfinished, stuck))
        self._finish_stopped(x)  # nothing runs
