"""The job engine: runs executions of pipelines, in-process, durable in the state store.

:class:`JobEngine` is the public face of the embedded mode (submit, wait, run, retry, cancel,
interrupt) and the submitter of the distributed one (``FRAMEPIPE_BROKER_URL`` / ``jobs_mode``:
executions are handed to ``framepipe worker`` processes by :mod:`framepipe.jobs.worker_handoff`
and followed through the store by :mod:`framepipe.jobs.following`). How embedded executions run
is :mod:`framepipe.jobs.scheduler` (in-memory state, group commit), by the rules of
:mod:`framepipe.jobs.rules`, the same as on the workers. What a submit checks and stores is
:mod:`framepipe.jobs.submission`; what refuses a retry, :mod:`framepipe.jobs.retry_checks`.

Failure policy (fail fast): when a step fails for good, nothing new starts in its execution;
steps already running are allowed to finish and their results are kept, so ``retry`` does not
redo them. ``cancel`` (and Ctrl-C/SIGTERM) also asks running steps to stop: ``ctx.progress`` and
``ctx.check_cancelled`` raise :class:`StepCancelledError` in them, and ``async`` steps are
cancelled. In both modes an execution is reported finished only once none of its steps runs.

One concept, the public face of the engine, longer than most for its docstrings: each public
method states what it guarantees in both modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from framepipe import tracing
from framepipe.backends.objects import ObjectStore
from framepipe.backends.state import StateStore
from framepipe.config import Settings, load_settings
from framepipe.errors import ExecutionFailedError, ExecutionStateError, InvalidInputError
from framepipe.events import Event, EventBus
from framepipe.jobs import dispatch
from framepipe.jobs.batches import write_batch
from framepipe.jobs.following import follow_stored, poll_stored
from framepipe.jobs.memory import ExecState
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepStatus
from framepipe.jobs.ownership import give_back, take_over
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import execution_mode, get_execution, load_rows
from framepipe.jobs.recovery import recover_for
from framepipe.jobs.retry_checks import (
    check_defines_stored_steps,
    check_retry_pipeline,
    check_retryable,
)
from framepipe.jobs.scheduler import Scheduler
from framepipe.jobs.submission import checked_inputs, new_execution
from framepipe.jobs.worker_handoff import WorkerHandoff
from framepipe.liveness import this_owner
from framepipe.logs import get_logger

__all__ = ["JobEngine"]

_log = get_logger("jobs.engine")


class JobEngine(Scheduler):
    """Runs executions of pipelines in this process, durable in a :class:`StateStore`.

    Use as an async context manager (``async with JobEngine() as engine``), then
    :meth:`submit` / :meth:`wait` / :meth:`run`, :meth:`retry`, :meth:`cancel`. ``concurrency``
    steps run at once across all executions of this engine. Several engines (processes) may
    share one store: each runs the executions it submitted or resumed.
    """

    def __init__(
        self,
        store: StateStore | None = None,
        *,
        settings: Settings | None = None,
        objects: ObjectStore | None = None,
        concurrency: int | None = None,
        bus: EventBus | None = None,
    ) -> None:
        settings = settings or load_settings()
        self._own_store = store is None
        super().__init__(
            store
            or StateStore(
                settings.resolved_database_url, sqlite_synchronous=settings.sqlite_synchronous
            ),
            settings=settings,
            objects=objects,
            concurrency=concurrency or settings.concurrency,
            bus=bus or EventBus(),
            owner=this_owner(uuid.uuid4().hex[:8]),
        )
        self._pipelines: dict[str, Pipeline] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self._fatal: BaseException | None = None
        self._workers = WorkerHandoff(self, in_db=self._in_db)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> JobEngine:
        """Start the scheduler; recovers executions whose engine died."""
        if self._closed:
            raise ExecutionStateError("the job engine is closed")
        if self._started:
            return self
        self._open()
        self._started = True
        events = await self._in_db(self._recover)
        self.bus.publish(events)
        self._tasks = [
            asyncio.create_task(self._scheduler(), name="framepipe-scheduler"),
            asyncio.create_task(self._heartbeat(), name="framepipe-heartbeat"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_ended)
        return self

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """A background task of the engine ended: unless stopped on purpose, fail loudly."""
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        assert exc is not None
        self._fatal = exc
        _log.error(
            "job engine task %s died: %r; its executions stay resumable",
            task.get_name(),
            exc,
            exc_info=exc,
        )
        for x in list(self._execs.values()):
            for f in x.waiters:
                if not f.done():
                    f.set_exception(exc)

    def _recover(self) -> list[Event]:
        return recover_for(self.store, self.settings)

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop: running executions are interrupted (resumable with :meth:`retry`).

        Running steps are asked to stop and get ``grace`` seconds (setting ``shutdown_grace``)
        to finish; a step still running after that is left pending in the store."""
        if not self._started or self._closed:
            self._closed = True
            return
        if self._execs:
            await self.interrupt(grace=grace)
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._flush()
        self._close()
        self._workers.close()
        if self._own_store:
            self.store.close()

    async def __aenter__(self) -> JobEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- public API ---------------------------------------------------------------------------

    def register(self, pipeline: Pipeline) -> None:
        """Make ``pipeline`` known by name, for :meth:`retry` of its executions."""
        pipeline.validate()
        self._pipelines[pipeline.name] = pipeline

    async def submit(
        self,
        pipeline: Pipeline,
        inputs: Mapping[str, Any] | None = None,
        *,
        ref: str | None = None,
        input_roots: Iterable[str | os.PathLike[str]] | None = None,
    ) -> str:
        """Create an execution of ``pipeline`` and start it; return its id.

        ``inputs`` are checked first, in both modes, and a refusal creates nothing: storable
        JSON within ``max_inputs_bytes`` (:class:`InputTooLargeError` otherwise), then the
        pipeline's declared inputs model if it has one (:meth:`Pipeline.check_inputs`:
        :class:`InvalidInputError` naming the field), then the pipeline's ``on_submit``, which
        may pin what they name in the object store. ``input_roots`` is for submitters that
        do not own the machine (the HTTP service passes the setting ``input_roots``): the
        local paths among the declared inputs (fields of type
        :data:`~framepipe.jobs.inputs.LocalPathOrKey`) must then lie inside those folders
        (:class:`PathNotAllowedError` otherwise), and ``[]`` allows none, only object keys;
        None (the command line, the Python API) leaves them unrestricted. A pipeline that
        declares no inputs gets them as given. Either way ``input_roots`` is recorded with the
        execution (resolved; None stays None: unrestricted), by this call only, and kept by
        :meth:`retry`; every step sees it as :attr:`StepContext.input_roots`, in this engine
        or on a worker, and :func:`~framepipe.jobs.inputs.local_input` applies it to any
        input a step reads as a local file (undeclared inputs included). What is stored, and
        what the steps see, is the checked form (resolved paths; see
        :mod:`framepipe.jobs.inputs`). The execution and its initial steps are committed
        before this returns. While OpenTelemetry tracing is on, the submit is the span
        ``execution <pipeline>``, stored with the execution as the parent of every step
        attempt's span, here or on a worker (see ``docs/tracing.md``)."""
        self._check_started()
        pipeline.validate()
        self.register(pipeline)
        checked, roots = await checked_inputs(
            pipeline,
            dict(inputs or {}),
            input_roots=input_roots,
            settings=self.settings,
            objects=lambda: self.objects,
        )
        mode = "worker" if self.settings.distributed_jobs else "embedded"
        with tracing.span(
            f"execution {pipeline.name}",
            kind="PRODUCER",
            attributes={"framepipe.pipeline": pipeline.name, "framepipe.mode": mode},
        ) as span:
            execution_id = await self._create(
                pipeline, checked, ref, roots, tracing.traceparent_of(span)
            )
            if span is not None:
                span.set_attribute("framepipe.execution_id", execution_id)
        return execution_id

    async def _create(
        self,
        pipeline: Pipeline,
        inputs: dict[str, Any],
        ref: str | None,
        roots: list[str] | None,
        traceparent: str | None,
    ) -> str:
        """Store the execution (its checked ``inputs``, its ``roots`` and the ``traceparent``
        of its submit's span) and start it, here or on the workers."""
        if self.settings.distributed_jobs:
            return await self._workers.submit(
                pipeline, inputs, ref or pipeline.ref, roots, traceparent
            )
        x, step_rows, batch = new_execution(
            pipeline,
            inputs,
            ref=ref or pipeline.ref,
            roots=roots,
            traceparent=traceparent,
            owner=self.owner,
            now=time.time(),
        )
        events = await self._in_db(write_batch, self.store, batch)
        self.bus.publish(events)
        self._adopt(x, step_rows)
        _log.info("[%s] execution started (%d initial steps)", x.label, len(step_rows))
        return x.id

    async def wait(
        self,
        execution_id: str,
        *,
        raise_on_failure: bool = True,
        poll_interval: float | None = None,
    ) -> ExecutionInfo:
        """Wait until the execution finishes; return it with its steps and data.

        Raises :class:`ExecutionFailedError` if it did not complete (unless
        ``raise_on_failure`` is false). An execution run by another process (or by workers)
        is polled every ``poll_interval`` seconds (0.05 for workers, else 0.5), and its stored
        events are published on :attr:`bus` as they appear. Transient store trouble while
        polling or reading the result (a lost connection, a pool with no connection to give)
        is retried as the engine's own commits are, for up to two minutes, then raised."""
        x = self._execs.get(execution_id)
        if x is not None:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            x.waiters.append(future)
            await future
        else:
            interval = (
                poll_interval
                if poll_interval is not None
                else (0.05 if self.settings.distributed_jobs else 0.5)
            )
            await follow_stored(
                execution_id,
                bus=self.bus,
                in_db=self._in_db_retried,
                poll=self._poll,
                interval=interval,
            )
        info = await self._in_db_retried(get_execution, self.store, execution_id)
        if raise_on_failure and info.status is not ExecutionStatus.COMPLETED:
            raise ExecutionFailedError(
                f"execution {info.id[:12]} of pipeline '{info.pipeline}' {info.status.value}: "
                f"{(info.error or '').splitlines()[0] if info.error else 'no error recorded'}",
                execution_id=info.id,
                status=info.status.value,
                errors=info.errors,
            )
        return info

    def _poll(
        self, execution_id: str, after: int, with_events: bool
    ) -> tuple[ExecutionStatus, list[Event]]:
        return poll_stored(self.store, execution_id, after, with_events)

    async def run(
        self,
        pipeline: Pipeline,
        inputs: Mapping[str, Any] | None = None,
        *,
        raise_on_failure: bool = True,
    ) -> ExecutionInfo:
        """Submit an execution and wait for its end."""
        execution_id = await self.submit(pipeline, inputs)
        return await self.wait(execution_id, raise_on_failure=raise_on_failure)

    async def retry(
        self, execution_id: str, pipeline: Pipeline | None = None, *, ref: str | None = None
    ) -> str:
        """Resume a failed, cancelled or interrupted execution from where it stopped.

        Completed steps are not run again; failed, cancelled and pending steps run with fresh
        retry budgets. The execution keeps its inputs and the ``input_roots`` its submit
        recorded (whoever asks for the retry). Crash counts are kept across runs, so a step
        that keeps killing its process is failed as poison after ``max_step_crashes``
        crashes in all. Returns the full execution id.

        ``pipeline`` defaults to one registered under the execution's pipeline name (on
        workers: to the one they load from the stored reference). Given, it must bear the
        execution's pipeline name and define every step the execution has, and its reference
        (``ref``, else its own) is stored with the execution in the same transaction as the
        resume, so the workers load it from this run on and a later retry without a pipeline
        finds it. An execution on workers given a pipeline with no reference is refused:
        they could not load it."""
        self._check_started()
        await self._in_db(self._recover)
        info = await self._in_db(
            functools.partial(get_execution, self.store, execution_id, with_steps=False)
        )
        if ref and pipeline is None:
            raise InvalidInputError(
                "a pipeline reference needs the pipeline it names, to check it", where="ref"
            )
        if pipeline is not None:
            await self._check_retry_pipeline(info, pipeline)
            ref = ref or pipeline.ref
        if await self._in_db(execution_mode, self.store, info.id) == dispatch.MODE:
            return await self._workers.resume(info.id, info.pipeline, pipeline, ref)
        if info.id in self._execs:
            raise ExecutionStateError(
                f"execution {info.id[:12]} is running in this engine", execution_id=info.id
            )
        check_retryable(info)
        if pipeline is None:
            pipeline = self._pipelines.get(info.pipeline)
            if pipeline is None:
                raise ExecutionStateError(
                    f"execution {info.id[:12]} is of pipeline '{info.pipeline}', which this "
                    "engine does not know: pass the pipeline or register it",
                    execution_id=info.id,
                )
            await self._check_retry_pipeline(info, pipeline)
        # Everything that can refuse the retry is checked before the take-over (above): once it
        # is committed the execution is this engine's and running, and a refusal after it would
        # leave it so, with no step running and nobody to end it.
        self.register(pipeline)
        now = time.time()
        taken = await self._in_db(
            take_over, self.store, info.id, info.status.value, self.owner, now, ref
        )
        if taken is None:
            raise ExecutionStateError(
                f"execution {info.id[:12]} was resumed or deleted (pruned) by another process",
                execution_id=info.id,
            )
        try:
            row, step_rows = await self._in_db(load_rows, self.store, info.id)
            x = ExecState(row, pipeline)
        except BaseException:
            # Not adopted: give the execution back as it was (a pending cancel request
            # included), so a later retry can take it.
            await self._in_db(self._retried, give_back, self.store, taken, self.owner)
            raise
        for r in step_rows:
            if r["status"] != StepStatus.COMPLETED.value:
                r.update(
                    status=StepStatus.PENDING.value,
                    failures=0,
                    error=None,
                    next_attempt_at=None,
                    ready_at=None,
                )
        self._adopt(x, step_rows, dirty=True)
        x.row["error"] = None
        self._mark_exec(x)
        self._emit(Event("execution.retried", now, x.id, None, {"run": row["runs"]}))
        self._wakeup()
        _log.info("[%s] execution resumed (run %d)", x.label, row["runs"])
        return x.id

    async def _check_retry_pipeline(self, info: ExecutionInfo, pipeline: Pipeline) -> None:
        """Refuse ``pipeline`` for a retry of ``info`` unless it bears its name, is valid and
        defines every step it has stored."""
        check_retry_pipeline(info, pipeline)
        _row, stored_steps = await self._in_db(load_rows, self.store, info.id)
        check_defines_stored_steps(info, pipeline, stored_steps)

    async def cancel(self, execution_id: str) -> None:
        """Cancel an execution: nothing new starts, running steps are asked to stop, unfinished
        steps end ``cancelled``. An execution run by another engine is asked to cancel through
        the store; one that is not running is cancelled at once."""
        self._check_started()
        x = self._execs.get(execution_id)
        if x is None:
            from framepipe.jobs.control import request_cancel

            events = await self._in_db(request_cancel, self.store, execution_id)
            self.bus.publish(events)
            return
        self._stop_execution(x, ExecutionStatus.CANCELLED, "cancelled by request")
        self._wakeup()

    async def interrupt(self, *, grace: float | None = None) -> None:
        """Stop every execution of this engine as ``interrupted`` (Ctrl-C / SIGTERM)."""
        grace = self.settings.shutdown_grace if grace is None else grace
        self._scheduling = False
        waits = []
        for x in list(self._execs.values()):
            self._stop_execution(x, ExecutionStatus.INTERRUPTED, "interrupted (shutdown)")
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            x.waiters.append(future)
            waits.append(future)
        self._wakeup()
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=grace)
            if pending:
                for x in list(self._execs.values()):
                    self._finalize(x, force=True)
                self._wakeup()
                await asyncio.wait(pending, timeout=5)

    @property
    def active_executions(self) -> list[str]:
        """Ids of the executions this engine is running."""
        return list(self._execs)

    def _check_started(self) -> None:
        if self._closed:
            raise ExecutionStateError("the job engine is stopped")
        if not self._started:
            raise ExecutionStateError("the job engine is not started: use 'async with engine'")
        if self._fatal is not None:
            raise ExecutionStateError(f"the job engine failed: {self._fatal!r}")
