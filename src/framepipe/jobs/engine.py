"""The job engine: runs executions of pipelines, in-process, durable in the state store.

How it works: one scheduler task on the event loop owns all in-memory state. Steps run in a
thread pool (sync functions) or on the loop (``async def``); they talk to the scheduler only by
posting messages (progress, spawn, outcome). The scheduler drains its inbox, applies the changes
in memory, and commits them in **one transaction per round** (group commit), in a dedicated
database thread; only after that commit does it publish the round's events and start the steps
the round made ready. So a step never starts before its dependencies' completion is durable, and
every event a subscriber sees is already on disk.

Failure policy (fail fast): when a step fails for good, nothing new starts in its execution;
steps already running are allowed to finish and their results are kept, so ``retry`` does not
redo them. ``cancel`` (and Ctrl-C/SIGTERM) also asks running steps to stop: ``ctx.progress`` and
``ctx.check_cancelled`` raise :class:`StepCancelledError` in them, and ``async`` steps are
cancelled.

The rules (dependencies, readiness, retries, fail-fast, stuck detection, progress) are those
of :mod:`framepipe.jobs.rules`, and a step's attempt runs through :mod:`framepipe.jobs.running`,
as on the workers; this module holds the in-memory state and the in-process delivery.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
import tenacity

from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backends.state import StateStore
from framepipe.config import Settings, load_settings
from framepipe.errors import (
    ExecutionFailedError,
    ExecutionStateError,
    FramepipeError,
    PipelineDefinitionError,
    UnknownStepError,
)
from framepipe.events import Event, EventBus
from framepipe.jobs import dispatch
from framepipe.jobs.context import Progressed, Spawned, StepContext, StepMessage
from framepipe.jobs.inputs import recorded_roots
from framepipe.jobs.journal import Journal
from framepipe.jobs.keys import canonical_json
from framepipe.jobs.memory import ExecState, Finished, StepState
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepStatus
from framepipe.jobs.outcomes import RetryPolicy, error_text, is_permanent
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import (
    Batch,
    cancel_requested,
    execution_mode,
    execution_status,
    get_execution,
    list_events,
    load_rows,
    take_over,
    write_batch,
)
from framepipe.jobs.recovery import recover_for
from framepipe.jobs.rounds import Delivery
from framepipe.jobs.rules import (
    after_failure,
    failed_error,
    interrupted_status,
    is_ready,
    released_by_names,
    stuck_error,
)
from framepipe.jobs.running import run_attempt, run_attempt_async
from framepipe.liveness import this_owner
from framepipe.logs import get_logger
from framepipe.untrusted import check_json, check_size

if TYPE_CHECKING:
    from framepipe.jobs.delivery import StepDelivery

__all__ = ["JobEngine"]

T = TypeVar("T")
_log = get_logger("jobs.engine")


class JobEngine:
    """Runs executions of pipelines in this process, durable in a :class:`StateStore`.

    Use as an async context manager (``async with JobEngine() as engine``), then
    :meth:`submit` / :meth:`wait` / :meth:`run`, :meth:`retry`, :meth:`cancel`. ``concurrency``
    steps run at once across all executions of this engine. Several engines (processes) may
    share one store: each runs the executions it submitted or resumed.
    """

    def __init__(self, store: StateStore | None = None, *, settings: Settings | None = None,
                 objects: ObjectStore | None = None, concurrency: int | None = None,
                 bus: EventBus | None = None) -> None:
        self.settings = settings or load_settings()
        self._own_store = store is None
        self.store = store or StateStore(self.settings.resolved_database_url,
                                         sqlite_synchronous=self.settings.sqlite_synchronous)
        self._objects = objects
        self.concurrency = concurrency or self.settings.concurrency
        self.bus = bus or EventBus()
        self.owner = this_owner(uuid.uuid4().hex[:8])
        self._pipelines: dict[str, Pipeline] = {}
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
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self._fatal: BaseException | None = None
        self._scheduling = True
        self._broker: StepDelivery | None = None
        self._write_retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(sa.exc.OperationalError),
            wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=5.0),
            stop=tenacity.stop_after_delay(120), reraise=True,
            before_sleep=lambda rs: _log.warning(
                "state store write failed (%s); retrying",
                rs.outcome.exception() if rs.outcome else None))

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> JobEngine:
        """Start the scheduler; recovers executions whose engine died."""
        if self._closed:
            raise ExecutionStateError("the job engine is closed")
        if self._started:
            return self
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="framepipe-step")
        self._db = ThreadPoolExecutor(1, thread_name_prefix="framepipe-db")
        self._started = True
        self._journal = Journal(self.settings.run_dir, self.owner)
        events = await self._in_db(self._recover)
        self.bus.publish(events)
        self._tasks = [asyncio.create_task(self._scheduler(), name="framepipe-scheduler"),
                       asyncio.create_task(self._heartbeat(), name="framepipe-heartbeat")]
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
        _log.error("job engine task %s died: %r; its executions stay resumable",
                   task.get_name(), exc, exc_info=exc)
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
        assert self._pool is not None
        assert self._db is not None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._db.shutdown(wait=True)
        self._journal.close()
        if self._broker is not None:
            self._broker.close()
        if self._objects is not None and self._own_objects:
            self._objects.close()
        if self._own_store:
            self.store.close()

    async def __aenter__(self) -> JobEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    _own_objects = False

    @property
    def objects(self) -> ObjectStore:
        """The object store given steps as ``ctx.objects`` (opened on first use)."""
        if self._objects is None:
            self._objects = open_object_store(self.settings.resolved_objects_url)
            self._own_objects = True
        return self._objects

    # -- public API ---------------------------------------------------------------------------

    def register(self, pipeline: Pipeline) -> None:
        """Make ``pipeline`` known by name, for :meth:`retry` of its executions."""
        pipeline.validate()
        self._pipelines[pipeline.name] = pipeline

    async def submit(self, pipeline: Pipeline, inputs: Mapping[str, Any] | None = None, *,
                     ref: str | None = None,
                     input_roots: Iterable[str | os.PathLike[str]] | None = None) -> str:
        """Create an execution of ``pipeline`` and start it; return its id.

        ``inputs`` are checked first, in both modes, and a refusal creates nothing: storable
        JSON within ``max_inputs_bytes`` (:class:`InputTooLargeError` otherwise), then the
        pipeline's declared inputs model if it has one (:meth:`Pipeline.check_inputs`:
        :class:`InvalidInputError` naming the field). ``input_roots`` is for submitters that
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
        before this returns."""
        self._check_started()
        pipeline.validate()
        self.register(pipeline)
        inputs = dict(inputs or {})
        check_json(inputs, "inputs")
        check_size(inputs, "inputs", limit=self.settings.max_inputs_bytes,
                   setting="FRAMEPIPE_MAX_INPUTS_BYTES")
        if pipeline.inputs is not None:  # paths are resolved: file system calls
            inputs = await asyncio.to_thread(pipeline.check_inputs, inputs,
                                             input_roots=input_roots)
        roots = (None if input_roots is None
                 else await asyncio.to_thread(recorded_roots, input_roots))
        try:
            canonical_json(inputs)
        except (TypeError, ValueError) as exc:
            raise PipelineDefinitionError(f"inputs are not JSON-serialisable: {exc}",
                                          pipeline=pipeline.name) from exc
        if self.settings.distributed_jobs:
            return await self._submit_to_workers(pipeline, inputs, ref or pipeline.ref, roots)
        now = time.time()
        row = {"id": uuid.uuid4().hex, "pipeline": pipeline.name,
               "pipeline_ref": ref or pipeline.ref, "status": ExecutionStatus.RUNNING.value,
               "inputs": inputs, "input_roots": roots, "progress": 0.0, "error": None,
               "owner": self.owner, "heartbeat_at": now, "cancel_requested": False, "runs": 1,
               "created_at": now, "started_at": now, "finished_at": None}
        x = ExecState(row, pipeline)
        step_rows = [x.new_step_row(step, {}, step.name, [], None, now)
                     for step in pipeline.initial_steps]
        batch = Batch(new_executions=[row], new_steps=step_rows, events=[
            Event("execution.created", now, x.id, None,
                  {"pipeline": pipeline.name, "inputs": inputs}),
            Event("execution.started", now, x.id, None, {"run": 1})])
        events = await self._in_db(write_batch, self.store, batch)
        self.bus.publish(events)
        self._adopt(x, step_rows)
        _log.info("[%s] execution started (%d initial steps)", x.label, len(step_rows))
        return x.id

    async def wait(self, execution_id: str, *, raise_on_failure: bool = True,
                   poll_interval: float | None = None) -> ExecutionInfo:
        """Wait until the execution finishes; return it with its steps and data.

        Raises :class:`ExecutionFailedError` if it did not complete (unless
        ``raise_on_failure`` is false). An execution run by another process (or by workers)
        is polled every ``poll_interval`` seconds (0.05 for workers, else 0.5), and its stored
        events are published on :attr:`bus` as they appear."""
        x = self._execs.get(execution_id)
        if x is not None:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            x.waiters.append(future)
            await future
        else:
            interval = poll_interval if poll_interval is not None else (
                0.05 if self.settings.distributed_jobs else 0.5)
            after = 0
            while True:
                status, new = await self._in_db(self._poll, execution_id, after,
                                                self.bus.watched)
                if new:
                    after = new[-1].id or after
                    self.bus.publish(new)
                if status.finished:
                    break
                await asyncio.sleep(interval)
        info = await self._in_db(get_execution, self.store, execution_id)
        if raise_on_failure and info.status is not ExecutionStatus.COMPLETED:
            raise ExecutionFailedError(
                f"execution {info.id[:12]} of pipeline '{info.pipeline}' {info.status.value}: "
                f"{(info.error or '').splitlines()[0] if info.error else 'no error recorded'}",
                execution_id=info.id, status=info.status.value, errors=info.errors)
        return info

    def _poll(self, execution_id: str, after: int,
              with_events: bool) -> tuple[ExecutionStatus, list[Event]]:
        status = execution_status(self.store, execution_id)
        return status, (list_events(self.store, execution_id, after_id=after) if with_events
                        else [])

    async def _submit_to_workers(self, pipeline: Pipeline, inputs: dict[str, Any],
                                 ref: str | None, input_roots: list[str] | None) -> str:
        if not ref:
            raise PipelineDefinitionError(
                "workers load a pipeline by reference, and this one has none (defined "
                "interactively?): define it in a module or file", pipeline=pipeline.name)
        execution_id, ready, events = await self._in_db(functools.partial(
            dispatch.submit, self.store, pipeline, inputs, ref=ref, input_roots=input_roots))
        self.bus.publish(events)
        await self._publish(ready)
        _log.info("[%s/%s] execution submitted to the workers (%d step(s) ready)",
                  pipeline.name, execution_id[:8], len(ready))
        return execution_id

    async def _publish(self, ready: list[Delivery]) -> None:
        """Hand ready steps to the broker (Redis or RabbitMQ, from ``broker_url``); returns once
        it holds them. If it is down, the workers' sweep publishes them later."""
        if not ready:
            return
        if self._broker is None:
            from framepipe.jobs.delivery import open_delivery

            self._broker = open_delivery(self.settings.broker_url,
                                         self.settings.broker_namespace)
        try:
            await self._in_db(self._broker.publish, ready)
        except FramepipeError as exc:
            _log.warning("%s; the steps stay ready in the store and the workers publish them "
                         "again", exc)

    async def run(self, pipeline: Pipeline, inputs: Mapping[str, Any] | None = None, *,
                  raise_on_failure: bool = True) -> ExecutionInfo:
        """Submit an execution and wait for its end."""
        execution_id = await self.submit(pipeline, inputs)
        return await self.wait(execution_id, raise_on_failure=raise_on_failure)

    async def retry(self, execution_id: str, pipeline: Pipeline | None = None) -> str:
        """Resume a failed, cancelled or interrupted execution from where it stopped.

        Completed steps are not run again; failed, cancelled and pending steps run with fresh
        retry budgets. The execution keeps its inputs and the ``input_roots`` its submit
        recorded (whoever asks for the retry). Crash counts are kept across runs, so a step
        that keeps killing its process is failed as poison after ``max_step_crashes``
        crashes in all. ``pipeline`` defaults to one registered under the execution's
        pipeline name. Returns the full execution id."""
        self._check_started()
        await self._in_db(self._recover)
        info = await self._in_db(functools.partial(get_execution, self.store, execution_id,
                                                    with_steps=False))
        if await self._in_db(execution_mode, self.store, info.id) == dispatch.MODE:
            full_id, ready, events = await self._in_db(dispatch.resume, self.store, info.id)
            self.bus.publish(events)
            await self._publish(ready)
            _log.info("[%s/%s] execution resumed on the workers (%d step(s) ready)",
                      info.pipeline, full_id[:8], len(ready))
            return full_id
        if info.id in self._execs:
            raise ExecutionStateError(f"execution {info.id[:12]} is running in this engine",
                                      execution_id=info.id)
        if not info.status.retryable:
            what = ("has completed; nothing to retry" if info.status is ExecutionStatus.COMPLETED
                    else f"is {info.status.value} (owner {info.owner})")
            raise ExecutionStateError(f"execution {info.id[:12]} of pipeline '{info.pipeline}' "
                                      f"{what}", execution_id=info.id)
        pipeline = pipeline or self._pipelines.get(info.pipeline)
        if pipeline is None:
            raise ExecutionStateError(
                f"execution {info.id[:12]} is of pipeline '{info.pipeline}', which this engine "
                "does not know: pass the pipeline or register it", execution_id=info.id)
        if pipeline.name != info.pipeline:
            raise ExecutionStateError(f"execution {info.id[:12]} is of pipeline "
                                      f"'{info.pipeline}', not '{pipeline.name}'",
                                      execution_id=info.id)
        pipeline.validate()
        self.register(pipeline)
        now = time.time()
        claimed = await self._in_db(take_over, self.store, info.id, info.status.value,
                                    self.owner, now)
        if not claimed:
            raise ExecutionStateError(f"execution {info.id[:12]} was resumed by another process",
                                      execution_id=info.id)
        row, step_rows = await self._in_db(load_rows, self.store, info.id)
        for r in step_rows:
            if r["status"] != StepStatus.COMPLETED.value:
                r.update(status=StepStatus.PENDING.value, failures=0, error=None,
                         next_attempt_at=None, ready_at=None)
        x = ExecState(row, pipeline)
        for r in step_rows:
            if pipeline.get(r["name"]) is None:
                raise UnknownStepError(f"execution {info.id[:12]} has step {r['key']!r}, which "
                                       "the pipeline no longer defines", pipeline=pipeline.name)
        self._adopt(x, step_rows, dirty=True)
        x.row["error"] = None
        self._mark_exec(x)
        self._emit(Event("execution.retried", now, x.id, None, {"run": row["runs"]}))
        self._wakeup()
        _log.info("[%s] execution resumed (run %d)", x.label, row["runs"])
        return x.id

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

    # -- building the in-memory graph -------------------------------------------------------

    def _adopt(self, x: ExecState, step_rows: list[dict[str, Any]], *,
               dirty: bool = False) -> None:
        self._execs[x.id] = x
        x.add_rows(step_rows)
        for s in x.steps.values():
            self._count(x, s, +1)
        for s in x.steps.values():
            self._link(s)
            if dirty:
                self._dirty_steps[id(s)] = s
        for s in list(x.steps.values()):
            if s.status is StepStatus.PENDING and is_ready(s.waiting, s.name_deps,
                                                           running=x.stopping is None):
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
        return bool(self._dirty_steps or self._dirty_execs or self._events or self._ledger_rows
                    or self._progress_events or self._after_commit)

    def _drain(self) -> None:
        while self._inbox:
            message = self._inbox.popleft()
            x = self._execs.get(message.execution_id)
            if x is None:
                continue
            if isinstance(message, Progressed):
                self._on_progress(x, message.step_key, message.pct, message.message)
            elif isinstance(message, Spawned):
                self._on_spawn(x, message.spawner, message.name, message.params, message.key,
                               message.deps)
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
            batch.executions.append({k: x.row[k] for k in (
                "id", "status", "progress", "error", "owner", "heartbeat_at", "runs",
                "started_at", "finished_at")})
        self._dirty_execs = {}
        batch.events = self._events
        batch.events.extend(self._progress_events.values())
        self._events, self._progress_events = [], {}
        batch.ledger, self._ledger_rows = self._ledger_rows, []
        after, self._after_commit = self._after_commit, []
        committed = await self._in_db(self._write, batch)
        self.bus.publish(committed)
        for fn in after:
            fn()

    def _write(self, batch: Batch) -> list[Event]:
        """Commit a batch; a lost connection (server restart, lock timeout) is retried."""
        for attempt in self._write_retrying:
            with attempt:
                return write_batch(self.store, batch)
        raise AssertionError("unreachable")

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
        ctx = StepContext(pipeline=x.pipeline, execution_id=x.id, step_key=s.key,
                          step_name=s.name, attempt=s.attempt, inputs=x.inputs,
                          data=x.data_view(), params=s.params, store=self.store,
                          objects=lambda: self.objects, post=self._post,
                          has_key=x.steps.__contains__, input_roots=x.input_roots,
                          deps_of=x.deps_of)
        s.ctx = ctx
        self._journal.started(x.id, s.key)
        if s.step.is_async:
            s.task = asyncio.create_task(self._run_async(s, ctx))
        else:
            assert self._pool is not None
            self._pool.submit(self._run_sync, s, ctx)

    def _run_sync(self, s: StepState, ctx: StepContext) -> None:
        self._ran(Finished(s, ctx, run_attempt(
            s.step, ctx, output_limit=self.settings.max_step_output_bytes)))

    async def _run_async(self, s: StepState, ctx: StepContext) -> None:
        self._ran(Finished(s, ctx, await run_attempt_async(
            s.step, ctx, output_limit=self.settings.max_step_output_bytes)))

    def _ran(self, outcome: Finished) -> None:
        """The step's attempt is done (in its own thread or task): tell the scheduler."""
        self._journal.ended(outcome.step.x.id, outcome.step.key)
        self._post(outcome)

    def _on_progress(self, x: ExecState, key: str, pct: float, message: str | None) -> None:
        s = x.steps.get(key)
        if s is None or s.status is not StepStatus.RUNNING:
            return
        s.message = message
        self._set_progress(s, pct)
        self._dirty_steps[id(s)] = s
        self._progress_events[(x.id, key)] = Event(
            "step.progress", time.time(), x.id, key,
            {"progress": pct, "message": message, "execution_progress": x.row["progress"]})

    def _on_spawn(self, x: ExecState, spawner: str, name: str, params: dict[str, Any], key: str,
                  deps: list[str]) -> None:
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
        self._emit(Event("step.spawned", now, x.id, key,
                         {"name": name, "params": params, "depends_on": s.deps,
                          "spawned_by": spawner}))
        if is_ready(s.waiting, s.name_deps, running=x.stopping is None):
            self._make_ready(s)
        self._recompute_progress(x)

    def _on_outcome(self, x: ExecState, outcome: Finished) -> None:
        s, ctx = outcome.step, outcome.ctx
        if s.status is not StepStatus.RUNNING or s.ctx is not ctx:
            _log.warning("[%s] late result of step %s ignored (the step was %s)", x.label,
                         s.key, s.status.value)
            return
        s.ctx = None
        s.task = None
        now = time.time()
        s.finished_at = now
        self._progress_events.pop((x.id, s.key), None)
        ran = outcome.ran
        if ran.error is None:
            self._complete(x, s, ran.output or {}, ran.ledger_rows, now)
        else:
            self._fail(x, s, ran.error, now)
        if x.stopping is not None and x.running == 0:
            self._finalize(x)

    def _complete(self, x: ExecState, s: StepState, output: dict[str, Any],
                  ledger_rows: list[dict[str, Any]], now: float) -> None:
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
        self._emit(Event("step.completed", now, x.id, s.key,
                         {"attempt": s.attempt, "duration": now - (s.started_at or now),
                          "execution_progress": x.row["progress"]}))
        for d in s.dependents:
            d.waiting -= 1
            if d.status is StepStatus.PENDING and is_ready(d.waiting, d.name_deps,
                                                           running=x.stopping is None):
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
            self._emit(Event("step.cancelled" if status is StepStatus.CANCELLED
                             else "step.interrupted", now, x.id, s.key, {"attempt": s.attempt}))
            return
        s.failures += 1
        delay = after_failure(s.failures, RetryPolicy.of(s.step, self.settings),
                              permanent=is_permanent(exc), running=x.stopping is None)
        if delay is not None:
            s.next_attempt_at = now + delay
            self._set(s, StepStatus.RETRYING)
            _log.warning("[%s] step %s failed (attempt %d of %d), retrying in %.2fs: %s",
                         x.label, s.key, s.failures, s.step.retries + 1, delay,
                         text.splitlines()[0])
            self._emit(Event("step.retrying", now, x.id, s.key,
                             {"attempt": s.attempt, "error": text.splitlines()[0],
                              "delay": delay}))
            assert self._loop is not None
            s.timer = self._loop.call_later(delay, self._retry_due, s)
            return
        self._set(s, StepStatus.FAILED)
        summary = failed_error(x.pipeline.name, s.key, s.failures, text)
        _log.error("[%s] %s", x.label, summary)
        self._emit(Event("step.failed", now, x.id, s.key,
                         {"attempt": s.attempt, "error": text.splitlines()[0],
                          "traceback": text}))
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
                    s.status is StepStatus.PENDING and end is StepStatus.CANCELLED):
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
        self._emit(Event(f"execution.{status.value}", now, x.id, None,
                         {"error": error, "duration": now - started,
                          "progress": x.row["progress"], "steps": len(x.steps)}))
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
        waiters = {s.key: s.name_deps for s in x.name_waiters.values()
                   if s.status is StepStatus.PENDING and s.waiting == 0}
        open_names = [name for name, n in x.unfinished_by_name.items() if n > 0]
        released = released_by_names(waiters, open_names)
        for key in released:
            self._make_ready(x.steps[key])
        if released:
            return
        stuck = sorted((s for s in x.steps.values() if s.status is StepStatus.PENDING),
                       key=lambda s: s.seq)
        self._stop_execution(x, ExecutionStatus.FAILED, stuck_error(
            x.pipeline.name, len(stuck), [(s.key, s.deps) for s in stuck[:5]]))

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
            self._journal.compact([(x.id, s.key) for x in self._execs.values()
                                   for s in x.steps.values() if s.status is StepStatus.RUNNING])
            ids = list(self._execs)
            cancelled = await self._in_db(cancel_requested, self.store, ids)
            for execution_id in cancelled:
                target = self._execs.get(execution_id)
                if target is not None:
                    _log.info("[%s] cancel requested through the store", target.label)
                    self._stop_execution(target, ExecutionStatus.CANCELLED,
                                         "cancelled by request")
            self._wakeup()

    def _check_started(self) -> None:
        if self._closed:
            raise ExecutionStateError("the job engine is stopped")
        if not self._started:
            raise ExecutionStateError("the job engine is not started: use 'async with engine'")
        if self._fatal is not None:
            raise ExecutionStateError(f"the job engine failed: {self._fatal!r}")
