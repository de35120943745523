"""Distributed executions in the state store: every transition a worker commits.

The database is the source of truth of a distributed execution (``mode = 'workers'``); the
broker only rings the bell (:mod:`framepipe.jobs.delivery`). Guarantees:

* **Atomic scheduling.** A step's completion, its dependents becoming ``ready``, the
  execution's counters (unfinished, active, weighted progress) and the events are one
  transaction, serialised per execution by a lock on its row (``SELECT ... FOR UPDATE`` on
  PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises all writers). A ``ready`` row *is* the
  outbox: a ready step that never reached the broker (crash after commit, broker restart) is
  published again by :func:`sweep`, and a duplicate delivery is harmless because a claim only
  takes a ``ready`` row.
* **Fencing.** A claim increments the step's ``attempt``; every later write of that attempt
  (progress, spawn, outcome, lease renewal) matches ``attempt = :mine AND status = 'running'``.
  A worker that lost its lease (killed, paused, cut off) writes nothing when it comes back: a
  step completes once.
* **Leases.** A running step holds ``lease_until``, renewed by its worker's heartbeat. When it
  expires, or its worker is known dead (same host: the process is gone; elsewhere: no heartbeat
  for ``stale_after`` seconds), :func:`sweep` makes the step ready again; a dead worker counts
  as a crash, and ``max_step_crashes`` crashes fail the step as poison with the tail of the dead
  worker's output.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa

from framepipe.backends.state import StateStore, executions, step_deps, steps, workers
from framepipe.backends.state.event_log import insert_events
from framepipe.errors import ExecutionStateError
from framepipe.events import Event
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.outcomes import NO_RETRY, RetryPolicy
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import find_execution, upsert_ledger
from framepipe.jobs.rules import (
    StepPlan,
    after_failure,
    execution_progress,
    failed_error,
    interrupted_status,
    is_ready,
    missing_dependency_error,
    plan_step,
    released_by_names,
    stuck_error,
)
from framepipe.liveness import owner_is_dead

__all__ = [
    "MODE",
    "Claimed",
    "Delivery",
    "Known",
    "Outcome",
    "ProgressUpdate",
    "Round",
    "RoundResult",
    "Spawn",
    "cancel",
    "claim",
    "commit_round",
    "release_due",
    "renew",
    "resume",
    "submit",
    "sweep",
]

MODE = "workers"
_RUNNING = ExecutionStatus.RUNNING.value
_CHUNK = 500


@dataclass(frozen=True, slots=True, order=True)
class Delivery:
    """A ready step to hand to the broker."""

    execution_id: str
    key: str


@dataclass(slots=True)
class Claimed:
    """A step this worker now runs, as attempt ``attempt``."""

    execution_id: str
    key: str
    name: str
    params: dict[str, Any]
    attempt: int
    weight: float
    progress: float
    pipeline: str
    pipeline_ref: str | None
    inputs: dict[str, Any]
    input_roots: list[str] | None  # the execution's recorded roots (None: unrestricted)
    ready_at: float | None
    started_at: float


@dataclass(slots=True)
class ProgressUpdate:
    """A running attempt's progress; ``before`` is the value last committed for it."""

    execution_id: str
    key: str
    attempt: int
    weight: float
    before: float
    pct: float
    message: str | None


@dataclass(slots=True)
class Outcome:
    """How an attempt ended.

    ``done``: completed with ``output``; ``failed``: raised (``error``; retried as ``policy``
    allows unless ``permanent``: :func:`~framepipe.jobs.rules.after_failure`); ``cancelled``:
    stopped because its execution
    was cancelled; ``handback``: the worker gives the step back (stopping, or it had claimed
    more long steps than it can start), not counted as a failure; one that never ``ran`` does
    not count as an attempt either."""

    execution_id: str
    key: str
    attempt: int
    kind: Literal["done", "failed", "cancelled", "handback"]
    weight: float
    before: float
    output: dict[str, Any] | None = None
    ledger: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    permanent: bool = False
    policy: RetryPolicy = NO_RETRY
    ran: bool = True


@dataclass(slots=True)
class Spawn:
    """A step spawned by a running attempt."""

    execution_id: str
    spawner: str
    attempt: int
    spec: StepPlan


@dataclass(slots=True)
class Round:
    """What a worker commits in one transaction."""

    outcomes: list[Outcome] = field(default_factory=list)
    progress: list[ProgressUpdate] = field(default_factory=list)
    spawns: list[Spawn] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.progress or self.spawns)


