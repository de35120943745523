"""The transitions of distributed executions inside one database transaction.

A :class:`Transaction` locks the rows of the executions it changes (``SELECT ... FOR UPDATE``
on PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises all writers), applies the rules of
:mod:`framepipe.jobs.rules` to them in SQL (insert steps, make them ready, claim, complete,
fail, end an attempt, fail an execution, settle: complete it, release name dependencies or
fail it as stuck) while keeping the execution's counters (:class:`ExecutionRow`), and saves
the counters and the events with the rest. The operations that open these transactions are in
:mod:`framepipe.jobs.dispatch`.

One concept, longer than most: each transition is a few statements of SQL on the same locked
rows and counters, and they call one another (a completion releases dependents, a failure fails
the execution, settle finishes it); spreading them over modules would spread that one lock
discipline.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, step_deps, steps
from framepipe.backends.state.event_log import insert_events
from framepipe.events import Event
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.records import upsert_ledger
from framepipe.jobs.rounds import Claimed, Delivery, Outcome, ProgressUpdate
from framepipe.jobs.rules import (
    StepPlan,
    after_failure,
    execution_progress,
    failed_error,
    interrupted_status,
    is_ready,
    missing_dependency_error,
    released_by_names,
    stuck_error,
)

__all__ = ["MODE", "RUNNING", "ExecutionRow", "Transaction", "claim_statement", "held_by"]

MODE = "workers"
"""The ``mode`` of an execution run by workers."""
RUNNING = ExecutionStatus.RUNNING.value
_CHUNK = 500


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


def _crossed(before: int, after: int) -> bool:
    """True when an execution's step count passed 256, 1024, 4096, ... (x4)."""
    mark = 256
    while mark <= after:
        if before < mark:
            return True
        mark *= 4
    return False


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


