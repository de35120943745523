"""The embedded engine's group commit: the changes of one scheduling round, committed in one
transaction in the engine's database thread, and the retries of its store calls.

The scheduler (:mod:`framepipe.jobs.scheduler`) marks what a round changed (steps, executions,
events, ledger rows) and what is to happen once it is durable; :meth:`GroupCommit._flush`
takes all of it as one :class:`~framepipe.jobs.batches.Batch`. Guarantees:

* the round's events are published, and its after-commit callbacks run (steps made ready are
  queued, waiters released), only after the transaction that holds them committed, so no step
  starts before its dependencies' completion is durable and no subscriber sees an event that
  is not on disk;
* a step's progress reports of one round are coalesced to its newest, and no event carries an
  ``execution_progress`` lower than one before it of its execution;
* transient store trouble (:func:`~framepipe.jobs.transient.is_transient_store_error`) is
  retried with backoff for up to two minutes, then raised (the engine fails);
* a batch the store refuses for its data is committed execution by execution: only an
  execution whose own changes are refused is failed (:meth:`GroupCommit._fail_refused`, which
  the scheduler defines), the others go on.

State here is mutated by the scheduler task only, as in the scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import tenacity

from framepipe.backends.state import StateStore
from framepipe.events import Event, EventBus
from framepipe.jobs.batches import EXECUTION_COLUMNS, Batch, write_batch
from framepipe.jobs.memory import ExecState, StepState
from framepipe.jobs.storable import brief_error
from framepipe.jobs.transient import is_transient_store_error
from framepipe.logs import get_logger

__all__ = ["GroupCommit"]

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


class GroupCommit:
    """The pending changes of the engine's current round and their commit; see the module
    docstring. The database thread is opened by :meth:`_open` on the running loop and shut by
    :meth:`_close`."""

    def __init__(self, store: StateStore, *, bus: EventBus, owner: str) -> None:
        self.store = store
        self.bus = bus
        self.owner = owner
        self._dirty_steps: dict[int, StepState] = {}
        self._dirty_execs: dict[str, ExecState] = {}
        self._events: list[Event] = []
        self._progress_events: dict[tuple[str, str], Event] = {}
        self._ledger_rows: list[dict[str, Any]] = []
        self._after_commit: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._db: ThreadPoolExecutor | None = None
        self._write_retrying = tenacity.Retrying(**_STORE_RETRIES)

    def _open(self) -> None:
        """Take the running loop; open the database thread."""
        self._loop = asyncio.get_running_loop()
        self._db = ThreadPoolExecutor(1, thread_name_prefix="framepipe-db")

    def _close(self) -> None:
        """Shut the database thread, once the work queued on it is done."""
        assert self._db is not None
        self._db.shutdown(wait=True)

    def _has_changes(self) -> bool:
        return bool(
            self._dirty_steps
            or self._dirty_execs
            or self._events
            or self._ledger_rows
            or self._progress_events
            or self._after_commit
        )

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
            batch.executions.append({k: x.row[k] for k in ("id", *EXECUTION_COLUMNS)})
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
        """Fail an execution whose changes the store refused; returns the events committed.
        Defined by the scheduler, which holds the executions."""
        raise NotImplementedError

    def _forget(self, x: ExecState) -> None:
        """Drop the pending changes of ``x``: none of them is written."""
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
