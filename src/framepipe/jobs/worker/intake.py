"""A worker's intake (:class:`Intake`): its reader thread takes deliveries from the broker as
the claim window has room, and a take-over takes the ones a dead worker took; each is claimed in
the state store as a new attempt with a lease (:func:`framepipe.jobs.dispatch.claim`) and
handed to the event loop to run.

* a claim is committed before the step's code starts, and the delivery is acknowledged only
  after that commit; deliveries that cannot be claimed (the worker is stopping, the database
  failed) are handed back at once, for another worker;
* a worker that stays full pauses its delivery
  (:meth:`~framepipe.jobs.worker.window.ClaimWindow.reserve`), so a broker that pushes
  (RabbitMQ, prefetch = the claim window) gives what it sent ahead to idle workers;
* a lost broker or database connection is retried with backoff, said once when it begins
  (naming which, and whether the reader was taking or claiming) and once when it is over; any
  other error of the reader stops the worker.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from framepipe.backends.state import StateStore
from framepipe.backoff import Backoff
from framepipe.errors import BrokerError
from framepipe.jobs import dispatch
from framepipe.jobs.delivery import Received, StepDelivery
from framepipe.jobs.worker.connections import is_transient
from framepipe.jobs.worker.runs import Runs
from framepipe.jobs.worker.window import ClaimWindow
from framepipe.logs import get_logger
from framepipe.outage import Outage, cause

__all__ = ["Intake"]

_log = get_logger("jobs.worker")


class Intake:
    """Takes and claims deliveries for ``runs`` while the ``window`` has room; calls
    ``request_stop`` if reading fails for good. :attr:`known` caches the inputs of the
    executions it claimed steps of (:data:`framepipe.jobs.dispatch.Known`)."""

    def __init__(
        self,
        *,
        broker: StepDelivery,
        store: StateStore,
        worker_id: str,
        lease: float,
        window: ClaimWindow,
        runs: Runs,
        stopping: threading.Event,
        request_stop: Callable[[], None],
    ) -> None:
        self._broker = broker
        self._store = store
        self._id = worker_id
        self._lease = lease
        self._window = window
        self._runs = runs
        self._stopping = stopping
        self._request_stop = request_stop
        self.known: dispatch.Known = {}
        self._claim_lock = threading.Lock()

    def read(self) -> None:
        """The reader thread: take what the window has room for until the worker stops. A
        lost broker or database is said once when the outage begins, naming which and what
        the reader was doing, and once when it is over; the tries between are retried with
        backoff (debug lines)."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        failures = 0
        broker, store = Outage(), Outage()
        while not self._stopping.is_set():
            free = 0
            outage = broker
            try:
                free = self._window.reserve(self._broker.pause)
                if not free:
                    return
                taken = self._broker.take(self._id, free, wait=1.0, window=self._window.capacity)
                self._back(broker, "the broker")
                if taken:
                    outage = store
                    self._claim(taken, free)
                    self._back(store, "the state store")
                else:
                    self._window.release(free)
                failures = 0
            except Exception as exc:
                self._window.release(free)
                if not is_transient(exc):
                    _log.exception("Worker %s: reader failed; stopping", self._id)
                    self._request_stop()
                    return
                failures += 1
                delay = backoff.delay(min(failures, 8))
                if outage.failed(exc):
                    _log.warning(
                        "Worker %s: %s failed (%s); retrying until it works",
                        self._id,
                        "claiming delivered steps in the state store"
                        if outage is store
                        else "taking steps from the broker",
                        outage.last_error,
                    )
                else:
                    _log.debug("Worker %s: %s; retrying in %.1fs", self._id, cause(exc), delay)
                with contextlib.suppress(BrokerError):  # nothing pushed to it meanwhile
                    self._broker.pause()
                self._stopping.wait(delay)

    def _back(self, outage: Outage, what: str) -> None:
        tries = outage.attempts
        lasted = outage.answered()
        if lasted is not None:
            _log.info(
                "Worker %s: %s answers again after %.0f s (%d tr%s failed)",
                self._id,
                what,
                lasted,
                tries,
                "y" if tries == 1 else "ies",
            )

    def take_over(self) -> None:
        """Take and claim, for the window's free slots, deliveries another worker took and
        left unsettled for a lease (it died between taking and claiming). Blocks."""
        free = self._window.take_free()
        if not free:
            return
        try:
            entries = self._broker.take_over(self._id, self._lease, count=free)
            if entries:
                _log.info("Worker %s took over %d idle deliver(ies)", self._id, len(entries))
                self._claim(entries, free)
            else:
                self._window.release(free)
        except BaseException:
            self._window.release(free)
            raise

    def _claim(self, entries: list[Received], reserved: int) -> None:
        """Claim delivered steps in the store, acknowledge them, hand them to the loop."""
        if self._stopping.is_set():
            # Give them back at once, for another worker.
            self._broker.hand_back(entries)
            self._window.release(reserved)
            return
        try:
            with self._claim_lock:  # the reader and a takeover may claim at once
                claimed, _events = dispatch.claim(
                    self._store,
                    self._id,
                    [r.delivery for r in entries],
                    lease=self._lease,
                    known=self.known,
                )
        except BaseException:
            # The database failed: nothing is claimed; the deliveries go back at once rather
            # than wait for their connection to end (RabbitMQ) or a take-over (Redis).
            with contextlib.suppress(BrokerError):
                self._broker.hand_back(entries)
            raise
        self._window.release(reserved - len(claimed))
        if claimed:
            self._runs.start_soon(self._runs.prepare(claimed))
        try:
            self._broker.ack(entries)
        except BrokerError as exc:  # delivered again later, and found claimed
            _log.warning("Worker %s: %s", self._id, exc)
