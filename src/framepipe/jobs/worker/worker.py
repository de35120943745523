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
* while a step runs its lease is renewed every ``lease_seconds / 3`` (at most 1 s), from the
  event loop; a step whose lease was taken over (this worker was cut off or paused, or its
  event loop blocked) is told to stop and its late result is not written; a step of an
  execution cancelled elsewhere is told to stop (``ctx.cancelled``);
* an event loop that has not run for a third of the lease is warned about while it lasts,
  naming the step that blocks it and where (:mod:`~framepipe.jobs.worker.loopwatch`): a step
  that keeps blocking it past the lease keeps losing its attempts, and fails as poison at
  ``max_step_crashes`` lost attempts (:mod:`framepipe.jobs.leases`);
* every worker sweeps for steps nobody holds (a killed worker's, retries that are due, ready
  steps the broker lost) every ``sweep_interval`` seconds;
* on SIGTERM (:meth:`Worker.request_stop`) it takes no new step, gives running steps
  ``shutdown_grace`` seconds, hands the ones still running back (ready for another worker,
  not counted as a failure), commits, and returns;
* a lost broker or database connection is retried with backoff; nothing is acknowledged
  before it is committed.

:class:`Worker` owns the lifecycle (registration, the committer and heartbeat tasks, the
graceful shutdown); its parts hold their own state, each in a module of its own: the claim
window (:mod:`~framepipe.jobs.worker.window`), the runs and what they reported
(:mod:`~framepipe.jobs.worker.runs`), the reader thread and take-over that claim deliveries
(:mod:`~framepipe.jobs.worker.intake`), the rounds that commit the reports
(:mod:`~framepipe.jobs.worker.commits`), the heartbeat, sweep and take-over timer
(:mod:`~framepipe.jobs.worker.upkeep`), the watch on the event loop
(:mod:`~framepipe.jobs.worker.loopwatch`) and the connections with their one thread
(:mod:`~framepipe.jobs.worker.connections`). They share one lock, made here and held by the
claim window: a step's end marks its run finished, queues its outcome and frees its slot at
once. What does not share it lives elsewhere: the rules (:mod:`framepipe.jobs.rules`), an
attempt (:mod:`framepipe.jobs.running`), the transactions (:mod:`framepipe.jobs.dispatch`),
the pipelines it knows (:class:`~framepipe.jobs.loading.KnownPipelines`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable

from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backends.state import StateStore
from framepipe.config import Settings, load_settings
from framepipe.errors import BrokerError
from framepipe.jobs import dispatch
from framepipe.jobs.delivery import is_broker_url, open_delivery
from framepipe.jobs.loading import KnownPipelines
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.worker.commits import Committer
from framepipe.jobs.worker.connections import Connections
from framepipe.jobs.worker.intake import Intake
from framepipe.jobs.worker.loopwatch import LoopWatch
from framepipe.jobs.worker.runs import Reports, Runs
from framepipe.jobs.worker.upkeep import Upkeep
from framepipe.jobs.worker.window import ClaimWindow
from framepipe.liveness import this_owner
from framepipe.logs import get_logger
from framepipe.redis import safe_url

__all__ = ["Worker"]

_log = get_logger("jobs.worker")


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
        own_store = store is None
        self.store = store or StateStore(
            self.settings.resolved_database_url, sqlite_synchronous=self.settings.sqlite_synchronous
        )
        concurrency = concurrency or self.settings.concurrency
        self.id = this_owner(f"w{uuid.uuid4().hex[:6]}")
        self.broker = open_delivery(url, self.settings.broker_namespace)
        self._lease = self.settings.lease_seconds
        self.started_at = 0.0
        self._objects: ObjectStore | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the claim window's, its runs' flags' and reports'
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None  # something to commit, or a stop
        self._closing = False
        self._connections = Connections(
            self.store, self.broker, own_store=own_store, worker_id=self.id, stopping=self._stopping
        )
        self._window = ClaimWindow(
            self._lock,
            concurrency=concurrency,
            prefetch=self.settings.worker_prefetch,
            stopping=self._stopping,
        )
        self._runs = Runs(
            window=self._window,
            settings=self.settings,
            store=self.store,
            worker_id=self.id,
            pipelines=KnownPipelines(pipelines, owner=f"Worker {self.id}"),
            objects=lambda: self.objects,
            stopping=self._stopping,
            reported=self._wakeup,
        )
        self._intake = Intake(
            broker=self.broker,
            store=self.store,
            worker_id=self.id,
            lease=self._lease,
            window=self._window,
            runs=self._runs,
            stopping=self._stopping,
            request_stop=self.request_stop,
        )
        self._commits = Committer(
            connections=self._connections,
            runs=self._runs,
            window=self._window,
            worker_id=self.id,
            lease=self._lease,
            stopping=self._stopping,
        )
        self._upkeep = Upkeep(
            connections=self._connections,
            runs=self._runs,
            window=self._window,
            intake=self._intake,
            settings=self.settings,
            worker_id=self.id,
            lease=self._lease,
            stopping=self._stopping,
            output_tail=output_tail,
        )
        self._watch = LoopWatch(runs=self._runs, worker_id=self.id, lease=self._lease)

    # -- lifecycle -----------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking steps and shut down gracefully (thread- and signal-safe)."""
        self._stopping.set()
        self._window.wake_waiters()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    @property
    def capacity(self) -> int:
        """How many steps this worker holds at most: ``concurrency``, times ``worker_prefetch``
        while its recent steps are short (under 50 ms on average), so tiny steps are claimed
        and committed in batches but long ones are not hoarded while other workers idle."""
        return self._window.capacity

    @property
    def stopping(self) -> bool:
        """True once :meth:`request_stop` was called."""
        return self._stopping.is_set()

    @property
    def concurrency(self) -> int:
        """How many steps run at once at most (fixed when the worker is made)."""
        return self._window.concurrency

    @property
    def lease(self) -> float:
        """Seconds a claim holds without renewal (``lease_seconds``; fixed when made)."""
        return self._lease

    @property
    def steps_done(self) -> int:
        """How many steps this worker finished as done (a done outcome reported, counted
        once its round was committed, even where the store fenced or refused it)."""
        return self._runs.steps_done

    @property
    def objects(self) -> ObjectStore:
        """The object store steps get as ``ctx.objects``."""
        if self._objects is None:
            self._objects = open_object_store(self.settings.resolved_objects_url)
        return self._objects

    async def run(self) -> None:
        """Run until :meth:`request_stop`; returns after the graceful shutdown."""
        self.started_at = time.time()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._connections.open(self._loop)
        register = asyncio.create_task(
            self._connections.retrying(
                self._register, what="registering the worker", while_stopping=None
            )
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
            # The broker and the store are closed after the attempt still in flight (its
            # connect is bounded by the broker's timeout), not under it.
            await self._connections.close_behind()
            await stop
            if stopped:
                _log.info("Worker %s stopped before it could register", self.id)
                return
        register.result()
        self._runs.open(self._loop)
        self._watch.start(self._loop)
        reader = threading.Thread(target=self._intake.read, name="framepipe-reader", daemon=True)
        reader.start()
        tasks = [
            asyncio.create_task(self._committer(), name="framepipe-commit"),
            asyncio.create_task(self._upkeep.run(), name="framepipe-heartbeat"),
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
            try:
                await self._shutdown(tasks, reader)
            finally:
                self._watch.stop()

    async def _shutdown(self, tasks: list[asyncio.Task[None]], reader: threading.Thread) -> None:
        grace = self.settings.shutdown_grace
        started = time.monotonic()
        # The reader ends within one blocking read; whatever it claimed until then is started
        # before the grace period is counted down, so nothing claimed is left behind.
        await asyncio.to_thread(reader.join, 5.0)
        await asyncio.sleep(0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._runs.drain(), max(0.0, grace - (time.monotonic() - started))
            )
        self._runs.hand_back_live(grace)
        self._commits.cancel_retries()
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
        await self._connections.published()  # one call at most: bounded by the broker's timeout
        with contextlib.suppress(Exception):
            await self._connections.call(self._deregister)
        self._watch.stop()  # what follows blocks the loop on purpose
        self._runs.close()
        if self._objects is not None:
            self._objects.close()
        self._connections.close()
        _log.info("Worker %s stopped (%d step(s) done)", self.id, self.steps_done)

    def _register(self) -> None:
        self.broker.prepare()
        self._upkeep.report([])

    def _deregister(self) -> None:
        self._upkeep.report([], status="stopped")

    # -- committing ----------------------------------------------------------------------------

    async def _committer(self) -> None:
        """Commit a round whenever something was reported; once the worker is closing, return
        when nothing is left to commit."""
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._flush()
            if self._closing and self._runs.nothing_reported():
                return

    async def _flush(self) -> None:
        await self._commits.flush()

    def _wakeup(self) -> None:
        loop, wake = self._loop, self._wake
        # Reading the flag from another thread may see it stale; at worst one extra wake-up.
        if loop is not None and wake is not None and not wake.is_set():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    # -- what tests look at ----------------------------------------------------------------------

    @property
    def _pending(self) -> Reports:
        """What was reported since the last round (read under ``_lock``)."""
        return self._runs.reports

    @property
    def _retry_timers(self) -> set[asyncio.TimerHandle]:
        return self._commits.retry_timers

    @property
    def _known(self) -> dispatch.Known:
        return self._intake.known
