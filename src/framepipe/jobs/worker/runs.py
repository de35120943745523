"""The attempts a worker runs (:class:`Runs`): each claimed step runs in a thread of the
worker's pool (plain functions) or as a task on its event loop (``async def``), at most
``concurrency`` at once, through :mod:`framepipe.jobs.running` like the embedded engine's; what
it reports (progress, spawned steps, its outcome) is queued (:class:`Reports`) for the
worker's next round (:mod:`framepipe.jobs.worker.commits`).

* an attempt runs at most once here: one delivered again while it runs is not started twice;
* a run handed back (the worker is stopping, or its steps turned out long) or cut off (its
  lease was lost, or the store refused what it reported) is told to stop (``ctx.cancelled``),
  and its later reports are not queued; one handed back before it began never begins;
* a claim that reaches the event loop too late for its lease to be renewed in time (claimed
  while the loop was blocked) is handed back, not started;
* a run's outcome is queued, and its slot in the claim window freed, under the window's lock
  (:class:`~framepipe.jobs.worker.window.ClaimWindow`), the lock that guards the runs' flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from framepipe.backends.objects import ObjectStore
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.errors import PipelineDefinitionError, StepCancelledError
from framepipe.jobs.context import LazyData, Progressed, StepContext, StepMessage
from framepipe.jobs.loading import KnownPipelines
from framepipe.jobs.outcomes import NO_RETRY, RetryPolicy, error_text, is_permanent
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import completed_data, has_step, step_dependencies
from framepipe.jobs.rounds import Claimed, Outcome, Spawn
from framepipe.jobs.rules import plan_step
from framepipe.jobs.running import Ran, run_attempt, run_attempt_async
from framepipe.jobs.worker.window import ClaimWindow
from framepipe.logs import get_logger

__all__ = ["Attempt", "Reports", "Run", "Runs"]

Attempt = tuple[str, str, int]
"""An attempt: (execution id, step key, attempt number)."""

_log = get_logger("jobs.worker")


@dataclass(eq=False)
class Run:
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
    def ident(self) -> Attempt:
        return (self.claimed.execution_id, self.claimed.key, self.claimed.attempt)


@dataclass
class Reports:
    """What the step threads reported since the last commit."""

    outcomes: list[tuple[Run, Outcome]] = field(default_factory=list)
    progress: dict[Attempt, tuple[Run, float, str | None]] = field(default_factory=dict)
    spawns: list[Spawn] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.outcomes or self.progress or self.spawns)


class Runs:
    """The runs of this worker by attempt, and what they reported since the last round
    (:attr:`reports`, taken by :meth:`take_reports`); ``reported`` is called (from any thread)
    whenever something is queued. Started on an event loop by :meth:`open`."""

    def __init__(
        self,
        *,
        window: ClaimWindow,
        settings: Settings,
        store: StateStore,
        worker_id: str,
        pipelines: KnownPipelines,
        objects: Callable[[], ObjectStore],
        stopping: threading.Event,
        reported: Callable[[], None],
    ) -> None:
        self._window = window
        self._lock = window.lock
        self._settings = settings
        self._store = store
        self._id = worker_id
        self._pipelines = pipelines
        self._objects = objects
        self._stopping = stopping
        self._reported = reported
        self._runs: dict[Attempt, Run] = {}
        self.reports = Reports()
        self.steps_done = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Event | None = None
        self._async_slots: asyncio.Semaphore | None = None
        self._pool: ThreadPoolExecutor | None = None

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run steps on ``loop`` and in ``concurrency`` threads."""
        concurrency = self._window.concurrency
        self._loop = loop
        self._ended = asyncio.Event()
        self._async_slots = asyncio.Semaphore(concurrency)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="framepipe-step")

    def close(self) -> None:
        """Drop the steps queued for a thread; those running in one cannot be stopped from
        outside and are left to end (their results are discarded)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- what is running ------------------------------------------------------------------------

    def get(self, ident: Attempt) -> Run | None:
        return self._runs.get(ident)

    def held(self) -> list[Attempt]:
        """The attempts whose lease this worker keeps: running, waiting to, or ended with
        their outcome waiting to be committed (a commit delayed by a database outage must not
        let the lease lapse under a result that is already there)."""
        return [r.ident for r in list(self._runs.values()) if not r.lost]

    def live(self) -> list[Run]:
        """The runs running or waiting to (safe to call from any thread)."""
        return [r for r in list(self._runs.values()) if not r.finished and not r.lost]

    def weight_and_progress(self, ident: Attempt) -> tuple[float, float] | None:
        """The weight and committed progress of attempt ``ident`` while this worker runs it."""
        run = self._runs.get(ident)
        return None if run is None else (run.claimed.weight, run.committed_progress)

    async def drain(self) -> None:
        """Return once no run is live."""
        assert self._ended is not None
        while self.live():
            self._ended.clear()
            await self._ended.wait()

    def take_reports(self) -> Reports:
        """What was reported since the last call; the queue starts empty again."""
        with self._lock:
            reports, self.reports = self.reports, Reports()
        return reports

    def nothing_reported(self) -> bool:
        with self._lock:
            return not self.reports

    def committed(self, run: Run, outcome: Outcome) -> None:
        """``outcome`` of ``run`` was committed (or fenced): the run is forgotten (not a run
        of the same attempt started since, as a step handed back and claimed again)."""
        self._forget(run)
        if outcome.kind == "done":
            self.steps_done += 1

    # -- starting ------------------------------------------------------------------------------

    def prepare(self, claimed: list[Claimed]) -> list[Run]:
        """Runs for claimed steps, each with its pipeline (loaded by its stored reference if
        not known yet)."""
        return [
            Run(c, self._pipelines.get(c.pipeline, c.pipeline_ref, c.execution_id)) for c in claimed
        ]

    def start_soon(self, runs: list[Run]) -> None:
        """:meth:`start_all` on the event loop, from another thread."""
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(self.start_all, runs)

    def start_all(self, runs: list[Run]) -> None:
        for run in runs:
            held = self._runs.get(run.ident)
            if held is not None and not (held.lost or held.handed_back):
                # Claimed again under the attempt this worker runs or ran (the claim was lost
                # in a database crash and the step delivered again): one run of it, not two;
                # a finished run's outcome, committed next, ends the step. A run handed back
                # is another matter: its step was given up and is claimed afresh here.
                _log.warning(
                    "Worker %s: step %s of %s (attempt %d) delivered again while it runs "
                    "here; not started twice",
                    self._id,
                    run.ident[1],
                    run.ident[0][:8],
                    run.ident[2],
                )
                self._window.release(1)
                continue
            age = time.time() - run.claimed.started_at
            if age > self._settings.lease_seconds * 2 / 3:
                # Claimed (by the reader thread, or in a round) while the event loop was
                # blocked, or by a claim that waited long for the store: its lease was never
                # renewed and lapses before the next renewal,
                # if another worker has not taken the step over already. Given back (not an
                # attempt; fenced if it is another's by now) rather than run twice.
                _log.warning(
                    "Worker %s: step %s of %s (attempt %d) was claimed %.1f s ago and its "
                    "%g s lease was never renewed (the claim waited that long for the state "
                    "store, or the event loop was blocked); handed back, not started",
                    self._id,
                    run.ident[1],
                    run.ident[0][:8],
                    run.ident[2],
                    age,
                    self._settings.lease_seconds,
                )
                run.handed_back = True
                self._hand_back(run)
                continue
            self._runs[run.ident] = run
            self._start(run)

    def _start(self, run: Run) -> None:
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
                f"worker {self._id} cannot run step {c.key!r}: {what} is not known here; "
                "make the pipeline importable on every worker (or pass it to the worker)",
                pipeline=c.pipeline,
            )
            self._post_outcome(run, self._failed(run, exc))
            return
        store = self._store
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
            objects=self._objects,
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

    # -- running -------------------------------------------------------------------------------

    def _begin(self, run: Run) -> bool:
        """Mark the run started, unless it was handed back while it waited for a slot."""
        with self._lock:
            if run.handed_back or run.finished or run.lost:
                return False
            run.began = time.monotonic()
            return True

    def _run_sync(self, run: Run, ctx: StepContext) -> None:
        if not self._begin(run):
            return
        step = ctx.pipeline.steps[run.claimed.name]
        ran = run_attempt(
            step,
            ctx,
            output_limit=self._settings.max_step_output_bytes,
            mode="worker",
            traceparent=run.claimed.traceparent,
        )
        self._post_outcome(run, self._outcome(run, ran))

    async def _run_async(self, run: Run, ctx: StepContext) -> None:
        step = ctx.pipeline.steps[run.claimed.name]
        assert self._async_slots is not None
        try:
            async with self._async_slots:  # at most `concurrency` run; claimed ones wait
                if not self._begin(run):
                    return
                ran = await run_attempt_async(
                    step,
                    ctx,
                    output_limit=self._settings.max_step_output_bytes,
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

    def _outcome(self, run: Run, ran: Ran) -> Outcome:
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

    def _failed(self, run: Run, exc: BaseException) -> Outcome:
        c = run.claimed
        kind: Any = "failed"
        if run.cancelled:
            kind = "cancelled"
        elif self._stopping.is_set() and isinstance(exc, StepCancelledError):
            kind = "handback"
        step = run.pipeline.get(c.name) if run.pipeline is not None else None
        policy = NO_RETRY if step is None else RetryPolicy.of(step, self._settings)
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

    # -- what runs report ----------------------------------------------------------------------

    def _post_message(self, run: Run, message: StepMessage) -> None:
        """A message from a step's context (its thread or the loop)."""
        if run.lost or run.handed_back or run.finished:
            return
        with self._lock:
            if isinstance(message, Progressed):
                self.reports.progress[run.ident] = (run, message.pct, message.message)
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
                self.reports.spawns.append(
                    Spawn(message.execution_id, message.spawner, run.claimed.attempt, spec)
                )
        self._reported()

    def _post_outcome(self, run: Run, outcome: Outcome) -> None:
        loop = self._loop
        with self._lock:
            if run.finished:
                return
            run.finished = True
            if run.lost:  # its slot was given back when it was cut off
                return
            self.reports.outcomes.append((run, outcome))
            self._window.step_ended(run.began)
        self._reported()
        ended = self._ended
        if loop is not None and ended is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ended.set)

    # -- stopping runs -------------------------------------------------------------------------

    def stop(self, run: Run) -> None:
        """Tell ``run``'s step to stop (``ctx.cancelled``; an async one is cancelled)."""
        if run.ctx is not None:
            run.ctx._cancel.set()
        if run.task is not None:
            run.task.cancel()

    def cut_off(self, run: Run) -> bool:
        """Cut ``run`` off (its lease was lost, or the store refused what it reported) unless
        its outcome is queued already: it is told to stop and forgotten, its slot is freed,
        and nothing it reports later is queued. True if it was cut off."""
        with self._lock:
            if run.finished or run.lost:  # its outcome is queued (the commit fences it), or
                return False  # it was cut off already
            run.lost = True
        self.stop(run)
        self._forget(run)
        self._window.release(1)
        return True

    def _forget(self, run: Run) -> None:
        if self._runs.get(run.ident) is run:
            del self._runs[run.ident]

    def hand_back_queued(self) -> None:
        """Steps turned out long: give back the claimed ones not started yet, so idle workers
        can take them instead of waiting behind this worker's busy threads."""
        queued: list[Run] = []
        with self._lock:
            busy = sum(1 for r in self._runs.values() if r.began is not None and not r.finished)
            if busy < self._window.concurrency:  # a free thread takes the next one at once
                return
            for run in self._runs.values():
                if run.began is None and not (run.finished or run.lost or run.handed_back):
                    run.handed_back = True  # its thread, if it comes, will not run it
                    queued.append(run)
        if queued:
            _log.info(
                "Worker %s: steps take %.2fs on average; handing back %d claimed step(s) "
                "not started yet",
                self._id,
                self._window.avg_run or 0.0,
                len(queued),
            )
        for run in queued:
            if run.task is not None:
                run.task.cancel()
            self._hand_back(run)

    def hand_back_live(self, grace: float) -> None:
        """The worker stops and ``grace`` seconds are over: the runs still live are told to
        stop and handed back (ready for another worker, not counted as a failure)."""
        for run in self.live():
            _log.warning(
                "Worker %s stopping: step %s of %s still running after %.1fs; handing it back",
                self._id,
                run.claimed.key,
                run.claimed.execution_id[:8],
                grace,
            )
            run.handed_back = True
            self.stop(run)
            self._hand_back(run)

    def _hand_back(self, run: Run) -> None:
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
