"""The embedded engine's scheduler: the task that drains the steps' messages, starts the ready
steps and commits each round, and what takes executions in and out of it.

One task on the event loop (:meth:`Scheduler._scheduler`) owns all in-memory state
(:mod:`framepipe.jobs.memory`). Steps run in a thread pool (sync functions) or on the loop
(``async def``), through :mod:`framepipe.jobs.running`; they talk to the scheduler only by
posting typed messages (progress, spawn, their end). The scheduler drains its inbox, applies
the changes in memory (:mod:`framepipe.jobs.lifecycle`, by the rules of
:mod:`framepipe.jobs.rules`), and commits them in **one transaction per round** (group commit,
:mod:`framepipe.jobs.group_commit`) in a dedicated database thread; only after that commit
does it publish the round's events and start the steps the round made ready. So a step never
starts before its dependencies' completion is durable, and every event a subscriber sees is
already on disk. Guarantees of this module:

* one commit is in flight at a time; what happens meanwhile goes into the next one;
* at most ``concurrency`` steps run at once across the engine's executions; none starts once
  the engine stops scheduling;
* a step's end reaches the scheduler whatever happens to its journal line (a lost outcome
  would leave the step running forever);
* the executions' heartbeats are written every ``heartbeat_interval``, and a cancel requested
  through the store stops its execution at the next beat;
* an execution whose changes the store refuses leaves this engine at once and is stored
  ``failed``, saying why; what it had committed stays, so a retry resumes it.

:class:`~framepipe.jobs.engine.JobEngine` adds the public API (submit, wait, retry, cancel,
the workers mode) on top.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.events import Event, EventBus
from framepipe.jobs.cancel_requests import cancel_requested
from framepipe.jobs.context import Progressed, Spawned, StepContext, StepMessage
from framepipe.jobs.journal import Journal
from framepipe.jobs.lifecycle import Lifecycle
from framepipe.jobs.memory import ExecState, Finished, StepState
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.ownership import fail_refused
from framepipe.jobs.refusals import refusal_error
from framepipe.jobs.rules import is_ready
from framepipe.jobs.running import run_attempt, run_attempt_async
from framepipe.jobs.storable import brief_error
from framepipe.jobs.transient import is_transient_store_error
from framepipe.logs import get_logger

__all__ = ["Scheduler"]

_log = get_logger("jobs.engine")


class Scheduler(Lifecycle):
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
        super().__init__(store, settings=settings, bus=bus, owner=owner)
        self._objects = objects
        self._own_objects = False
        self.concurrency = concurrency
        self._inbox: collections.deque[StepMessage | Finished] = collections.deque()
        self._pool: ThreadPoolExecutor | None = None
        self._journal: Journal | None = None
        self._scheduling = True

    def _open(self) -> None:
        """Take the running loop; open the database thread, the step threads and the journal."""
        super()._open()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="framepipe-step")
        self._journal = Journal(self.settings.run_dir, self.owner)

    def _close(self) -> None:
        """Release what :meth:`_open` opened (step threads still running are not waited for)
        and the object store if this scheduler opened it."""
        assert self._pool is not None
        self._pool.shutdown(wait=False, cancel_futures=True)
        super()._close()
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

    # -- executions taken in and dropped -----------------------------------------------------

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
        self._forget(x)

    # -- the scheduler task ---------------------------------------------------------------

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

    # -- running attempts -----------------------------------------------------------------

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