@dataclass(slots=True)
class RoundResult:
    """What a commit produced: steps to publish, retry times, fenced writes, events."""

    ready: list[Delivery] = field(default_factory=list)
    claimed: list[Claimed] = field(default_factory=list)
    retry_at: list[tuple[float, Delivery]] = field(default_factory=list)
    fenced: list[tuple[str, str, int]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


_complete_step = (
    steps.update()
    .where(steps.c.execution_id == sa.bindparam("b_e"), steps.c.key == sa.bindparam("b_k"))
    .values(status=StepStatus.COMPLETED.value, error=None, progress=100.0, lease_until=None,
            output=sa.bindparam("b_output", type_=steps.c.output.type),
            done_seq=sa.bindparam("b_seq"), finished_at=sa.bindparam("b_now"))
)


def _crossed(before: int, after: int) -> bool:
    """True when an execution's step count passed 256, 1024, 4096, ... (x4)."""
    mark = 256
    while mark <= after:
        if before < mark:
            return True
        mark *= 4
    return False


class _ExecRow:
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

    @property
    def running(self) -> bool:
        return self.status == _RUNNING

    def values(self) -> dict[str, Any]:
        self.progress = execution_progress(self.progress, self.wsum, self.wtotal,
                                           completed=self.next_seq - self.unfinished,
                                           total=self.next_seq)
        return {"status": self.status, "unfinished": self.unfinished, "active": self.active,
                "wsum": self.wsum, "wtotal": self.wtotal, "next_seq": self.next_seq,
                "next_done_seq": self.next_done_seq, "progress": self.progress,
                "error": self.error, "finished_at": self.finished_at}


class _Tx:
    """One transaction's work on one or more executions."""

    def __init__(self, store: StateStore, conn: sa.Connection, now: float) -> None:
        self.store = store
        self.conn = conn
        self.now = now
        self.events: list[Event] = []
        self.ready: list[Delivery] = []
        self.xs: dict[str, _ExecRow] = {}

    def lock(self, execution_id: str) -> _ExecRow | None:
        x = self.xs.get(execution_id)
        if x is not None:
            return x
        query = sa.select(executions).where(executions.c.id == execution_id)
        if self.store.dialect == "postgresql":
            query = query.with_for_update()
        row = self.conn.execute(query).first()
        if row is None:
            return None
        x = self.xs[execution_id] = _ExecRow(dict(row._mapping))
        return x

    def save(self) -> list[Event]:
        for x in self.xs.values():
            self.conn.execute(executions.update().where(executions.c.id == x.id)
                              .values(**x.values()))
        return insert_events(self.store, self.conn, self.events)

    def emit(self, type_: str, x: _ExecRow, key: str | None, data: dict[str, Any]) -> None:
        self.events.append(Event(type_, self.now, x.id, key, data))

    # -- transitions ------------------------------------------------------------------------

    def insert_steps(self, x: _ExecRow, specs: Sequence[StepPlan], *, spawned: bool) -> None:
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
            rows.append({
                "execution_id": x.id, "key": s.key, "name": s.name, "params": s.params,
                "depends_on": s.deps, "spawned_by": s.spawned_by, "status": status.value,
                "weight": s.weight, "progress": 0.0, "message": None, "attempt": 0,
                "failures": 0, "crashes": 0, "output": None, "error": None,
                "seq": x.next_seq, "done_seq": None, "created_at": self.now,
                "ready_at": now if status is StepStatus.READY else None,
                "started_at": None, "finished_at": None, "next_attempt_at": None,
                "waiting": waiting, "lease_until": None, "worker": None,
                "published_at": now if status is StepStatus.READY else None})
            x.next_seq += 1
            edges.extend({"execution_id": x.id, "dep": d, "step_key": s.key, "kind": "key"}
                         for d in s.key_deps)
            edges.extend({"execution_id": x.id, "dep": d, "step_key": s.key, "kind": "name"}
                         for d in s.name_deps)
            if spawned:
                self.emit("step.spawned", x, s.key, {"name": s.name, "params": s.params,
                                                     "depends_on": s.deps,
                                                     "spawned_by": s.spawned_by})
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
            chunk = keys[i:i + _CHUNK]
            found.update((r.key, r.status) for r in self.conn.execute(
                sa.select(steps.c.key, steps.c.status).where(
                    steps.c.execution_id == execution_id, steps.c.key.in_(chunk))))
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
            for r in self.conn.execute(steps.update().where(
                    steps.c.execution_id == execution_id, steps.c.key.in_(keys),
                    steps.c.status == StepStatus.READY.value)
                    .values(status=StepStatus.RUNNING.value, attempt=steps.c.attempt + 1,
                            worker=worker, lease_until=now + lease, started_at=now,
                            message=None, next_attempt_at=None)
                    .returning(steps.c.key, steps.c.name, steps.c.params, steps.c.attempt,
                               steps.c.weight, steps.c.progress, steps.c.ready_at)):
                claimed.append(Claimed(
                    execution_id=execution_id, key=r.key, name=r.name, params=r.params,
                    attempt=r.attempt, weight=r.weight, progress=r.progress,
                    pipeline=x.pipeline, pipeline_ref=x.pipeline_ref, inputs=x.inputs,
                    input_roots=x.input_roots, ready_at=r.ready_at, started_at=now))
                self.emit("step.started", x, r.key, {"attempt": r.attempt, "worker": worker})
        taken = {(c.execution_id, c.key) for c in claimed}
        self.ready = [d for d in self.ready if (d.execution_id, d.key) not in taken]
        return claimed

    def make_ready(self, x: _ExecRow, keys: Sequence[str]) -> None:
        if not keys or not x.running:
            return
        now = time.time()  # ready from here on, not from the start of the transaction
        for i in range(0, len(keys), _CHUNK):
            n = self.conn.execute(steps.update().where(
                steps.c.execution_id == x.id, steps.c.key.in_(keys[i:i + _CHUNK]),
                steps.c.status == StepStatus.PENDING.value).values(
                    status=StepStatus.READY.value, ready_at=now,
                    published_at=now)).rowcount
            x.active += n
        self.ready.extend(Delivery(x.id, k) for k in keys)

    def complete(self, x: _ExecRow, done: list[Outcome]) -> list[Outcome]:
        """Commit completions; return the fenced ones (not committed)."""
        if not done:
            return []
        held: set[tuple[str, int]] = set()
        keys = [o.key for o in done]
        for i in range(0, len(keys), _CHUNK):
            query = sa.select(steps.c.key, steps.c.attempt).where(
                steps.c.execution_id == x.id, steps.c.key.in_(keys[i:i + _CHUNK]),
                steps.c.status == StepStatus.RUNNING.value)
            if self.store.dialect == "postgresql":
                query = query.with_for_update()
            held.update((r.key, r.attempt) for r in self.conn.execute(query))
        # Under the execution's lock nothing else moves these rows off 'running' (claims take
        # only ready rows; sweeps lock the execution first), so the check above stands.
        ok = [o for o in done if (o.key, o.attempt) in held]
        if ok:
            rows = []
            for o in ok:
                rows.append({"b_e": x.id, "b_k": o.key, "b_output": o.output,
                             "b_seq": x.next_done_seq, "b_now": self.now})
                x.next_done_seq += 1
                x.wsum += o.weight * (100.0 - o.before)
                if o.ledger:
                    upsert_ledger(self.store, self.conn, o.ledger)
            self.conn.execute(_complete_step, rows)
            x.unfinished -= len(ok)
            x.active -= len(ok)
            progress = round(x.wsum / x.wtotal, 2) if x.wtotal else 0.0
            for o in ok:
                self.emit("step.completed", x, o.key, {"attempt": o.attempt,
                                                       "execution_progress": progress})
            self._release_dependents(x, [o.key for o in ok])
        return [o for o in done if (o.key, o.attempt) not in held]

    def _release_dependents(self, x: _ExecRow, finished: list[str]) -> None:
        waiting: dict[str, int] = defaultdict(int)
        with_names: set[str] = set()
        dependent = step_deps.alias("dependent")
        for i in range(0, len(finished), _CHUNK):
            chunk = finished[i:i + _CHUNK]
            # The dependents of these steps, and (in the same round trip) which of them also
            # wait for every instance of some step name.
            for r in self.conn.execute(sa.select(step_deps.c.step_key, step_deps.c.kind).where(
                    step_deps.c.execution_id == x.id, sa.or_(
                        sa.and_(step_deps.c.kind == "key", step_deps.c.dep.in_(chunk)),
                        sa.and_(step_deps.c.kind == "name", step_deps.c.step_key.in_(
                            sa.select(dependent.c.step_key).where(
                                dependent.c.execution_id == x.id, dependent.c.kind == "key",
                                dependent.c.dep.in_(chunk))))))):
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
                zero.extend(r.key for r in self.conn.execute(steps.update().where(
                    steps.c.execution_id == x.id, steps.c.key.in_(keys[i:i + _CHUNK]))
                    .values(waiting=steps.c.waiting - n)
                    .returning(steps.c.key, steps.c.waiting, steps.c.status))
                    if r.waiting == 0 and r.status == StepStatus.PENDING.value)
        free = [k for k in zero if k not in with_names]
        self.make_ready(x, free)

    def fail(self, x: _ExecRow, o: Outcome) -> bool:
        """Commit a failed attempt (retry, or fail the execution); False if fenced."""
        head = (o.error or "failed").splitlines()[0]
        row = self.conn.execute(sa.select(steps.c.failures, steps.c.status, steps.c.attempt)
                                .where(steps.c.execution_id == x.id,
                                       steps.c.key == o.key)).first()
        if row is None or row.status != StepStatus.RUNNING.value or row.attempt != o.attempt:
            return False
        failures = row.failures + 1
        fenced = (steps.c.execution_id == x.id, steps.c.key == o.key,
                  steps.c.attempt == o.attempt)
        delay = after_failure(failures, o.policy, permanent=o.permanent, running=x.running)
        if delay is not None:
            self.conn.execute(steps.update().where(*fenced).values(
                status=StepStatus.RETRYING.value, failures=failures, error=o.error,
                finished_at=self.now, next_attempt_at=self.now + delay, lease_until=None))
            self.emit("step.retrying", x, o.key, {"attempt": o.attempt, "error": head,
                                                  "delay": delay})
            return True
        self.conn.execute(steps.update().where(*fenced).values(
            status=StepStatus.FAILED.value, failures=failures, error=o.error,
            finished_at=self.now, lease_until=None))
        x.active -= 1
        self.emit("step.failed", x, o.key, {"attempt": o.attempt, "error": head,
                                            "traceback": o.error})
        self.fail_execution(x, failed_error(x.pipeline, o.key, failures, o.error or ""))
        return True

    def end_attempt(self, x: _ExecRow, o: Outcome) -> bool:
        """A cancelled or handed-back attempt; False if fenced."""
        fenced = (steps.c.execution_id == x.id, steps.c.key == o.key,
                  steps.c.attempt == o.attempt, steps.c.status == StepStatus.RUNNING.value)
        if o.kind == "handback" and x.running:
            n = self.conn.execute(steps.update().where(*fenced).values(
                status=StepStatus.READY.value, ready_at=self.now, published_at=self.now,
                lease_until=None, worker=None,
                attempt=steps.c.attempt - (0 if o.ran else 1))).rowcount
            if n:
                self.ready.append(Delivery(x.id, o.key))
                self.emit("step.interrupted", x, o.key, {"attempt": o.attempt})
            return bool(n)
        status = interrupted_status(ExecutionStatus(x.status))
        n = self.conn.execute(steps.update().where(*fenced).values(
            status=status.value, error=o.error, finished_at=self.now,
            lease_until=None)).rowcount
        if n:
            x.active -= 1
            self.emit("step.cancelled" if status is StepStatus.CANCELLED
                      else "step.interrupted", x, o.key, {"attempt": o.attempt})
        return bool(n)

    def fail_execution(self, x: _ExecRow, error: str) -> None:
        """Fail fast: nothing new starts; running steps finish and keep their results."""
        if not x.running:
            return
        x.status = ExecutionStatus.FAILED.value
        x.error = error
        x.finished_at = self.now
        n = self.conn.execute(steps.update().where(
            steps.c.execution_id == x.id,
            steps.c.status.in_([StepStatus.READY.value, StepStatus.RETRYING.value]))
            .values(status=StepStatus.PENDING.value)).rowcount
        x.active -= n
        self.ready = [d for d in self.ready if d.execution_id != x.id]
        self.emit("execution.failed", x, None, {"error": error, "progress": x.progress,
                                                "duration": self.now - (x.started_at or
                                                                        self.now)})

    def settle(self, x: _ExecRow) -> None:
        """With nothing ready, running or retrying: complete the execution, release the steps
        waiting for every instance of a step name, or fail it as stuck."""
        if not x.running or x.active > 0:
            return
        if x.unfinished <= 0:
            x.status = ExecutionStatus.COMPLETED.value
            x.progress = 100.0
            x.finished_at = self.now
            self.emit("execution.completed", x, None, {
                "error": None, "progress": 100.0, "steps": x.next_seq,
                "duration": self.now - (x.started_at or self.now)})
            return
        waiters: dict[str, list[str]] = defaultdict(list)
        for r in self.conn.execute(
                sa.select(step_deps.c.step_key, step_deps.c.dep)
                .join(steps, sa.and_(steps.c.execution_id == step_deps.c.execution_id,
                                     steps.c.key == step_deps.c.step_key))
                .where(step_deps.c.execution_id == x.id, step_deps.c.kind == "name",
                       steps.c.status == StepStatus.PENDING.value, steps.c.waiting == 0)):
            waiters[r.step_key].append(r.dep)
        names = {d for deps in waiters.values() for d in deps}
        open_names = set()
        if names:
            open_names = {r.name for r in self.conn.execute(
                sa.select(steps.c.name).where(
                    steps.c.execution_id == x.id, steps.c.name.in_(names),
                    steps.c.status != StepStatus.COMPLETED.value).distinct())}
        released = released_by_names(waiters, open_names)
        if released:
            self.make_ready(x, released)
            return
        stuck = self.conn.execute(sa.select(steps.c.key, steps.c.depends_on).where(
            steps.c.execution_id == x.id, steps.c.status == StepStatus.PENDING.value)
            .order_by(steps.c.seq).limit(5)).all()
        self.fail_execution(x, stuck_error(x.pipeline, x.unfinished,
                                           [(r.key, r.depends_on) for r in stuck]))


# -- submission, resume and cancel ---------------------------------------------------------------


def submit(store: StateStore, pipeline: Pipeline, inputs: Mapping[str, Any], *,
           ref: str | None, input_roots: Sequence[str] | None = None,
           ) -> tuple[str, list[Delivery], list[Event]]:
    """Create a distributed execution of ``pipeline``; return its id, the steps to publish and
    the committed events. Nothing runs until a worker takes a published step.

    ``input_roots`` is recorded as given (the engine resolved it:
    :func:`~framepipe.jobs.inputs.recorded_roots`; None: unrestricted); nothing after this
    writes it, and workers hand it to each step with the inputs."""
    now = time.time()
    execution_id = uuid.uuid4().hex
    with store.write() as conn:
        conn.execute(executions.insert().values(
            id=execution_id, pipeline=pipeline.name, pipeline_ref=ref or pipeline.ref,
            status=_RUNNING, inputs=dict(inputs),
            input_roots=None if input_roots is None else list(input_roots),
            progress=0.0, error=None, owner=None,
            heartbeat_at=None, cancel_requested=False, runs=1, created_at=now, started_at=now,
            finished_at=None, mode=MODE))
        tx = _Tx(store, conn, now)
        x = tx.lock(execution_id)
        assert x is not None
        tx.emit("execution.created", x, None, {"pipeline": pipeline.name, "inputs": inputs})
        tx.emit("execution.started", x, None, {"run": 1, "mode": MODE})
        tx.insert_steps(x, [plan_step(pipeline, s.name, {}, s.name)
                            for s in pipeline.initial_steps], spawned=False)
        tx.settle(x)
        committed = tx.save()
    return execution_id, tx.ready, committed


def resume(store: StateStore, execution_id: str) -> tuple[str, list[Delivery], list[Event]]:
    """Resume a failed, cancelled or interrupted distributed execution from where it stopped:
    completed steps are kept, the others run again with fresh retry budgets (crash counts are
    kept); its inputs and recorded ``input_roots`` are kept. Returns the full id, the steps
    to publish and the committed events."""
    execution_id = find_execution(store, execution_id)
    now = time.time()
    with store.write() as conn:
        tx = _Tx(store, conn, now)
        x = tx.lock(execution_id)
        assert x is not None
        status = ExecutionStatus(x.status)
        if not status.retryable:
            what = ("has completed; nothing to retry" if status is ExecutionStatus.COMPLETED
                    else f"is {status.value}")
            raise ExecutionStateError(f"execution {execution_id[:12]} of pipeline "
                                      f"'{x.pipeline}' {what}", execution_id=execution_id)
        conn.execute(steps.update().where(
            steps.c.execution_id == execution_id,
            steps.c.status.notin_([StepStatus.COMPLETED.value, StepStatus.RUNNING.value]))
            .values(status=StepStatus.PENDING.value, failures=0, error=None,
                    next_attempt_at=None, ready_at=None))
        dep = steps.alias("dep")
        unmet = (sa.select(sa.func.count()).select_from(
            step_deps.join(dep, sa.and_(dep.c.execution_id == step_deps.c.execution_id,
                                        dep.c.key == step_deps.c.dep)))
            .where(step_deps.c.execution_id == steps.c.execution_id,
                   step_deps.c.step_key == steps.c.key, step_deps.c.kind == "key",
                   dep.c.status != StepStatus.COMPLETED.value)
            .scalar_subquery())
        conn.execute(steps.update().where(
            steps.c.execution_id == execution_id,
            steps.c.status == StepStatus.PENDING.value).values(waiting=unmet))
        totals = conn.execute(sa.select(
            sa.func.count(),
            sa.func.sum(sa.case((steps.c.status != StepStatus.COMPLETED.value, 1), else_=0)),
            sa.func.sum(sa.case((steps.c.status == StepStatus.RUNNING.value, 1), else_=0)),
            sa.func.coalesce(sa.func.sum(steps.c.weight * steps.c.progress), 0.0),
            sa.func.coalesce(sa.func.sum(steps.c.weight), 0.0))
            .where(steps.c.execution_id == execution_id)).one()
        x.unfinished, x.active = int(totals[1] or 0), int(totals[2] or 0)
        x.wsum, x.wtotal = float(totals[3]), float(totals[4])
        x.status, x.error, x.finished_at = _RUNNING, None, None
        runs = conn.execute(executions.update().where(executions.c.id == execution_id)
                            .values(runs=executions.c.runs + 1, cancel_requested=False)
                            .returning(executions.c.runs)).scalar_one()
        with_names = sa.select(step_deps.c.step_key).where(
            step_deps.c.execution_id == execution_id, step_deps.c.kind == "name")
        free = list(conn.execute(sa.select(steps.c.key).where(
            steps.c.execution_id == execution_id, steps.c.status == StepStatus.PENDING.value,
            steps.c.waiting == 0, steps.c.key.notin_(with_names)).order_by(steps.c.seq))
            .scalars())
        tx.emit("execution.retried", x, None, {"run": runs, "mode": MODE})
        tx.make_ready(x, free)
        tx.settle(x)
        committed = tx.save()
    return execution_id, tx.ready, committed


def cancel(store: StateStore, execution_id: str) -> list[Event]:
    """Cancel a running distributed execution at once: its waiting steps end ``cancelled``;
    running ones are stopped by their workers at the next heartbeat and end ``cancelled``."""
    now = time.time()
    with store.write() as conn:
        tx = _Tx(store, conn, now)
        x = tx.lock(execution_id)
        if x is None or not x.running:
            return []
        x.status = ExecutionStatus.CANCELLED.value
        x.error = "cancelled by request"
        x.finished_at = now
        n = conn.execute(steps.update().where(
            steps.c.execution_id == execution_id,
            steps.c.status.in_([StepStatus.PENDING.value, StepStatus.READY.value,
                                StepStatus.RETRYING.value]))
            .values(status=StepStatus.CANCELLED.value)).rowcount
        running = conn.execute(sa.select(sa.func.count()).where(
            steps.c.execution_id == execution_id,
            steps.c.status == StepStatus.RUNNING.value)).scalar_one()
        x.active = int(running)
        tx.emit("execution.cancelled", x, None, {"error": x.error, "cancelled_steps": n})
        return tx.save()


# -- what workers commit ---------------------------------------------------------------------


Known = dict[str, tuple[str, str | None, dict[str, Any], list[str] | None]]
"""What :func:`claim` caches per execution id: (pipeline, reference, inputs, input_roots),
which never change after the submit."""


def claim(store: StateStore, worker: str, deliveries: Sequence[Delivery], *,
          lease: float, known: Known | None = None,
          ) -> tuple[list[Claimed], list[Event]]:
    """Take the delivered steps that are still ready in a running execution, each as a new
    attempt with a lease of ``lease`` seconds. Stale deliveries are skipped. ``known`` caches
    each execution's (pipeline, reference, inputs, input_roots), which never change; it is
    filled here (one query for the executions not in it, none for those that are).

    Not a durable commit: if the database loses it in a crash, the step is ready again and
    this attempt's later writes are fenced off."""
    if not deliveries:
        return [], []
    with store.write(durable=False) as conn:
        return _claim_in(store, conn, worker, deliveries, lease, time.time(),
                         {} if known is None else known)


def _claim_in(store: StateStore, conn: sa.Connection, worker: str,
              deliveries: Sequence[Delivery], lease: float, now: float, known: Known,
              ) -> tuple[list[Claimed], list[Event]]:
    by_exec: dict[str, set[str]] = defaultdict(set)
    for d in deliveries:
        by_exec[d.execution_id].add(d.key)
    running = sa.select(executions.c.id).where(executions.c.status == _RUNNING)
    rows: list[Any] = []
    for execution_id in sorted(by_exec):
        rows.extend(conn.execute(steps.update().where(
            steps.c.execution_id == execution_id,
            steps.c.key.in_(sorted(by_exec[execution_id])),
            steps.c.status == StepStatus.READY.value, steps.c.execution_id.in_(running))
            .values(status=StepStatus.RUNNING.value, attempt=steps.c.attempt + 1,
                    worker=worker, lease_until=now + lease, started_at=now, message=None,
                    next_attempt_at=None)
            .returning(steps.c.execution_id, steps.c.key, steps.c.name, steps.c.params,
                       steps.c.attempt, steps.c.weight, steps.c.progress,
                       steps.c.ready_at)).all())
    if not rows:
        return [], []
    missing = {r.execution_id for r in rows} - known.keys()
    if missing:
        if len(known) > 1000:
            known.clear()
        for x in conn.execute(sa.select(
                executions.c.id, executions.c.pipeline, executions.c.pipeline_ref,
                executions.c.inputs, executions.c.input_roots)
                .where(executions.c.id.in_(sorted(missing)))):
            known[x.id] = (x.pipeline, x.pipeline_ref, x.inputs, x.input_roots)
    claimed = []
    for r in rows:
        pipeline, ref, inputs, roots = known[r.execution_id]
        claimed.append(Claimed(
            execution_id=r.execution_id, key=r.key, name=r.name, params=r.params,
            attempt=r.attempt, weight=r.weight, progress=r.progress, pipeline=pipeline,
            pipeline_ref=ref, inputs=inputs, input_roots=roots, ready_at=r.ready_at,
            started_at=now))
    committed = insert_events(store, conn, [
        Event("step.started", now, c.execution_id, c.key,
              {"attempt": c.attempt, "worker": worker}) for c in claimed])
    return claimed, committed


def commit_round(store: StateStore, work: Round, *, worker: str | None = None,
                 take: int = 0, lease: float = 0.0) -> RoundResult:
    """Commit a worker's round (spawns, progress, outcomes) in one transaction, fenced by
    attempt; dependents of completed steps become ready in the same transaction.

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
        tx = _Tx(store, conn, time.time())
        for execution_id in sorted(by_exec):
            part = by_exec[execution_id]
            x = tx.lock(execution_id)
            if x is None:
                continue
            _commit_spawns(tx, x, part.spawns, result)
            for p in part.progress:
                n = conn.execute(steps.update().where(
                    steps.c.execution_id == x.id, steps.c.key == p.key,
                    steps.c.attempt == p.attempt, steps.c.status == StepStatus.RUNNING.value)
                    .values(progress=p.pct, message=p.message)).rowcount
                if n:
                    x.wsum += p.weight * (p.pct - p.before)
                    tx.emit("step.progress", x, p.key, {
                        "progress": p.pct, "message": p.message,
                        "execution_progress": round(x.wsum / x.wtotal, 2) if x.wtotal else 0})
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
        for o in work.outcomes:
            if o.kind != "failed":
                continue
            at = conn.execute(sa.select(steps.c.next_attempt_at).where(
                steps.c.execution_id == o.execution_id, steps.c.key == o.key,
                steps.c.status == StepStatus.RETRYING.value)).scalar()
            if at is not None:
                result.retry_at.append((at, Delivery(o.execution_id, o.key)))
    result.ready = tx.ready
    return result


def _commit_spawns(tx: _Tx, x: _ExecRow, spawns: list[Spawn], result: RoundResult) -> None:
    if not spawns:
        return
    holders = {(s.spawner, s.attempt) for s in spawns}
    alive = set()
    for spawner, attempt in holders:
        if tx.conn.execute(sa.select(steps.c.key).where(
                steps.c.execution_id == x.id, steps.c.key == spawner,
                steps.c.attempt == attempt,
                steps.c.status == StepStatus.RUNNING.value)).first() is not None:
            alive.add((spawner, attempt))
        else:
            result.fenced.append((x.id, spawner, attempt))
    specs = [s.spec for s in spawns if (s.spawner, s.attempt) in alive]
    tx.insert_steps(x, specs, spawned=True)


def release_due(store: StateStore) -> list[Delivery]:
    """Make the steps whose retry delay has passed ready again; return them to publish."""
    now = time.time()
    due = (steps.c.status == StepStatus.RETRYING.value, steps.c.next_attempt_at <= now,
           steps.c.execution_id.in_(sa.select(executions.c.id).where(
               executions.c.status == _RUNNING, executions.c.mode == MODE)))
    with store.read() as conn:
        if conn.execute(sa.select(steps.c.key).where(*due).limit(1)).first() is None:
            return []
    with store.write() as conn:
        rows = conn.execute(sa.select(steps.c.execution_id, steps.c.key).where(*due)).all()
        out: list[Delivery] = []
        for r in rows:
            n = conn.execute(steps.update().where(
                steps.c.execution_id == r.execution_id, steps.c.key == r.key,
                steps.c.status == StepStatus.RETRYING.value).values(
                    status=StepStatus.READY.value, ready_at=now, published_at=now)).rowcount
            if n:
                out.append(Delivery(r.execution_id, r.key))
    return out


def renew(store: StateStore, worker: str, held: Sequence[tuple[str, str, int]], *,
          lease: float, concurrency: int, output_tail: str | None = None,
          status: str = "running",
          steps_done: int = 0) -> tuple[set[tuple[str, str, int]], set[str]]:
    """Renew the leases of ``held`` attempts and the worker's heartbeat.

    Returns the attempts whose lease was lost (another worker may run them: stop them and
    commit nothing) and the executions among them that were cancelled (stop their steps; a
    failed execution's running steps finish and keep their results)."""
    now = time.time()
    lost: set[tuple[str, str, int]] = set()
    with store.write(durable=False) as conn:
        for execution_id, key, attempt in held:
            n = conn.execute(steps.update().where(
                steps.c.execution_id == execution_id, steps.c.key == key,
                steps.c.attempt == attempt, steps.c.status == StepStatus.RUNNING.value)
                .values(lease_until=now + lease)).rowcount
            if not n:
                lost.add((execution_id, key, attempt))
        host, _, rest = worker.partition(":")
        pid = int(rest.partition(":")[0] or 0)
        values: dict[str, Any] = {"status": status, "heartbeat_at": now,
                                  "concurrency": concurrency, "steps_done": steps_done}
        if output_tail is not None:
            values["output_tail"] = output_tail
        if not conn.execute(workers.update().where(workers.c.id == worker)
                            .values(**values)).rowcount:
            conn.execute(workers.insert().values(id=worker, host=host, pid=pid,
                                                 started_at=now, **values))
        ids = sorted({e for e, _k, _a in held})
        stopped = set(conn.execute(sa.select(executions.c.id).where(
            executions.c.id.in_(ids),
            executions.c.status == ExecutionStatus.CANCELLED.value)).scalars()) if ids \
            else set()
    return lost, stopped


def sweep(store: StateStore, *, max_crashes: int, stale_after: float,
          republish_after: float) -> tuple[list[Delivery], list[Event]]:
    """Recover what no worker holds: running steps whose lease expired or whose worker is
    dead (ready again, or failed as poison after ``max_crashes`` crashes), retries that are
    due, and ready steps not taken ``republish_after`` seconds after their last publication.
    Returns the steps to publish and the committed events. Safe to run in every worker."""
    now = time.time()
    out = release_due(store)
    with store.read() as conn:
        running = conn.execute(sa.select(
            steps.c.execution_id, steps.c.key, steps.c.attempt, steps.c.worker,
            steps.c.lease_until).where(steps.c.status == StepStatus.RUNNING.value,
                                       steps.c.execution_id.in_(sa.select(executions.c.id)
                                                                .where(executions.c.mode == MODE)))
        ).all()
        holders = {r.worker for r in running if r.worker}
        known = {r.id: r for r in conn.execute(sa.select(
            workers.c.id, workers.c.heartbeat_at, workers.c.status, workers.c.output_tail)
            .where(workers.c.id.in_(sorted(holders))))} if holders else {}
    dead = {w for w in holders
            if (known[w].status == "stopped" if w in known else False)
            or owner_is_dead(w, known[w].heartbeat_at if w in known else None, stale_after)}
    lapsed = [r for r in running
              if r.worker in dead or (r.lease_until is not None and r.lease_until < now)]
    committed: list[Event] = []
    if lapsed:
        with store.write() as conn:
            tx = _Tx(store, conn, now)
            for r in sorted(lapsed, key=lambda r: (r.execution_id, r.key)):
                x = tx.lock(r.execution_id)
                if x is None:
                    continue
                crashed = r.worker in dead
                tail = known[r.worker].output_tail if r.worker in known else None
                _reclaim(tx, x, r, crashed, tail, max_crashes)
                tx.settle(x)
            committed = tx.save()
        out.extend(tx.ready)
    forgotten = (steps.c.status == StepStatus.READY.value,
                 steps.c.published_at < now - republish_after,
                 steps.c.execution_id.in_(sa.select(executions.c.id).where(
                     executions.c.status == _RUNNING, executions.c.mode == MODE)))
    with store.read() as conn:
        if conn.execute(sa.select(steps.c.key).where(*forgotten).limit(1)).first() is None:
            return out, committed
    with store.write(durable=False) as conn:
        stale: Sequence[Any] = conn.execute(sa.select(steps.c.execution_id, steps.c.key)
                                            .where(*forgotten).limit(5000)).all()
        for r in stale:
            conn.execute(steps.update().where(steps.c.execution_id == r.execution_id,
                                              steps.c.key == r.key)
                         .values(published_at=now))
        out.extend(Delivery(r.execution_id, r.key) for r in stale)
    return out, committed


def _reclaim(tx: _Tx, x: _ExecRow, r: Any, crashed: bool, tail: str | None,
             max_crashes: int) -> None:
    fenced = (steps.c.execution_id == x.id, steps.c.key == r.key, steps.c.attempt == r.attempt,
              steps.c.status == StepStatus.RUNNING.value)
    row = tx.conn.execute(sa.select(steps.c.crashes).where(*fenced[:3])).first()
    if row is None:
        return
    crashes = row.crashes + (1 if crashed else 0)
    why = (f"worker {r.worker} died while running it (killed, os._exit or a native crash)"
           if crashed else f"the lease of worker {r.worker} expired")
    if crashed and crashes >= max_crashes:
        text = (f"StepCrashedError: pipeline '{x.pipeline}', step '{r.key}': {why}; crash "
                f"{crashes} of at most {max_crashes}, failed as poison")
        if tail:
            text += f"\n\nlast output of the worker:\n{tail}"
        if tx.conn.execute(steps.update().where(*fenced).values(
                status=StepStatus.FAILED.value, crashes=crashes, error=text,
                finished_at=tx.now, lease_until=None)).rowcount:
            x.active -= 1
            tx.emit("step.failed", x, r.key, {"attempt": r.attempt, "crashes": crashes,
                                              "error": text.splitlines()[0]})
            tx.fail_execution(x, f"pipeline '{x.pipeline}': step {r.key} crashed its worker "
                                 f"{crashes} times; failed as poison")
        return
    status = StepStatus.READY if x.running else (
        StepStatus.CANCELLED if x.status == ExecutionStatus.CANCELLED.value
        else StepStatus.PENDING)
    if not tx.conn.execute(steps.update().where(*fenced).values(
            status=status.value, crashes=crashes, error=why, lease_until=None, worker=None,
            ready_at=tx.now, published_at=tx.now)).rowcount:
        return
    if status is StepStatus.READY:
        tx.ready.append(Delivery(x.id, r.key))
    else:
        x.active -= 1
    tx.emit("step.crashed" if crashed else "step.lease_expired", x, r.key,
            {"attempt": r.attempt, "crashes": crashes, "error": why})
