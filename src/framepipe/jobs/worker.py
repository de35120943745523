"""``framepipe worker``: runs the steps of distributed executions, any number per machine.

A worker takes ready steps from the broker (Redis Streams or RabbitMQ, through
:mod:`framepipe.jobs.delivery`), claims them in the state store as a new attempt with a lease,
runs them (threads for plain functions, its event loop for ``async def``), and
commits what they report (progress, spawned steps, outcomes) in one transaction per round,
fenced by attempt (:mod:`framepipe.jobs.dispatch`). Guarantees:

* at most ``concurrency`` steps run at once; while recent steps are short, up to
  ``concurrency x worker_prefetch`` are claimed, so tiny steps are claimed and committed in
  batches (:attr:`Worker.capacity`); a claim is committed before the step's code starts, and
  the delivery is acknowledged only after that commit; a worker that stays full pauses its
  delivery, so a broker that pushes (RabbitMQ, prefetch = the claim window) gives what it sent
  ahead to idle workers;
* while a step runs its lease is renewed every ``lease_seconds / 3`` (at most 1 s); a step
  whose lease was taken over (this worker was cut off or paused) is told to stop and its late
  result is not written; a step of an execution cancelled elsewhere is told to stop
  (``ctx.cancelled``);
* every worker sweeps for steps nobody holds (a killed worker's, retries that are due, ready
  steps the broker lost) every ``sweep_interval`` seconds;
* on SIGTERM (:meth:`Worker.request_stop`) it takes no new step, gives running steps
  ``shutdown_grace`` seconds, hands the ones still running back (ready for another worker,
  not counted as a failure), commits, and returns;
* a lost broker or database connection is retried with backoff; nothing is acknowledged
  before it is committed.

This module is one concept, a worker's loop, and longer than most: its reader thread, its
running steps, its committer and its upkeep (lease renewal, sweep, take-over) share the claim
window and the runs under one lock, which splitting would scatter. What does not share them
lives elsewhere: the rules (:mod:`framepipe.jobs.rules`), an attempt (:mod:`framepipe.jobs.
running`), the transactions (:mod:`framepipe.jobs.dispatch`), the pipelines it knows
(:class:`~framepipe.jobs.loading.KnownPipelines`) and the broker (:mod:`framepipe.jobs.
delivery`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backends.state import StateStore
from framepipe.backoff import Backoff
from framepipe.config import Settings, load_settings
from framepipe.errors import (
    BrokerError,
    PipelineDefinitionError,
    StepCancelledError,
)
from framepipe.jobs import dispatch, leases
from framepipe.jobs.context import LazyData, Progressed, StepContext, StepMessage
from framepipe.jobs.delivery import Received, is_broker_url, open_delivery
from framepipe.jobs.loading import KnownPipelines
from framepipe.jobs.outcomes import NO_RETRY, RetryPolicy, error_text, is_permanent
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import completed_data, has_step, step_dependencies
from framepipe.jobs.refusals import merge, piece_attempt, refused_outcome, round_pieces
from framepipe.jobs.rounds import (
    Claimed,
    Delivery,
    Outcome,
    ProgressUpdate,
    Round,
    RoundResult,
    Spawn,
)
from framepipe.jobs.rules import plan_step
from framepipe.jobs.running import Ran, run_attempt, run_attempt_async
from framepipe.jobs.storable import brief_error
from framepipe.jobs.transient import is_transient_store_error
from framepipe.liveness import this_owner
from framepipe.logs import get_logger
from framepipe.redis import safe_url

__all__ = ["Worker"]

T = TypeVar("T")
_log = get_logger("jobs.worker")
_SHORT_STEP = 0.05
_PAUSE_AFTER = 0.2  # a worker full for this long pauses its delivery (see _reserve)
_FORGET_EVERY = 600.0  # seconds between two looks for stopped workers' consumers
_FORGET_IDLE = 3600.0  # a consumer idle this long with nothing pending is a stopped worker


def _transient(exc: BaseException) -> bool:
    """A lost broker connection, or transient store trouble by the rule the engine shares
    (:func:`~framepipe.jobs.transient.is_transient_store_error`): retried, never a refusal."""
    return isinstance(exc, BrokerError) or is_transient_store_error(exc)


@dataclass(eq=False)
class _Run:
    """One attempt this worker runs."""

    claimed: Claimed
    pipeline: Pipeline | None
    ctx: StepContext | None = None
    task: asyncio.Task[None] | None = None
    committed_progress: float = 0.0
    began: float | None = None
    lost: bool = False
    cancelled: bool = False
    handed_back: bool = False
    finished: bool = False

    @property
    def ident(self) -> tuple[str, str, int]:
        return (self.claimed.execution_id, self.claimed.key, self.claimed.attempt)


@dataclass
class _Pending:
    """What the step threads reported since the last commit."""

    outcomes: list[tuple[_Run, Outcome]] = field(default_factory=list)
    progress: dict[tuple[str, str, int], tuple[_Run, float, str | None]] = field(
        default_factory=dict
    )
    spawns: list[Spawn] = field(default_factory=list)


class Worker:
    """A worker process's engine. ``await worker.run()`` until :meth:`request_stop`.

    ``pipelines`` are known by name in advance; others are loaded from the reference stored
    with each execution (``package.module:NAME`` or ``/path/file.py:NAME``)."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        store: StateStore | None = None,
        concurrency: int | None = None,
        pipelines: tuple[Pipeline, ...] = (),
        output_tail: Callable[[], str] | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        url = self.settings.broker_url
        if not is_broker_url(url):
            raise BrokerError(
                f"a worker needs a Redis or RabbitMQ broker: FRAMEPIPE_BROKER_URL "
                f"is {safe_url(url)!r}; give redis://, rediss://, unix://, "
                "amqp:// or amqps://",
                url=safe_url(url),
            )
        self._own_store = store is None
        self.store = store or StateStore(
            self.settings.resolved_database_url, sqlite_synchronous=self.settings.sqlite_synchronous
        )
        self.concurrency = concurrency or self.settings.concurrency
        self._avg_run: float | None = None  # moving average of step run times, seconds
        self.id = this_owner(f"w{uuid.uuid4().hex[:6]}")
        self.broker = open_delivery(url, self.settings.broker_namespace)
        self.lease = self.settings.lease_seconds
        self.steps_done = 0
        self._output_tail = output_tail
        self._pipelines = KnownPipelines(pipelines, owner=f"Worker {self.id}")
        self._known: dispatch.Known = {}
        self._claim_lock = threading.Lock()
        self._objects: ObjectStore | None = None
        self._runs: dict[tuple[str, str, int], _Run] = {}
        self._pending = _Pending()
        self._lock = threading.Lock()
        self._slots = threading.Condition(self._lock)
        self._taken = 0  # slots reserved by the reader or held by running steps
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._ended: asyncio.Event | None = None
        self._async_slots: asyncio.Semaphore | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._db: ThreadPoolExecutor | None = None
        self._retry_timers: set[asyncio.TimerHandle] = set()  # pending ones only
        self._closing = False
        self.started_at = 0.0

    # -- lifecycle -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking steps and shut down gracefully (thread- and signal-safe)."""
        self._stopping.set()
        with self._lock:
            self._slots.notify_all()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    @property
    def capacity(self) -> int:
        """How many steps this worker holds at most: ``concurrency``, times ``worker_prefetch``
        while its recent steps are short (under 50 ms on average), so tiny steps are claimed
        and committed in batches but long ones are not hoarded while other workers idle."""
        avg = self._avg_run
        if avg is not None and avg < _SHORT_STEP:
            return self.concurrency * self.settings.worker_prefetch
        return self.concurrency

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stopping.is_set()

    async def run(self) -> None:
        """Run until :meth:`request_stop`; returns after the graceful shutdown."""
        self.started_at = time.time()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._ended = asyncio.Event()
        self._async_slots = asyncio.Semaphore(self.concurrency)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="framepipe-step")
        self._db = ThreadPoolExecutor(1, thread_name_prefix="framepipe-db")
        register = asyncio.create_task(
            self._in_db_retrying(self._register, what="registering the worker", while_stopping=None)
        )
        stop = asyncio.create_task(asyncio.to_thread(self._stopping.wait))
        await asyncio.wait([register, stop], return_when=asyncio.FIRST_COMPLETED)
        registered = register.done() and not register.cancelled() and not register.exception()
        if not registered:
            # Stopped before Redis or the database could be reached (the attempt the stop
            # interrupted may have failed by now: its error is not the worker's), or the
            # registration failed for good (raised below, once everything is closed).
            stopped = self._stopping.is_set()
            self.request_stop()  # ends the thread waiting for a stop
            register.cancel()
            self._pool.shutdown(wait=False)
            # The broker and the store are closed after the attempt still in flight (its
            # connect is bounded by the broker's timeout), not under it.
            self._db.submit(self._close_connections)
            await asyncio.to_thread(self._db.shutdown, wait=True)
            await stop
            if stopped:
                _log.info("Worker %s stopped before it could register", self.id)
                return
        register.result()
        reader = threading.Thread(target=self._reader, name="framepipe-reader", daemon=True)
        reader.start()
        tasks = [
            asyncio.create_task(self._committer(), name="framepipe-commit"),
            asyncio.create_task(self._heartbeat(), name="framepipe-heartbeat"),
        ]
        _log.info(
            "Worker %s started: concurrency %d, broker %s (%s), database %s",
            self.id,
            self.concurrency,
            self.broker.safe_url,
            self.broker.target,
            self.store.safe_url,
        )
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop:
                    task.result()
        finally:
            self.request_stop()
            await self._shutdown(tasks, reader)

    async def _shutdown(self, tasks: list[asyncio.Task[None]], reader: threading.Thread) -> None:
        grace = self.settings.shutdown_grace
        started = time.monotonic()
        # The reader ends within one blocking read; whatever it claimed until then is started
        # before the grace period is counted down, so nothing claimed is left behind.
        await asyncio.to_thread(reader.join, 5.0)
        await asyncio.sleep(0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._drain_runs(), max(0.0, grace - (time.monotonic() - started))
            )
        left = self._live_runs()
        for run in left:
            _log.warning(
                "Worker %s stopping: step %s of %s still running after %.1fs; handing it back",
                self.id,
                run.claimed.key,
                run.claimed.execution_id[:8],
                grace,
            )
            run.handed_back = True
            if run.ctx is not None:
                run.ctx._cancel.set()
            if run.task is not None:
                run.task.cancel()
            self._hand_back(run)
        for timer in self._retry_timers:
            timer.cancel()
        committer, *others = tasks
        self._closing = True
        self._wakeup()
        if not committer.done():
            # The committer drains what is queued, then returns: an in-flight commit is
            # never cancelled half-way (its outcome would be lost, not just late).
            await asyncio.wait([committer])
        await self._flush()
        for task in others:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._in_db(self._deregister)
        assert self._pool is not None
        assert self._db is not None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._db.shutdown(wait=True)
        self.broker.close()
        if self._objects is not None:
            self._objects.close()
        if self._own_store:
            self.store.close()
        _log.info("Worker %s stopped (%d step(s) done)", self.id, self.steps_done)

    async def _drain_runs(self) -> None:
        assert self._ended is not None
        while self._live_runs():
            self._ended.clear()
            await self._ended.wait()

    def _live_runs(self) -> list[_Run]:
        return [r for r in self._runs.values() if not r.finished and not r.lost]

    def _close_connections(self) -> None:
        self.broker.close()
        if self._own_store:
            self.store.close()

    def _register(self) -> None:
        self.broker.prepare()
        leases.renew(
            self.store,
            self.id,
            [],
            lease=self.lease,
            concurrency=self.concurrency,
            output_tail=self._tail(),
            steps_done=self.steps_done,
        )

    def _deregister(self) -> None:
        leases.renew(
            self.store,
            self.id,
            [],
            lease=self.lease,
            concurrency=self.concurrency,
            output_tail=self._tail(),
            status="stopped",
            steps_done=self.steps_done,
        )

    def _tail(self) -> str | None:
        return self._output_tail() if self._output_tail is not None else None

    @property
    def objects(self) -> ObjectStore:
        """The object store steps get as ``ctx.objects``."""
        if self._objects is None:
            self._objects = open_object_store(self.settings.resolved_objects_url)
        return self._objects

    # -- reading and claiming (the reader thread) -----------------------------------------------

    def _reader(self) -> None:
        backoff = Backoff(initial=0.2, maximum=5.0)
        failures = 0
        while not self._stopping.is_set():
            free = 0
            try:
                free = self._reserve()
                if not free:
                    return
                taken = self.broker.take(self.id, free, wait=1.0, window=self.capacity)
                if taken:
                    self._claim_entries(taken, free)
                else:
                    self._release(free)
                failures = 0
            except Exception as exc:
                self._release(free)
                if not _transient(exc):
                    _log.exception("Worker %s: reader failed; stopping", self.id)
                    self.request_stop()
                    return
                failures += 1
                delay = backoff.delay(min(failures, 8))
                _log.warning(
                    "Worker %s: %s; retrying in %.1fs", self.id, str(exc).splitlines()[0], delay
                )
                with contextlib.suppress(BrokerError):  # nothing pushed to it meanwhile
                    self.broker.pause()
                self._stopping.wait(delay)

    def _reserve(self) -> int:
        """Wait for free slots and reserve them all; 0 once stopping. A worker full for
        ``_PAUSE_AFTER`` seconds pauses its delivery (RabbitMQ then stops pushing to it and
        requeues what it sent ahead); the next take resumes it."""
        full_since: float | None = None
        paused = False
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return 0
                free = self.capacity - self._taken
                if free > 0:
                    self._taken += free
                    return free
                self._slots.wait(0.5 if paused else 0.05)
            now = time.monotonic()
            full_since = full_since or now
            if not paused and now - full_since >= _PAUSE_AFTER:
                self.broker.pause()
                paused = True

    def _claim_entries(self, entries: list[Received], reserved: int) -> None:
        """Claim delivered steps in the store, acknowledge them, hand them to the loop."""
        if self._stopping.is_set():
            # Give them back at once, for another worker.
            self.broker.hand_back(entries)
            self._release(reserved)
            return
        try:
            with self._claim_lock:  # the reader and a takeover may claim at once
                claimed, _events = dispatch.claim(
                    self.store,
                    self.id,
                    [r.delivery for r in entries],
                    lease=self.lease,
                    known=self._known,
                )
        except BaseException:
            # The database failed: nothing is claimed; the deliveries go back at once rather
            # than wait for their connection to end (RabbitMQ) or a take-over (Redis).
            with contextlib.suppress(BrokerError):
                self.broker.hand_back(entries)
            raise
        self._release(reserved - len(claimed))
        if claimed:
            runs = [_Run(c, self._pipeline_for(c)) for c in claimed]
            loop = self._loop
            assert loop is not None
            loop.call_soon_threadsafe(self._start_all, runs)
        try:
            self.broker.ack(entries)
        except BrokerError as exc:  # delivered again later, and found claimed
            _log.warning("Worker %s: %s", self.id, exc)

    def _release(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self._taken -= n
            self._slots.notify_all()

    def _pipeline_for(self, c: Claimed) -> Pipeline | None:
        return self._pipelines.get(c.pipeline, c.pipeline_ref, c.execution_id)

    # -- running steps (the event loop) ------------------------------------------------------

    def _start_all(self, runs: list[_Run]) -> None:
        for run in runs:
            held = self._runs.get(run.ident)
            if held is not None and not held.lost:
                # Claimed again under the attempt this worker runs (the claim was lost in a
                # database crash and the step delivered again): one run of it, not two.
                _log.warning(
                    "Worker %s: step %s of %s (attempt %d) delivered again while it runs "
                    "here; not started twice",
                    self.id,
                    run.ident[1],
                    run.ident[0][:8],
                    run.ident[2],
                )
                self._release(1)
                continue
            self._runs[run.ident] = run
            self._start(run)

    def _hand_back_queued(self) -> None:
        """Steps turned out long: give back the claimed ones not started yet, so idle workers
        can take them instead of waiting behind this worker's busy threads."""
        queued: list[_Run] = []
        with self._lock:
            busy = sum(1 for r in self._runs.values() if r.began is not None and not r.finished)
            if busy < self.concurrency:  # a free thread takes the next one at once
                return
            for run in self._runs.values():
                if run.began is None and not (run.finished or run.lost or run.handed_back):
                    run.handed_back = True  # its thread, if it comes, will not run it
                    queued.append(run)
        if queued:
            _log.info(
                "Worker %s: steps take %.2fs on average; handing back %d claimed step(s) "
                "not started yet",
                self.id,
                self._avg_run or 0.0,
                len(queued),
            )
        for run in queued:
            if run.task is not None:
                run.task.cancel()
            self._hand_back(run)

    def _hand_back(self, run: _Run) -> None:
        """Give ``run``'s step back (ready for any worker); an attempt that never began does
        not count as one."""
        self._post_outcome(
            run,
            Outcome(
                execution_id=run.claimed.execution_id,
                key=run.claimed.key,
                attempt=run.claimed.attempt,
                kind="handback",
                weight=run.claimed.weight,
                before=run.committed_progress,
                ran=run.began is not None,
            ),
        )

    def _start(self, run: _Run) -> None:
        c = run.claimed
        run.committed_progress = c.progress
        pipeline = run.pipeline
        step = pipeline.get(c.name) if pipeline is not None else None
        if pipeline is None or step is None:
            what = (
                f"step {c.name!r}"
                if pipeline is not None
                else f"pipeline {c.pipeline!r} ({c.pipeline_ref or 'no reference stored'})"
            )
            exc = PipelineDefinitionError(
                f"worker {self.id} cannot run step {c.key!r}: {what} is not known here; "
                "make the pipeline importable on every worker (or pass it to the worker)",
                pipeline=c.pipeline,
            )
            self._post_outcome(run, self._failed(run, exc))
            return
        store = self.store
        ctx = StepContext(
            pipeline=pipeline,
            execution_id=c.execution_id,
            step_key=c.key,
            step_name=c.name,
            attempt=c.attempt,
            inputs=MappingProxyType(c.inputs),
            data=LazyData(lambda: completed_data(store, c.execution_id)),
            params=c.params,
            store=store,
            objects=lambda: self.objects,
            post=lambda message: self._post_message(run, message),
            has_key=lambda key: has_step(store, c.execution_id, key),
            known_key=lambda key: False,
            input_roots=c.input_roots,
            deps_of=lambda key: step_dependencies(store, c.execution_id, key),
        )
        run.ctx = ctx
        if step.is_async:
            run.task = asyncio.get_running_loop().create_task(self._run_async(run, ctx))
        else:
            assert self._pool is not None
            self._pool.submit(self._run_sync, run, ctx)

    def _begin(self, run: _Run) -> bool:
        """Mark the run started, unless it was handed back while it waited for a slot."""
        with self._lock:
            if run.handed_back or run.finished or run.lost:
                return False
            run.began = time.monotonic()
            return True

    def _run_sync(self, run: _Run, ctx: StepContext) -> None:
        if not self._begin(run):
            return
        step = ctx.pipeline.steps[run.claimed.name]
        ran = run_attempt(
            step,
            ctx,
            output_limit=self.settings.max_step_output_bytes,
            mode="worker",
            traceparent=run.claimed.traceparent,
        )
        self._post_outcome(run, self._outcome(run, ran))

    async def _run_async(self, run: _Run, ctx: StepContext) -> None:
        step = ctx.pipeline.steps[run.claimed.name]
        assert self._async_slots is not None
        try:
            async with self._async_slots:  # at most `concurrency` run; claimed ones wait
                if not self._begin(run):
                    return
                ran = await run_attempt_async(
                    step,
                    ctx,
                    output_limit=self.settings.max_step_output_bytes,
                    mode="worker",
                    traceparent=run.claimed.traceparent,
                )
        except asyncio.CancelledError:  # handed back while it waited for a slot
            ran = Ran(
                error=StepCancelledError(
                    "cancelled",
                    pipeline=ctx.pipeline.name,
                    step_key=run.claimed.key,
                    execution_id=run.claimed.execution_id,
                )
            )
        self._post_outcome(run, self._outcome(run, ran))

    def _outcome(self, run: _Run, ran: Ran) -> Outcome:
        """What to commit for an attempt: its completion, or how its error ends it (cancelled
        with its execution; handed back if this worker is stopping it; else a failure, retried
        as the step's :class:`RetryPolicy` allows)."""
        if ran.error is not None:
            return self._failed(run, ran.error)
        c = run.claimed
        return Outcome(
            execution_id=c.execution_id,
            key=c.key,
            attempt=c.attempt,
            kind="done",
            weight=c.weight,
            before=run.committed_progress,
            output=ran.output,
            ledger=ran.ledger_rows,
        )

    def _failed(self, run: _Run, exc: BaseException) -> Outcome:
        c = run.claimed
        kind: Any = "failed"
        if run.cancelled:
            kind = "cancelled"
        elif self._stopping.is_set() and isinstance(exc, StepCancelledError):
            kind = "handback"
        step = run.pipeline.get(c.name) if run.pipeline is not None else None
        policy = NO_RETRY if step is None else RetryPolicy.of(step, self.settings)
        return Outcome(
            execution_id=c.execution_id,
            key=c.key,
            attempt=c.attempt,
            kind=kind,
            weight=c.weight,
            before=run.committed_progress,
            error=error_text(exc),
            permanent=is_permanent(exc),
            policy=policy,
        )

    def _post_message(self, run: _Run, message: StepMessage) -> None:
        """A message from a step's context (its thread or the loop)."""
        if run.lost or run.handed_back or run.finished:
            return
        with self._lock:
            if isinstance(message, Progressed):
                self._pending.progress[run.ident] = (run, message.pct, message.message)
            else:
                assert run.pipeline is not None
                spec = plan_step(
                    run.pipeline,
                    message.name,
                    message.params,
                    message.key,
                    message.deps,
                    message.spawner,
                )
                self._pending.spawns.append(
                    Spawn(message.execution_id, message.spawner, run.claimed.attempt, spec)
                )
        self._wakeup()

    def _post_outcome(self, run: _Run, outcome: Outcome) -> None:
        loop = self._loop
        with self._lock:
            if run.finished:
                return
            run.finished = True
            if run.lost:  # its slot was given back when the lease was lost
                return
            self._pending.outcomes.append((run, outcome))
            if run.began is not None:
                took = time.monotonic() - run.began
                avg = self._avg_run
                self._avg_run = took if avg is None else 0.8 * avg + 0.2 * took
            # The slot is free once the code is done: the next step may be claimed while
            # this outcome is being committed.
            self._taken -= 1
            self._slots.notify_all()
        self._wakeup()
        ended = self._ended
        if loop is not None and ended is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ended.set)

    def _wakeup(self) -> None:
        loop, wake = self._loop, self._wake
        # Reading the flag from another thread may see it stale; at worst one extra wake-up.
        if loop is not None and wake is not None and not wake.is_set():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    # -- committing ----------------------------------------------------------------------------

    async def _committer(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            if self._closing:
                with self._lock:
                    pending = self._pending
                    empty = not (pending.outcomes or pending.progress or pending.spawns)
                if empty:
                    return

    async def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, _Pending()
        if not (pending.outcomes or pending.progress or pending.spawns):
            return
        work = Round(spawns=pending.spawns)
        for ident, (run, pct, text) in pending.progress.items():
            # A finished run's last report is kept: the round commits it before the
            # outcome (fenced by attempt like the outcome, so a lost run's report is not).
            if run.lost:
                continue
            work.progress.append(
                ProgressUpdate(
                    ident[0],
                    ident[1],
                    ident[2],
                    run.claimed.weight,
                    run.committed_progress,
                    pct,
                    text,
                )
            )
            run.committed_progress = pct
        for run, outcome in pending.outcomes:
            outcome.before = run.committed_progress
        work.outcomes = [o for _r, o in pending.outcomes]
        with self._lock:
            take = 0 if self._stopping.is_set() else max(0, self.capacity - self._taken)
            self._taken += take
        result: RoundResult | None = None
        try:
            result = await self._in_db_retrying(
                functools.partial(
                    dispatch.commit_round,
                    self.store,
                    work,
                    worker=self.id,
                    take=take,
                    lease=self.lease,
                ),
                what="committing step results",
            )
        except Exception as exc:
            if _transient(exc):
                raise  # still unreachable while stopping: the leases lapse, others redo it
            result = await self._salvage(work, exc)
        finally:
            self._release(take - (len(result.claimed) if result is not None else 0))
        if result.claimed:
            self._start_all([_Run(c, self._pipeline_for(c)) for c in result.claimed])
        for run, outcome in pending.outcomes:
            self._runs.pop(run.ident, None)
            if outcome.kind == "done":
                self.steps_done += 1
        for execution_id, key, attempt in result.fenced:
            _log.warning(
                "Worker %s: step %s of %s attempt %d no longer held by this worker "
                "(its lease was taken over); its late writes were discarded",
                self.id,
                key,
                execution_id[:8],
                attempt,
            )
        if result.ready:
            await self._publish(result.ready)
        for at, delivery in result.retry_at:
            self._retry_later(at, delivery)

    async def _salvage(self, work: Round, exc: Exception) -> RoundResult:
        """Commit a round the store refused for its data (not a lost connection) piece by
        piece: each spawn, progress report and outcome in a transaction of its own (spawns
        first, as a spawn is fenced once its spawner's outcome is in). The attempt a refused
        piece belongs to is failed for good with an error that says why
        (:meth:`_fail_refused`); the rest is committed, and the worker goes on."""
        _log.warning(
            "Worker %s: the state store refused a round (%s); committing it piece by piece",
            self.id,
            brief_error(exc),
        )
        result = RoundResult()
        refused: set[tuple[str, str, int]] = set()  # attempts failed for a refused piece
        for piece in round_pieces(work):
            ident, weight, before = piece_attempt(piece, work, self._held)
            if ident in refused:
                continue  # its attempt is failed already; this piece would be fenced
            try:
                part = await self._in_db_retrying(
                    functools.partial(dispatch.commit_round, self.store, piece, worker=self.id),
                    what="committing step results",
                )
            except Exception as piece_exc:
                if _transient(piece_exc):
                    raise
                refused.add(ident)
                part = await self._fail_refused(ident, weight, before, piece_exc)
            merge(result, part)
        return result

    async def _fail_refused(
        self, ident: tuple[str, str, int], weight: float, before: float, exc: Exception
    ) -> RoundResult:
        """Fail attempt ``ident`` (no retry) because the store refused what it reported; a run
        still going is stopped and its slot freed (its later writes are fenced)."""
        execution_id, key, attempt = ident
        failed = refused_outcome(ident, weight, before, exc)
        _log.error(
            "Worker %s: step %s of %s (attempt %d): %s",
            self.id,
            key,
            execution_id[:8],
            attempt,
            failed.error,
        )
        run = self._runs.get(ident)
        if run is not None:
            with self._lock:
                stop = not run.finished and not run.lost
                if stop:
                    run.lost = True
            if stop:
                self._stop_run(run)
                self._runs.pop(ident, None)
                self._release(1)
        try:
            return await self._in_db_retrying(
                functools.partial(
                    dispatch.commit_round, self.store, Round(outcomes=[failed]), worker=self.id
                ),
                what="failing a step whose report was refused",
            )
        except Exception as again:
            if _transient(again):
                raise
            _log.error(
                "Worker %s: the failure of step %s of %s could not be stored either (%s); "
                "it is run again once its lease lapses",
                self.id,
                key,
                execution_id[:8],
                brief_error(again),
            )
            return RoundResult()

    def _held(self, ident: tuple[str, str, int]) -> tuple[float, float] | None:
        """The weight and committed progress of attempt ``ident`` while this worker runs it."""
        run = self._runs.get(ident)
        return None if run is None else (run.claimed.weight, run.committed_progress)

    def _retry_later(self, at: float, delivery: Delivery) -> None:
        """Release the due retries at ``at`` (the sweep would too, later); the timer is kept
        only until it fires, to be cancelled at shutdown."""
        timers = self._retry_timers

        def due() -> None:
            timers.discard(handle)
            self._retry_due(delivery)

        handle = asyncio.get_running_loop().call_later(max(0.0, at - time.time()), due)
        timers.add(handle)

    def _retry_due(self, _delivery: Delivery) -> None:
        if not self._stopping.is_set():
            asyncio.get_running_loop().create_task(self._release_due())

    async def _release_due(self) -> None:
        ready = await self._in_db_retrying(
            leases.release_due, self.store, what="releasing due retries"
        )
        await self._publish(ready)

    async def _publish(self, ready: list[Delivery]) -> None:
        """Publish ready steps; on a broker failure the sweep publishes them later."""
        try:
            await self._in_db(self.broker.publish, ready)
        except BrokerError as exc:
            _log.warning(
                "Worker %s: %s; the %d step(s) stay ready in the store and are "
                "published again by the sweep",
                self.id,
                exc,
                len(ready),
            )

    # -- heartbeat, sweep, takeover ----------------------------------------------------------

    async def _heartbeat(self) -> None:
        renew_every = min(self.lease / 3, 1.0)
        sweep_every = self.settings.sweep_interval
        last_renew = last_sweep = last_claim = last_forget = time.monotonic()
        while True:
            await asyncio.sleep(min(renew_every, sweep_every, 0.5))
            now = time.monotonic()
            try:
                if now - last_renew >= renew_every:
                    last_renew = now
                    await self._renew()
                    if self.capacity <= self.concurrency:
                        self._hand_back_queued()
                if now - last_sweep >= sweep_every and not self._stopping.is_set():
                    last_sweep = now
                    await self._sweep()
                if now - last_claim >= self.lease and not self._stopping.is_set():
                    last_claim = now
                    await self._takeover()
                if now - last_forget >= _FORGET_EVERY and not self._stopping.is_set():
                    last_forget = now
                    await self._forget_consumers()
            except Exception as exc:
                if not _transient(exc):
                    raise
                _log.warning(
                    "Worker %s: heartbeat failed (%s); retrying", self.id, str(exc).splitlines()[0]
                )

    async def _forget_consumers(self) -> None:
        forgotten = await asyncio.to_thread(self.broker.forget_consumers, _FORGET_IDLE, self.id)
        if forgotten:
            _log.info("Worker %s: %d stopped worker(s) forgotten by the broker", self.id, forgotten)

    async def _renew(self) -> None:
        held = [r.ident for r in self._runs.values() if not r.finished and not r.lost]
        lost, stopped = await self._in_db(
            functools.partial(
                leases.renew,
                self.store,
                self.id,
                held,
                lease=self.lease,
                concurrency=self.concurrency,
                output_tail=self._tail(),
                steps_done=self.steps_done,
            )
        )
        for ident in held:
            run = self._runs.get(ident)
            if run is None:
                continue
            if ident in lost:
                with self._lock:
                    if run.finished:  # its outcome is queued; the commit fences it
                        continue
                    run.lost = True
                _log.warning(
                    "Worker %s: lost the lease of step %s of %s (attempt %d); stopping it",
                    self.id,
                    ident[1],
                    ident[0][:8],
                    ident[2],
                )
                self._stop_run(run)
                self._runs.pop(ident, None)
                self._release(1)
            elif ident[0] in stopped:
                run.cancelled = True
                self._stop_run(run)

    def _stop_run(self, run: _Run) -> None:
        if run.ctx is not None:
            run.ctx._cancel.set()
        if run.task is not None:
            run.task.cancel()

    async def _sweep(self) -> None:
        settings = self.settings
        ready, _events = await self._in_db(
            functools.partial(
                leases.sweep,
                self.store,
                max_crashes=settings.max_step_crashes,
                stale_after=max(self.lease / 2, 2.0),
                republish_after=settings.republish_after,
            )
        )
        if ready:
            await self._publish(ready)

    async def _takeover(self) -> None:
        def work() -> None:
            with self._lock:
                free = self.capacity - self._taken
                if free <= 0:
                    return
                self._taken += free
            try:
                entries = self.broker.take_over(self.id, self.lease, count=free)
                if entries:
                    _log.info("Worker %s took over %d idle deliver(ies)", self.id, len(entries))
                    self._claim_entries(entries, free)
                else:
                    self._release(free)
            except BaseException:
                self._release(free)
                raise

        await asyncio.to_thread(work)

    # -- database calls ------------------------------------------------------------------------

    async def _in_db(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._db, fn, *args)

    async def _in_db_retrying(
        self, fn: Callable[..., T], *args: Any, what: str, while_stopping: float | None = 30.0
    ) -> T:
        """Retry on a lost database or broker connection, with backoff, until it works.

        Once the worker is stopping, retries go on for ``while_stopping`` seconds more (None:
        not at all), then the error is raised: what was not committed is redone elsewhere
        when the leases lapse."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        failures = 0
        stop_deadline: float | None = None
        while True:
            try:
                return await self._in_db(fn, *args)
            except Exception as exc:
                if not _transient(exc):
                    raise
                if self._stopping.is_set():
                    if stop_deadline is None:
                        stop_deadline = time.monotonic() + (while_stopping or 0.0)
                    if while_stopping is None or time.monotonic() >= stop_deadline:
                        raise
                failures += 1
                delay = backoff.delay(min(failures, 8))
                _log.warning(
                    "Worker %s: %s failed (%s); retrying in %.1fs",
                    self.id,
                    what,
                    str(exc).splitlines()[0],
                    delay,
                )
                await asyncio.sleep(delay)
