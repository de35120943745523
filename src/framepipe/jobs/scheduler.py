"""The embedded engine's scheduler: the in-memory executions, their transitions and the group
commit.

One task on the event loop (:meth:`Scheduler._scheduler`) owns all in-memory state
(:mod:`framepipe.jobs.memory`). Steps run in a thread pool (sync functions) or on the loop
(``async def``), through :mod:`framepipe.jobs.running`; they talk to the scheduler only by
posting typed messages (progress, spawn, their end). The scheduler drains its inbox, applies
the changes in memory by the rules of :mod:`framepipe.jobs.rules`, and commits them in **one
transaction per round** (group commit) in a dedicated database thread; only after that commit
does it publish the round's events and start the steps the round made ready. So a step never
starts before its dependencies' completion is durable, and every event a subscriber sees is
already on disk. :class:`~framepipe.jobs.engine.JobEngine` adds the public API (submit, wait,
retry, cancel, the workers mode) on top.

This module is one concept, the scheduler, and longer than most: its transitions (start,
complete, fail, retry, stop, finish, quiescence) share the state above and one discipline
(mutated by the scheduler task only, committed together), which splitting would scatter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import tenacity

from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.events import Event, EventBus
from framepipe.jobs.context import Progressed, Spawned, StepContext, StepMessage
from framepipe.jobs.journal import Journal
from framepipe.jobs.memory import ExecState, Finished, StepState
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.outcomes import RetryPolicy, error_text, is_permanent
from framepipe.jobs.records import Batch, cancel_requested, fail_refused, write_batch
from framepipe.jobs.refusals import refusal_error
from framepipe.jobs.rules import (
    after_failure,
    failed_error,
    interrupted_status,
    is_ready,
    released_by_names,
    stuck_error,
)
from framepipe.jobs.running import run_attempt, run_attempt_async
from framepipe.jobs.storable import brief_error
from framepipe.jobs.transient import is_transient_store_error
from framepipe.logs import get_logger

__all__ = ["Scheduler"]

T = TypeVar("T")
_log = get_logger("jobs.engine")


def _never_back(events: list[Event]) -> None:
    """Each event's ``execution_progress`` raised to the highest one before it of its
    execution: a step's report held back to be coalesced goes out after events of the same
    round that came later, and the bar a browser draws from them must not go back."""
    high: dict[str, float] = {}
    for event in events:
        pct = event.data.get("execution_progress")
        if pct is None or event.execution_id is None:
            continue
        top = max(pct, high.get(event.execution_id, pct))
        high[event.execution_id] = top
        if top != pct:
            event.data["execution_progress"] = top


def _log_retry(state: tenacity.RetryCallState) -> None:
    _log.warning(
        "state store call failed (%s); retrying",
        state.outcome.exception() if state.outcome else None,
    )


_STORE_RETRIES: dict[str, Any] = {
    "retry": tenacity.retry_if_exception(is_transient_store_error),
    "wait": tenacity.wait_exponential_jitter(multiplier=0.05, max=5.0),
    "stop": tenacity.stop_after_delay(120),
    "reraise": True,
    "before_sleep": _log_retry,
}
"""How the engine retries transient store trouble: backoff from 50 ms to 5 s, for up to
two minutes, then the error is raised."""


class Scheduler:
    """The in-memory executions of one engine and the task that moves them; see the module
    docstring. Started by :meth:`_open` on the running loop, ended by :meth:`_close`."""

    def __init__(
        self,
        store: StateStore,
        *,
        settings: Settings,
        objects: ObjectStore | None,
        concurrency: int,
        bus: EventBus,
        owner: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self._objects = objects
        self._own_objects = False
        self.concurrency = concurrency
        self.bus = bus
        self.owner = owner
        self._execs: dict[str, ExecState] = {}
        self._inbox: collections.deque[StepMessage | Finished] = collections.deque()
        self._ready: collections.deque[StepState] = collections.deque()
        self._dirty_steps: dict[int, StepState] = {}
        self._dirty_execs: dict[str, ExecState] = {}
        self._events: list[Event] = []
        self._progress_events: dict[tuple[str, str], Event] = {}
        self._ledger_rows: list[dict[str, Any]] = []
        self._after_commit: list[Callable[[], None]] = []
        self._running = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._db: ThreadPoolExecutor | None = None
        self._journal: Journal | None = None
        self._scheduling = True
        self._write_retrying = tenacity.Retrying(**_STORE_RETRIES)

    def _open(self) -> None:
        """Take the running loop; open the step threads, the database thread and the journal."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="framepipe-step")
        self._db = ThreadPoolExecutor(1, thread_name_prefix="framepipe-db")
        self._journal = Journal(self.settings.run_dir, self.owner)

    def _close(self) -> None:
        """Release what :meth:`_open` opened (step threads still running are not waited for)
        and the object store if this scheduler opened it."""
        assert self._pool is not None
        assert self._db is not None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._db.shutdown(wait=True)
        if self._journal is not None:
            self._journal.close()
        if self._objects is not None and self._own_objects:
            self._objects.close()

    @property
    def _opened_journal(self) -> Journal:
        assert self._journal is not None, "the scheduler is not open"
        return self._journal

    @property
    def objects(self) -> ObjectStore:
        """The object store given steps as ``ctx.objects`` (opened on first use)."""
        if self._objects is None:
            self._objects = open_object_store(self.settings.resolved_objects_url)
            self._own_objects = True
        return self._objects

    # -- building the in-memory graph -------------------------------------------------------

    def _adopt(self, x: ExecState, step_rows: list[dict[str, Any]], *, dirty: bool = False) -> None:
        self._execs[x.id] = x
        x.add_rows(step_rows)
        for s in x.steps.values():
            self._count(x, s, +1)
        for s in x.steps.values():
            self._link(s)
            if dirty:
                self._dirty_steps[id(s)] = s
        for s in list(x.steps.values()):
            if s.status is StepStatus.PENDING and is_ready(
                s.waiting, s.name_deps, running=x.stopping is None
            ):
                self._make_ready(s)
        self._recompute_progress(x)
        self._check_quiescent(x)
        self._wakeup()

    def _count(self, x: ExecState, s: StepState, sign: int) -> None:
        self._running += x.count(s, sign)

    def _set(self, s: StepState, status: StepStatus) -> None:
        x = s.x
        self._count(x, s, -1)
        s.status = status
        self._count(x, s, +1)
        self._dirty_steps[id(s)] = s

    def _link(self, s: StepState) -> None:
        missing = s.x.link(s)
        if missing is not None:
            self._stop_execution(s.x, ExecutionStatus.FAILED, missing)

    # -- the scheduler ----------------------------------------------------------------------

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _post(self, message: StepMessage | Finished) -> None:
        """Called from step threads (and the loop): queue a message for the scheduler."""
        self._inbox.append(message)
        loop = self._loop
        if loop is not None and self._wake is not None and not self._wake.is_set():
            with contextlib.suppress(RuntimeError):  # loop closed: the engine is gone
                loop.call_soon_threadsafe(self._wake.set)

    async def _scheduler(self) -> None:
        """Drain messages and start ready steps continuously; commit in the background.

        One commit is in flight at a time; what happens meanwhile goes into the next one, so
        under load many state changes share one transaction (group commit)."""
        assert self._wake is not None
        commit: asyncio.Task[None] | None = None
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._drain()
                self._dispatch()
                if commit is not None and commit.done():
                    commit.result()
                    commit = None
                if commit is None and self._has_changes():
                    commit = asyncio.create_task(self._flush())
                    commit.add_done_callback(lambda _t: self._wakeup())
        except asyncio.CancelledError:
            if commit is not None:
                await commit
            raise

    def _has_changes(self) -> bool:
        return bool(
            self._dirty_steps
            or self._dirty_execs
            or self._events
            or self._ledger_rows
            or self._progress_events
            or self._after_commit
        )

    def _drain(self) -> None:
        while self._inbox:
            message = self._inbox.popleft()
            x = self._execs.get(message.execution_id)
            if x is None:
                continue
            if isinstance(message, Progressed):
                self._on_progress(x, message.step_key, message.pct, message.message)
            elif isinstance(message, Spawned):
                self._on_spawn(
                    x, message.spawner, message.name, message.params, message.key, message.deps
                )
            else:
                self._on_outcome(x, message)
        for x in list(self._execs.values()):
            self._check_quiescent(x)

    async def _flush(self) -> None:
        if not self._has_changes():
            return
        batch = Batch()
        for s in self._dirty_steps.values():
            (batch.new_steps if s.new else batch.steps).append(s.row())
            s.new = False
        batch.new_steps.sort(key=lambda r: r["seq"])
        self._dirty_steps = {}
        for x in self._dirty_execs.values():
            batch.executions.append(
                {
                    k: x.row[k]
                    for k in (
                        "id",
                        "status",
                        "progress",
                        "error",
                        "owner",
                        "heartbeat_at",
                        "runs",
                        "started_at",
                        "finished_at",
                    )
                }
            )
        self._dirty_execs = {}
        batch.events = self._events
        batch.events.extend(self._progress_events.values())
        _never_back(batch.events)
        self._events, self._progress_events = [], {}
        batch.ledger, self._ledger_rows = self._ledger_rows, []
        after, self._after_commit = self._after_commit, []
        try:
            committed = await self._in_db(self._write, batch)
        except Exception as exc:
            if is_transient_store_error(exc):
                raise  # the store stayed unreachable through every retry: the engine fails
            committed = await self._salvage(batch, exc)
        self.bus.publish(committed)
        for fn in after:
            fn()

    def _write(self, batch: Batch) -> list[Event]:
        """Commit a batch; transient store trouble (a lost connection, a server restart, a
        lock or a pooled connection not granted in time: :func:`is_transient_store_error`) is
        retried for up to two minutes, then raised."""
        return self._retried(write_batch, self.store, batch)

    async def _in_db_retried(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the database thread, transient store trouble retried as
        :meth:`_write` retries it, but from the event loop: each attempt is one short job of
        the database thread (the engine's commits and heartbeats run between them), and the
        caller's cancellation ends the retries."""
        async for attempt in tenacity.AsyncRetrying(**_STORE_RETRIES):
            with attempt:
                return await self._in_db(fn, *args)
        raise AssertionError("unreachable")

    def _retried(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in this (the database) thread, retried as :meth:`_write` retries."""
        for attempt in self._write_retrying:
            with attempt:
                return fn(*args)
        raise AssertionError("unreachable")

    async def _salvage(self, batch: Batch, exc: Exception) -> list[Event]:
        """Commit a batch the store refused for its data (not a lost connection) execution by
        execution: an execution whose own changes are refused is failed
        (:meth:`_fail_refused`); the others are committed and go on, and so does the engine.
        Returns the events committed."""
        _log.warning(
            "the state store refused a group commit (%s); committing it execution by execution",
            brief_error(exc),
        )
        committed: list[Event] = []
        for execution_id, part in batch.by_execution().items():
            try:
                committed.extend(await self._in_db(self._write, part))
            except Exception as refused:
                if is_transient_store_error(refused):
                    raise
                if execution_id is None:
                    _log.error(
                        "the state store refused changes of no execution: %s",
                        brief_error(refused),
                    )
                    continue
                committed.extend(await self._fail_refused(execution_id, refused))
        return committed

    async def _fail_refused(self, execution_id: str, exc: Exception) -> list[Event]:
        """Fail an execution whose changes the store refused: it leaves this engine at once
        (its running steps are told to stop; their results are ignored), it is stored
        ``failed`` with an error that says why, and its waiters return. What it had committed
        before stays, so a retry resumes it."""
        error = refusal_error("this execution's changes", exc)
        x = self._execs.get(execution_id)
        waiters: list[asyncio.Future[None]] = []
        if x is not None:
            waiters = x.waiters
            self._abandon(x)
        label = x.label if x is not None else execution_id[:8]
        _log.error("[%s] execution failed: %s", label, error)
        events: list[Event]
        try:
            events = await self._in_db(
                self._retried,
                fail_refused,
                self.store,
                execution_id,
                self.owner,
                error,
                time.time(),
            )
        except Exception as again:
            _log.error(
                "[%s] the failure could not be stored either (%s); the store keeps the "
                "execution running until this engine stops and another recovers it",
                label,
                brief_error(again),
            )
            events = []
        for f in waiters:
            if not f.done():
                f.set_result(None)
        return events

    def _abandon(self, x: ExecState) -> None:
        """Drop ``x`` from this engine: nothing of it is scheduled or written any more."""
        for s in x.steps.values():
            if s.timer is not None:
                s.timer.cancel()
                s.timer = None
            if s.ctx is not None:
                s.ctx._cancel.set()
                s.ctx = None
            if s.task is not None:
                s.task.cancel()
                s.task = None
            self._count(x, s, -1)
        del self._execs[x.id]
        self._dirty_steps = {k: s for k, s in self._dirty_steps.items() if s.x is not x}
        self._dirty_execs.pop(x.id, None)
        self._events = [e for e in self._events if e.execution_id != x.id]
        self._progress_events = {k: e for k, e in self._progress_events.items() if k[0] != x.id}
        self._ledger_rows = [r for r in self._ledger_rows if r.get("execution_id") != x.id]

    async def _in_db(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._db, fn, *args)

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _mark_exec(self, x: ExecState) -> None:
        self._dirty_execs[x.id] = x

    # -- transitions ----------------------------------------------------------------------------

    def _make_ready(self, s: StepState) -> None:
        x = s.x
        x.name_waiters.pop(s.key, None)
        if x.stopping is not None:
            return
        self._set(s, StepStatus.READY)

        def enqueue() -> None:
            if s.status is StepStatus.READY:
                s.ready_at = time.time()  # stored with the step's start, not a write of its own
                self._ready.append(s)

        self._after_commit.append(enqueue)

    def _dispatch(self) -> None:
        while self._ready and self._running < self.concurrency and self._scheduling:
            s = self._ready.popleft()
            x = s.x
            if s.status is not StepStatus.READY or x.id not in self._execs:
                continue
            if x.stopping is not None:
                self._set(s, StepStatus.PENDING)
                continue
            self._start(s)

    def _start(self, s: StepState) -> None:
        x = s.x
        s.attempt += 1
        s.started_at = time.time()
        s.message = None
        s.next_attempt_at = None
        self._set(s, StepStatus.RUNNING)
        self._set_progress(s, 0.0)
        self._emit(Event("step.started", s.started_at, x.id, s.key, {"attempt": s.attempt}))
        ctx = StepContext(
            pipeline=x.pipeline,
            execution_id=x.id,
            step_key=s.key,
            step_name=s.name,
            attempt=s.attempt,
            inputs=x.inputs,
            data=x.data_view(),
            params=s.params,
            store=self.store,
            objects=lambda: self.objects,
            post=self._post,
            has_key=x.steps.__contains__,
            input_roots=x.input_roots,
            deps_of=x.deps_of,
        )
        s.ctx = ctx
        self._opened_journal.started(x.id, s.key)
        if s.step.is_async:
            s.task = asyncio.create_task(self._run_async(s, ctx))
        else:
            assert self._pool is not None
            self._pool.submit(self._run_sync, s, ctx)

    def _run_sync(self, s: StepState, ctx: StepContext) -> None:
        ran = run_attempt(
            s.step,
            ctx,
            output_limit=self.settings.max_step_output_bytes,
            traceparent=s.x.row.get("traceparent"),
        )
        self._ran(Finished(s, ctx, ran))

    async def _run_async(self, s: StepState, ctx: StepContext) -> None:
        ran = await run_attempt_async(
            s.step,
            ctx,
            output_limit=self.settings.max_step_output_bytes,
            traceparent=s.x.row.get("traceparent"),
        )
        self._ran(Finished(s, ctx, ran))

    def _ran(self, outcome: Finished) -> None:
        """The step's attempt is done (in its own thread or task): tell the scheduler, whatever
        happens to the journal line (a lost outcome would leave the step running forever)."""
        try:
            self._opened_journal.ended(outcome.step.x.id, outcome.step.key)
        except OSError as exc:
            _log.error(
                "[%s] step %s: the journal could not record its end: %s",
                outcome.step.x.label,
                outcome.step.key,
                exc,
            )
        finally:
            self._post(outcome)

    def _on_progress(self, x: ExecState, key: str, pct: float, message: str | None) -> None:
        s = x.steps.get(key)
        if s is None or s.status is not StepStatus.RUNNING:
            return
        s.message = message
        self._set_progress(s, pct)
        self._dirty_steps[id(s)] = s
        self._progress_events.pop((x.id, key), None)  # the newest report goes last
        self._progress_events[(x.id, key)] = Event(
            "step.progress",
            time.time(),
            x.id,
            key,
            {"progress": pct, "message": message, "execution_progress": x.row["progress"]},
        )

    def _on_spawn(
        self,
        x: ExecState,
        spawner: str,
        name: str,
        params: dict[str, Any],
        key: str,
        deps: list[str],
    ) -> None:
        if key in x.steps:
            return
        now = time.time()
        step = x.pipeline.steps[name]
        row = x.new_step_row(step, params, key, deps, spawner, now)
        s = StepState(x, row, step)
        s.new = True
        x.steps[key] = s
        self._count(x, s, +1)
        self._dirty_steps[id(s)] = s
        x.wtotal += s.weight
        self._link(s)
        self._emit(
            Event(
                "step.spawned",
                now,
                x.id,
                key,
                {"name": name, "params": params, "depends_on": s.deps, "spawned_by": spawner},
            )
        )
        if is_ready(s.waiting, s.name_deps, running=x.stopping is None):
            self._make_ready(s)
        self._recompute_progress(x)

    def _on_outcome(self, x: ExecState, outcome: Finished) -> None:
        s, ctx = outcome.step, outcome.ctx
        if s.status is not StepStatus.RUNNING or s.ctx is not ctx:
            _log.warning(
                "[%s] late result of step %s ignored (the step was %s)",
                x.label,
                s.key,
                s.status.value,
            )
            return
        s.ctx = None
        s.task = None
        now = time.time()
        s.finished_at = now
        last_report = self._progress_events.pop((x.id, s.key), None)
        if last_report is not None:  # the step's last report is kept, before its end
            self._emit(last_report)
        ran = outcome.ran
        if ran.error is None:
            self._complete(x, s, ran.output or {}, ran.ledger_rows, now)
        else:
            self._fail(x, s, ran.error, now)
        if x.stopping is not None and x.running == 0:
            self._finalize(x)

    def _complete(
        self,
        x: ExecState,
        s: StepState,
        output: dict[str, Any],
        ledger_rows: list[dict[str, Any]],
        now: float,
    ) -> None:
        s.output = output
        s.error = None
        s.done_seq = x.next_done_seq
        x.next_done_seq += 1
        self._set(s, StepStatus.COMPLETED)
        self._set_progress(s, 100.0)
        if output:
            x.data.update(output)
            x.snapshot = None
        self._ledger_rows.extend(ledger_rows)
        self._emit(
            Event(
                "step.completed",
                now,
                x.id,
                s.key,
                {
                    "attempt": s.attempt,
                    "duration": now - (s.started_at or now),
                    "execution_progress": x.row["progress"],
                },
            )
        )
        for d in s.dependents:
            d.waiting -= 1
            if d.status is StepStatus.PENDING and is_ready(
                d.waiting, d.name_deps, running=x.stopping is None
            ):
                self._make_ready(d)
        s.dependents = []
        if x.unfinished == 0 and x.stopping is None:
            self._finish(x, ExecutionStatus.COMPLETED, None)

    def _fail(self, x: ExecState, s: StepState, exc: BaseException, now: float) -> None:
        text = error_text(exc)
        s.error = text
        if x.stopping is not None and x.stopping is not ExecutionStatus.FAILED:
            s.error = text.splitlines()[0]
            status = interrupted_status(x.stopping)
            self._set(s, status)
            self._emit(
                Event(
                    "step.cancelled" if status is StepStatus.CANCELLED else "step.interrupted",
                    now,
                    x.id,
                    s.key,
                    {"attempt": s.attempt},
                )
            )
            return
        s.failures += 1
        delay = after_failure(
            s.failures,
            RetryPolicy.of(s.step, self.settings),
            permanent=is_permanent(exc),
            running=x.stopping is None,
        )
        if delay is not None:
            s.next_attempt_at = now + delay
            self._set(s, StepStatus.RETRYING)
            _log.warning(
                "[%s] step %s failed (attempt %d of %d), retrying in %.2fs: %s",
                x.label,
                s.key,
                s.failures,
                s.step.retries + 1,
                delay,
                text.splitlines()[0],
            )
            self._emit(
                Event(
                    "step.retrying",
                    now,
                    x.id,
                    s.key,
                    {"attempt": s.attempt, "error": text.splitlines()[0], "delay": delay},
                )
            )
            assert self._loop is not None
            s.timer = self._loop.call_later(delay, self._retry_due, s)
            return
        self._set(s, StepStatus.FAILED)
        summary = failed_error(x.pipeline.name, s.key, s.failures, text)
        _log.error("[%s] %s", x.label, summary)
        self._emit(
            Event(
                "step.failed",
                now,
                x.id,
                s.key,
                {"attempt": s.attempt, "error": text.splitlines()[0], "traceback": text},
            )
        )
        self._stop_execution(x, ExecutionStatus.FAILED, summary)

    def _retry_due(self, s: StepState) -> None:
        s.timer = None
        if s.status is StepStatus.RETRYING and s.x.stopping is None:
            self._set(s, StepStatus.PENDING)
            self._make_ready(s)
            self._wakeup()

    def _stop_execution(self, x: ExecState, reason: ExecutionStatus, error: str) -> None:
        if x.stopping is not None:
            if reason is ExecutionStatus.CANCELLED and x.stopping is not ExecutionStatus.FAILED:
                x.stopping = reason
            return
        x.stopping = reason
        x.row["error"] = error
        for s in x.steps.values():
            if s.timer is not None:
                s.timer.cancel()
                s.timer = None
            if s.status is StepStatus.RUNNING and reason is not ExecutionStatus.FAILED:
                if s.ctx is not None:
                    s.ctx._cancel.set()
                if s.task is not None:
                    s.task.cancel()
        if x.running == 0:
            self._finalize(x)

    def _finalize(self, x: ExecState, *, force: bool = False) -> None:
        """End a stopping execution once no step of it runs (or at once with ``force``)."""
        if x.id not in self._execs or x.stopping is None:
            return
        if x.running and not force:
            return
        cancelled = x.stopping is ExecutionStatus.CANCELLED
        end = StepStatus.CANCELLED if cancelled else StepStatus.PENDING
        for s in x.steps.values():
            if s.status in (StepStatus.READY, StepStatus.RETRYING, StepStatus.RUNNING) or (
                s.status is StepStatus.PENDING and end is StepStatus.CANCELLED
            ):
                if s.ctx is not None:
                    s.ctx._cancel.set()
                    s.ctx = None
                self._set(s, end)
        self._finish(x, x.stopping, x.row["error"])

    def _finish(self, x: ExecState, status: ExecutionStatus, error: str | None) -> None:
        now = time.time()
        x.row.update(status=status.value, error=error, finished_at=now)
        if status is ExecutionStatus.COMPLETED:
            x.row["progress"] = 100.0
        self._mark_exec(x)
        started = x.row.get("started_at") or now
        self._emit(
            Event(
                f"execution.{status.value}",
                now,
                x.id,
                None,
                {
                    "error": error,
                    "duration": now - started,
                    "progress": x.row["progress"],
                    "steps": len(x.steps),
                },
            )
        )
        log = _log.info if status is ExecutionStatus.COMPLETED else _log.error
        log("[%s] execution %s%s", x.label, status.value, f": {error}" if error else "")
        del self._execs[x.id]

        def release() -> None:
            for f in x.waiters:
                if not f.done():
                    f.set_result(None)

        self._after_commit.append(release)

    def _check_quiescent(self, x: ExecState) -> None:
        if x.active or x.stopping is not None or x.unfinished == 0 or x.id not in self._execs:
            return
        waiters = {
            s.key: s.name_deps
            for s in x.name_waiters.values()
            if s.status is StepStatus.PENDING and s.waiting == 0
        }
        open_names = [name for name, n in x.unfinished_by_name.items() if n > 0]
        released = released_by_names(waiters, open_names)
        for key in released:
            self._make_ready(x.steps[key])
        if released:
            return
        stuck = sorted(
            (s for s in x.steps.values() if s.status is StepStatus.PENDING), key=lambda s: s.seq
        )
        self._stop_execution(
            x,
            ExecutionStatus.FAILED,
            stuck_error(x.pipeline.name, len(stuck), [(s.key, s.deps) for s in stuck[:5]]),
        )

    # -- progress -------------------------------------------------------------------------------

    def _set_progress(self, s: StepState, pct: float) -> None:
        if s.x.set_progress(s, pct):
            self._mark_exec(s.x)

    def _recompute_progress(self, x: ExecState) -> None:
        if x.recompute_progress():
            self._mark_exec(x)

    # -- heartbeat and remote cancel --------------------------------------------------------

    async def _heartbeat(self) -> None:
        interval = self.settings.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            if not self._execs:
                continue
            now = time.time()
            for x in self._execs.values():
                x.row["heartbeat_at"] = now
                self._mark_exec(x)
            await asyncio.to_thread(self._opened_journal.compact)
            ids = list(self._execs)
            try:
                cancelled = await self._in_db(cancel_requested, self.store, ids)
            except Exception as exc:
                if not is_transient_store_error(exc):
                    raise
                # The store is unreachable for now: look again at the next beat (the commit
                # of this beat's heartbeats retries on its own).
                _log.warning("cannot read cancel requests (%s); retrying", brief_error(exc))
                cancelled = []
            for execution_id in cancelled:
                target = self._execs.get(execution_id)
                if target is not None:
                    _log.info("[%s] cancel requested through the store", target.label)
                    self._stop_execution(target, ExecutionStatus.CANCELLED, "cancelled by request")
            self._wakeup()
