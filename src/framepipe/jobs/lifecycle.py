"""How the embedded engine's in-memory executions and their steps move: a step made ready,
its progress and spawns, its completion, failure and retry; an execution stopped, finalized,
finished, or found stuck.

The state is :mod:`framepipe.jobs.memory`'s; the decisions are :mod:`framepipe.jobs.rules`'
(the same the workers mode takes). Every transition here runs in the scheduler task
(:mod:`framepipe.jobs.scheduler`) and only marks its changes for the round's commit
(:mod:`framepipe.jobs.group_commit`). Guarantees:

* no step is made ready while its execution stops, and one made ready is queued to start
  only after the commit that holds it;
* a step's last progress report is kept, and goes out before its end; a late result of an
  attempt that no longer runs is ignored (and said);
* a failed step is retried by its policy (:class:`~framepipe.jobs.outcomes.RetryPolicy`) unless
  its error is permanent or its execution stops; a step that fails for good fails its
  execution, whose running steps finish before it ends (a cancel or an interruption tells them
  to stop);
* an execution ends once no step of it runs (at once when the engine forces it): its
  remaining steps are cancelled (cancel) or left pending to resume (failure, interruption),
  and its waiters return after the commit of its end;
* an execution whose steps wait on names no open step can still satisfy is failed as stuck,
  naming the steps, instead of hanging.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.events import Event, EventBus
from framepipe.jobs.group_commit import GroupCommit
from framepipe.jobs.memory import ExecState, Finished, StepState
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.outcomes import RetryPolicy, error_text, is_permanent
from framepipe.jobs.rules import (
    after_failure,
    failed_error,
    interrupted_status,
    is_ready,
    released_by_names,
    stuck_error,
)
from framepipe.logs import get_logger

__all__ = ["Lifecycle"]

_log = get_logger("jobs.engine")


class Lifecycle(GroupCommit):
    """The in-memory executions of one engine and their transitions; see the module
    docstring. The task that calls them is :class:`~framepipe.jobs.scheduler.Scheduler`'s."""

    def __init__(self, store: StateStore, *, settings: Settings, bus: EventBus, owner: str) -> None:
        super().__init__(store, bus=bus, owner=owner)
        self.settings = settings
        self._execs: dict[str, ExecState] = {}
        self._ready: collections.deque[StepState] = collections.deque()
        self._running = 0
        self._wake: asyncio.Event | None = None

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

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