class ExecutionRow:
    """The locked row of one execution, with the counters a transaction changes."""

    def __init__(self, row: Mapping[str, Any]) -> None:
        self.id: str = row["id"]
        self.pipeline: str = row["pipeline"]
        self.status: str = row["status"]
        self.unfinished: int = row["unfinished"]
        self.active: int = row["active"]
        self.wsum: float = row["wsum"]
        self.wtotal: float = row["wtotal"]
        self.next_seq: int = row["next_seq"]
        self.next_done_seq: int = row["next_done_seq"]
        self.progress: float = row["progress"]
        self.error: str | None = row["error"]
        self.finished_at: float | None = row["finished_at"]
        self.started_at: float | None = row["started_at"]
        self.pipeline_ref: str | None = row["pipeline_ref"]
        self.inputs: dict[str, Any] = row["inputs"]
        self.input_roots: list[str] | None = row["input_roots"]
        self.stopping: str | None = row["stopping"]
        self.traceparent: str | None = row["traceparent"]

    @property
    def running(self) -> bool:
        """True while steps of the execution may start: running and not stopping."""
        return self.status == RUNNING and self.stopping is None

    @property
    def cancelling(self) -> bool:
        """True while the execution stops because it was cancelled."""
        return self.stopping == ExecutionStatus.CANCELLED.value

    def refresh_progress(self) -> float:
        """The execution's progress from its counters (:func:`execution_progress`), kept."""
        self.progress = execution_progress(
            self.progress,
            self.wsum,
            self.wtotal,
            completed=self.next_seq - self.unfinished,
            total=self.next_seq,
        )
        return self.progress

    def values(self) -> dict[str, Any]:
        self.refresh_progress()
        return {
            "status": self.status,
            "unfinished": self.unfinished,
            "active": self.active,
            "wsum": self.wsum,
            "wtotal": self.wtotal,
            "next_seq": self.next_seq,
            "next_done_seq": self.next_done_seq,
            "progress": self.progress,
            "error": self.error,
            "finished_at": self.finished_at,
            "stopping": self.stopping,
        }


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
        statuses = self._statuses(x.id, list(dict.fromkeys([*keys, *deps])))
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
                {
                    "execution_id": x.id,
                    "key": s.key,
                    "name": s.name,
                    "params": s.params,
                    "depends_on": s.deps,
                    "spawned_by": s.spawned_by,
                    "status": status.value,
                    "weight": s.weight,
                    "progress": 0.0,
                    "message": None,
                    "attempt": 0,
                    "failures": 0,
                    "crashes": 0,
                    "output": None,
                    "error": None,
                    "seq": x.next_seq,
                    "done_seq": None,
                    "created_at": self.now,
                    "ready_at": now if status is StepStatus.READY else None,
                    "started_at": None,
                    "finished_at": None,
                    "next_attempt_at": None,
                    "waiting": waiting,
                    "lease_until": None,
                    "worker": None,
                    "published_at": now if status is StepStatus.READY else None,
                }
            )
            x.next_seq += 1
            edges.extend(
                {"execution_id": x.id, "dep": d, "step_key": s.key, "kind": "key"}
                for d in s.key_deps
            )
            edges.extend(
                {"execution_id": x.id, "dep": d, "step_key": s.key, "kind": "name"}
                for d in s.name_deps
            )
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
        self.conn.execute(steps.insert(), rows)
        if edges:
            self.conn.execute(step_deps.insert(), edges)
        if self.store.dialect == "postgresql" and _crossed(x.next_seq - len(rows), x.next_seq):
            # A burst of new steps in a young table: without fresh statistics PostgreSQL
            # plans key lookups as scans of the whole execution (autovacuum may take a
            # minute to analyze), which makes every claim and completion O(steps).
            self.conn.exec_driver_sql("ANALYZE fp_steps, fp_step_deps")
        x.unfinished += len(rows)
        x.active += len(ready)
        x.wtotal += sum(r["weight"] for r in rows)
        self.ready.extend(Delivery(x.id, k) for k in ready)
        if missing:
            self.fail_execution(x, f"pipeline '{x.pipeline}': {missing[0]}")

    def _statuses(self, execution_id: str, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for i in range(0, len(keys), _CHUNK):
            chunk = keys[i : i + _CHUNK]
            found.update(
                (r.key, r.status)
                for r in self.conn.execute(
                    sa.select(steps.c.key, steps.c.status).where(
                        steps.c.execution_id == execution_id, steps.c.key.in_(chunk)
                    )
                )
            )
        return found

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
        held: dict[tuple[str, int], float | None] = {}  # -> the attempt's start
        keys = [o.key for o in done]
        for i in range(0, len(keys), _CHUNK):
            query = sa.select(steps.c.key, steps.c.attempt, steps.c.started_at).where(
                steps.c.execution_id == x.id,
                steps.c.key.in_(keys[i : i + _CHUNK]),
                steps.c.status == StepStatus.RUNNING.value,
            )
            if self.holder is not None:
                query = query.where(steps.c.worker == self.holder)
            if self.store.dialect == "postgresql":
                query = query.with_for_update()
            held.update(((r.key, r.attempt), r.started_at) for r in self.conn.execute(query))
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
            self._release_dependents(x, [o.key for o in ok])
        return [o for o in done if (o.key, o.attempt) not in held]

    def _release_dependents(self, x: ExecutionRow, finished: list[str]) -> None:
        waiting: dict[str, int] = defaultdict(int)
        with_names: set[str] = set()
        dependent = step_deps.alias("dependent")
        for i in range(0, len(finished), _CHUNK):
            chunk = finished[i : i + _CHUNK]
            # The dependents of these steps, and (in the same round trip) which of them also
            # wait for every instance of some step name.
            for r in self.conn.execute(
                sa.select(step_deps.c.step_key, step_deps.c.kind).where(
                    step_deps.c.execution_id == x.id,
                    sa.or_(
                        sa.and_(step_deps.c.kind == "key", step_deps.c.dep.in_(chunk)),
                        sa.and_(
                            step_deps.c.kind == "name",
                            step_deps.c.step_key.in_(
                                sa.select(dependent.c.step_key).where(
                                    dependent.c.execution_id == x.id,
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
            return
        by_count: dict[int, list[str]] = defaultdict(list)
        for key, n in waiting.items():
            by_count[n].append(key)
        zero: list[str] = []
        for n, keys in by_count.items():
            for i in range(0, len(keys), _CHUNK):
                zero.extend(
                    r.key
                    for r in self.conn.execute(
                        steps.update()
                        .where(steps.c.execution_id == x.id, steps.c.key.in_(keys[i : i + _CHUNK]))
                        .values(waiting=steps.c.waiting - n)
                        .returning(steps.c.key, steps.c.waiting, steps.c.status)
                    )
                    if r.waiting == 0 and r.status == StepStatus.PENDING.value
                )
        free = [k for k in zero if k not in with_names]
        self.make_ready(x, free)

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
        waiters: dict[str, list[str]] = defaultdict(list)
        for r in self.conn.execute(
            sa.select(step_deps.c.step_key, step_deps.c.dep)
            .join(
                steps,
                sa.and_(
                    steps.c.execution_id == step_deps.c.execution_id,
                    steps.c.key == step_deps.c.step_key,
                ),
            )
            .where(
                step_deps.c.execution_id == x.id,
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
                for r in self.conn.execute(
                    sa.select(steps.c.name)
                    .where(
                        steps.c.execution_id == x.id,
                        steps.c.name.in_(names),
                        steps.c.status != StepStatus.COMPLETED.value,
                    )
                    .distinct()
                )
            }
        released = released_by_names(waiters, open_names)
        if released:
            self.make_ready(x, released)
            return
        stuck = self.conn.execute(
            sa.select(steps.c.key, steps.c.depends_on)
            .where(steps.c.execution_id == x.id, steps.c.status == StepStatus.PENDING.value)
            .order_by(steps.c.seq)
            .limit(5)
        ).all()
        self.fail_execution(
            x, stuck_error(x.pipeline, x.unfinished, [(r.key, r.depends_on) for r in stuck])
        )
        self._finish_stopped(x)  # nothing runs
