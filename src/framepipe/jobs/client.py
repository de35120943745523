"""The job client: submit, read, wait for, retry and cancel executions, in either mode.

:class:`JobClient` is how programs use executions, as Temporal's and Hatchet's clients are for
theirs: the command line, the HTTP service, :func:`~framepipe.run_pipeline` and the examples
go through it. It is the same in both modes. Embedded (the default), executions run in the
client's :class:`~framepipe.jobs.engine.JobEngine`, in this process; with workers
(``FRAMEPIPE_BROKER_URL`` or ``FRAMEPIPE_JOBS_MODE=workers``) the same engine hands them to
``framepipe worker`` processes. Reads go to the state store through its one store module
(:mod:`framepipe.jobs.records`), so they show every execution alike, whoever runs it.

::

    async with JobClient() as client:
        execution_id = await client.submit(pipeline, {"card": "/media/sd1"})
        info = await client.wait(execution_id, raise_on_failure=False)
        for summary in await client.list(status="failed"):
            print(summary.id, summary.steps_done, summary.steps_total)

:class:`SyncJobClient` is the same client for code without an event loop. What the calls
return is defined in :mod:`framepipe.jobs.client_types`.

Guarantees of every call:

* an execution is named by its id or a unique prefix of at least 4 characters (``events``
  filters by a full id, as events carry it);
* errors come from framepipe's one error tree: :class:`ExecutionNotFoundError` (no such
  execution, or an ambiguous prefix), :class:`ExecutionStateError` (its status forbids the
  call, or the client is closed), :class:`InvalidInputError` (a refused argument or input,
  naming it), :class:`ExecutionFailedError` (``wait``/``run`` of an execution that did not
  complete, when asked to raise), :class:`PipelineDefinitionError`, and
  :class:`StateStoreError` for a failing state database (SQLAlchemy's error is its cause);
* before its first read the client marks executions of dead engines ``interrupted`` (or
  ``failed``, for poison steps), as every framepipe process that opens the store does, so what
  it reads is what is; the engine does the same when it starts.

One concept, the client, longer than most for its docstrings: each method states what it
guarantees in both modes.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from typing import Any, TypeVar

from framepipe.backends.objects import ObjectStore
from framepipe.backends.state import StateStore
from framepipe.config import Settings, load_settings
from framepipe.errors import ExecutionStateError, InvalidInputError
from framepipe.events import Event, EventBus
from framepipe.jobs import records
from framepipe.jobs.client_types import (
    CancelResult,
    EventPage,
    ExecutionSummary,
    Mode,
    StatusFilter,
    status_values,
)
from framepipe.jobs.control import request_cancel
from framepipe.jobs.engine import JobEngine
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.pruning import FINISHED, ObjectsAfter, PrunedExecution, prune_executions
from framepipe.jobs.recovery import recover_for
from framepipe.jobs.retry_checks import check_retryable
from framepipe.jobs.store_failures import database_errors

__all__ = [
    "CancelResult",
    "EventPage",
    "ExecutionSummary",
    "JobClient",
    "Mode",
    "check_retryable",
]

T = TypeVar("T")

MAX_PAGE = 10_000
"""The most events one :meth:`JobClient.events` page may hold."""


# -- the async client ---------------------------------------------------------------------------


class JobClient:
    """Submit, read, wait for, retry and cancel executions, the same in both modes.

    ``JobClient(settings=...)`` opens the state store of the settings (``store`` gives one to
    use instead) and makes an engine on it, started at the first call that needs it (submit,
    run, retry, wait) or by ``start(engine=True)``; ``pipelines`` are registered with it (for
    :meth:`retry`). ``JobClient(engine=engine)`` wraps an engine its owner starts and stops
    (a service's, a detector hub's), with its store and settings.

    Use it as an async context manager. :meth:`close` stops the client's own engine: embedded
    executions it still runs end ``interrupted`` (their running steps get ``shutdown_grace``)
    and stay resumable with :meth:`retry`; executions on workers carry on without it. Calls
    are made on one event loop; several may run at once.
    """

    def __init__(
        self,
        store: StateStore | None = None,
        *,
        settings: Settings | None = None,
        engine: JobEngine | None = None,
        objects: ObjectStore | None = None,
        concurrency: int | None = None,
        pipelines: Iterable[Pipeline] = (),
    ) -> None:
        if engine is not None:
            if any(given is not None for given in (store, settings, objects, concurrency)):
                raise TypeError(
                    "JobClient(engine=...) uses that engine's store, settings and "
                    "objects: give nothing else"
                )
            self.settings = engine.settings
            self.store = engine.store
            self._engine = engine
            self._own_store = self._own_engine = False
        else:
            self.settings = settings or load_settings()
            self._own_store = store is None
            self.store = store or StateStore(
                self.settings.resolved_database_url,
                sqlite_synchronous=self.settings.sqlite_synchronous,
            )
            self._engine = JobEngine(
                self.store, settings=self.settings, objects=objects, concurrency=concurrency
            )
            self._own_engine = True
        for pipeline in pipelines:
            self._engine.register(pipeline)
        # A wrapped engine is its owner's to start; starting it recovers dead engines' work.
        self._engine_started = self._recovered = not self._own_engine
        self._lock = asyncio.Lock()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def engine(self) -> JobEngine:
        """The engine that submits (and, embedded, runs) this client's executions."""
        return self._engine

    @property
    def bus(self) -> EventBus:
        """The engine's bus: committed events of the executions this client's engine runs,
        submits or resumes, and the stored events of any execution a :meth:`wait` of this
        client follows (published as they are read), in commit order."""
        return self._engine.bus

    @property
    def mode(self) -> Mode:
        """``"workers"`` when the settings send executions to ``framepipe worker`` processes,
        else ``"embedded"``."""
        return "workers" if self.settings.distributed_jobs else "embedded"

    async def start(self, *, engine: bool = False) -> JobClient:
        """Make the client ready; with ``engine`` also start its engine now (a service does,
        so that code holding :attr:`engine` may submit), not at the first call needing it."""
        self._check_open()
        if engine:
            await self._ready_engine()
        return self

    async def close(self) -> None:
        """Stop the client's own engine (see the class) and close the store it opened.
        Idempotent; a wrapped engine and a given store are left to their owners."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._own_engine:
                await self._engine.stop()
        finally:
            if self._own_store:
                self.store.close()

    async def __aenter__(self) -> JobClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def register(self, pipeline: Pipeline) -> None:
        """Make ``pipeline`` known by name, for :meth:`retry` of its executions."""
        self._engine.register(pipeline)

    # -- executions -----------------------------------------------------------------------------

    async def submit(
        self,
        pipeline: Pipeline,
        inputs: Mapping[str, Any] | None = None,
        *,
        ref: str | None = None,
        input_roots: Iterable[str | os.PathLike[str]] | None = None,
    ) -> str:
        """Create an execution of ``pipeline`` and start it; return its id.

        The inputs are checked first and a refusal creates nothing
        (:class:`InvalidInputError` naming the field, :class:`InputTooLargeError`,
        :class:`PathNotAllowedError` for a local path outside ``input_roots``); see
        :meth:`JobEngine.submit` for ``ref`` and ``input_roots``. The execution and its
        initial steps are committed before this returns. Embedded, it runs in this client's
        engine: keep the client open until it ends (:meth:`wait`)."""
        engine = await self._ready_engine()
        with database_errors():
            return await engine.submit(pipeline, inputs, ref=ref, input_roots=input_roots)

    async def run(
        self,
        pipeline: Pipeline,
        inputs: Mapping[str, Any] | None = None,
        *,
        ref: str | None = None,
        input_roots: Iterable[str | os.PathLike[str]] | None = None,
        raise_on_failure: bool = True,
    ) -> ExecutionInfo:
        """:meth:`submit`, then :meth:`wait` for its end."""
        execution_id = await self.submit(pipeline, inputs, ref=ref, input_roots=input_roots)
        return await self.wait(execution_id, raise_on_failure=raise_on_failure)

    async def get(self, execution_id: str, *, with_steps: bool = True) -> ExecutionInfo:
        """The execution as stored, with its steps in creation order and its ``data`` (the
        outputs merged in completion order); ``with_steps=False`` reads neither."""
        await self._recover()
        return await self._db(
            functools.partial(
                records.get_execution, self.store, execution_id, with_steps=with_steps
            )
        )

    async def list(
        self,
        *,
        status: StatusFilter = None,
        pipeline: str | None = None,
        limit: int = 50,
        with_inputs: bool = False,
    ) -> builtins.list[ExecutionSummary]:
        """At most ``limit`` executions, newest first, each with its completed and total step
        counts; only those with one of the ``status`` values (a status no execution can have
        matches none) and of ``pipeline`` when given. Inputs are read only ``with_inputs``, so
        a listing's size does not depend on what clients submitted."""
        if limit < 1:
            raise InvalidInputError(f"must be at least 1, not {limit}", where="limit")
        statuses = status_values(status)
        await self._recover()
        rows = await self._db(
            functools.partial(
                records.list_executions,
                self.store,
                limit=limit,
                status=statuses,
                pipeline=pipeline,
                with_inputs=with_inputs,
            )
        )
        return [
            ExecutionSummary.of(info, done, total, with_inputs=with_inputs)
            for info, done, total in rows
        ]

    async def step_durations(
        self, per_pipeline: int = 20
    ) -> builtins.list[tuple[str, str, str, float]]:
        """``(pipeline, execution id, step name, seconds)`` of the completed steps of each
        pipeline's newest ``per_pipeline`` completed executions, newest first, steps in the
        order they ran (for charts of where a pipeline's time goes)."""
        if per_pipeline < 1:
            raise InvalidInputError(f"must be at least 1, not {per_pipeline}", where="per_pipeline")
        return await self._db(records.completed_step_durations, self.store, per_pipeline)

    async def last_event_at(self, execution_id: str) -> float | None:
        """When the newest stored event of the execution (id or unique prefix) was made (unix
        seconds): it moves with every progress report. None when none is stored."""
        self._check_open()
        return await self._db(records.last_event_at, self.store, await self._find(execution_id))

    async def wait(
        self,
        execution_id: str,
        *,
        raise_on_failure: bool = True,
        poll_interval: float | None = None,
    ) -> ExecutionInfo:
        """Wait until the execution is finished (completed, failed, cancelled or
        interrupted); return it with its steps and data.

        :class:`ExecutionFailedError` (with the final status and each failed step's error) if
        it did not complete, unless ``raise_on_failure`` is false. An execution this client's
        engine runs is awaited; any other (on workers, in another process) is polled every
        ``poll_interval`` seconds (0.05 with workers, else 0.5) and its stored events are
        published on :attr:`bus` as they appear."""
        engine = await self._ready_engine()
        full_id = await self._find(execution_id)
        with database_errors():
            return await engine.wait(
                full_id, raise_on_failure=raise_on_failure, poll_interval=poll_interval
            )

    async def retry(
        self, execution_id: str, pipeline: Pipeline | None = None, *, ref: str | None = None
    ) -> str:
        """Resume a failed, cancelled or interrupted execution from where it stopped; return
        its full id. Completed steps are not run again; the others run with fresh retry
        budgets; the inputs and recorded ``input_roots`` are kept. Embedded, ``pipeline`` (or
        one :meth:`register` ed under the execution's pipeline name) runs it in this client's
        engine; on workers it is not needed, and given, the workers load it (from ``ref``,
        else its own reference) from this run on. Any other status:
        :class:`ExecutionStateError` (see :func:`check_retryable`); see
        :meth:`JobEngine.retry` for the rest."""
        engine = await self._ready_engine()
        with database_errors():
            return await engine.retry(execution_id, pipeline, ref=ref)

    async def cancel(self, execution_id: str) -> CancelResult:
        """Cancel an execution: nothing new starts, running steps are asked to stop, its
        unfinished steps end ``cancelled`` (see :class:`CancelResult` for when). Completed or
        already cancelled: :class:`ExecutionStateError`."""
        full_id = await self._find(execution_id)
        if full_id in self._engine.active_executions:
            with database_errors():
                await self._engine.cancel(full_id)
            return CancelResult(full_id, cancelled=False, events=[])
        events = await self._db(request_cancel, self.store, full_id)
        self.bus.publish(events)
        return CancelResult(full_id, cancelled=bool(events), events=events)

    async def prune(
        self,
        older_than: float,
        *,
        statuses: Collection[ExecutionStatus] = FINISHED,
        pipeline: str | None = None,
        dry_run: bool = False,
        objects: ObjectsAfter | None = None,
        stop: threading.Event | None = None,
    ) -> builtins.list[PrunedExecution]:
        """Delete the executions that finished more than ``older_than`` seconds ago, with their
        steps and events (:func:`~framepipe.jobs.pruning.prune_executions`: never a pending
        or running one, the import ledger stays); ``dry_run`` deletes nothing. With
        ``objects``, each one's object prefix is recorded in the same transaction, for
        :func:`~framepipe.jobs.pruning.delete_objects`; ``stop`` set ends it after the batch
        under way. Returns them, oldest first. A negative age or a status that is not
        finished: ValueError."""
        await self._recover()
        return await self._db(
            functools.partial(
                prune_executions,
                self.store,
                older_than,
                statuses=statuses,
                pipeline=pipeline,
                dry_run=dry_run,
                objects=objects,
                stop=stop,
            )
        )

    # -- events ---------------------------------------------------------------------------------

    async def events(
        self, execution_id: str | None = None, *, after: int = 0, limit: int = 200
    ) -> EventPage:
        """Stored events with an id above ``after``, oldest first, at most ``limit`` (1 to
        10,000): of the execution with the full id ``execution_id`` (an unknown id has none),
        or of every execution and live app. An id is read only once every lower id is
        settled (committed or rolled back; see
        :func:`~framepipe.backends.state.event_log.insert_events`), so paging with
        ``after=page.next`` misses none and repeats none, on both backends (the service's live
        feed reads the same way)."""
        if after < 0:
            raise InvalidInputError(f"must be at least 0, not {after}", where="after")
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInputError(f"must be 1 to {MAX_PAGE}, not {limit}", where="limit")
        await self._recover()
        found = await self._db(
            functools.partial(
                records.list_events, self.store, execution_id, after_id=after, limit=limit
            )
        )
        return EventPage(found, (found[-1].id or after) if found else after)

    async def newest_event_id(self) -> int:
        """The id of the newest stored event (0: none): ``events(after=...)`` with it reads
        only what is stored from now on."""
        self._check_open()
        return await self._db(records.newest_event_id, self.store)

    async def watch(
        self, execution_id: str, *, after: int = 0, poll_interval: float = 0.1
    ) -> AsyncIterator[Event]:
        """The execution's stored events with an id above ``after``, in order, as they are
        committed (read every ``poll_interval`` seconds), until it is finished: the last
        events yielded are those that finished it. The same in both modes, whoever runs it;
        an execution already finished yields its events and ends."""
        full_id = await self._find(execution_id)
        while True:
            # Status first: every event committed before it finished is then in the page.
            status = await self._db(records.execution_status, self.store, full_id)
            page = await self.events(full_id, after=after, limit=1000)
            for event in page:
                yield event
            after = page.next
            if len(page) == 1000:
                continue
            if status.finished:
                return
            await asyncio.sleep(poll_interval)

    async def interrupt(self, *, grace: float | None = None) -> None:
        """Stop every execution this client's engine runs as ``interrupted`` (resumable), as
        Ctrl-C does; running steps get ``grace`` seconds (setting ``shutdown_grace``)."""
        if self._engine_started:
            await self._engine.interrupt(grace=grace)

    # -- plumbing -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ExecutionStateError("the job client is closed")

    async def _ready_engine(self) -> JobEngine:
        self._check_open()
        if not self._engine_started:
            async with self._lock:
                if not self._engine_started:
                    with database_errors():
                        await self._engine.start()
                    self._engine_started = self._recovered = True
        return self._engine

    async def _recover(self) -> None:
        self._check_open()
        if self._recovered:
            return
        async with self._lock:
            if self._recovered:
                return
            events = await self._db(recover_for, self.store, self.settings)
            self._recovered = True
        self.bus.publish(events)

    async def _find(self, execution_id: str) -> str:
        await self._recover()
        return await self._db(records.find_execution, self.store, execution_id)

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        with database_errors():
            return await asyncio.to_thread(fn, *args)
