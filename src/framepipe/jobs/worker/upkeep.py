"""A worker's upkeep (:class:`Upkeep`), on a timer while it runs:

* its heartbeat and the leases of the steps it runs are renewed every ``lease_seconds / 3``
  (at most 1 s); a step whose lease was taken over (this worker was cut off or paused) is told
  to stop and its late result is not written; a step of an execution cancelled elsewhere is
  told to stop (``ctx.cancelled``); once steps turn out long, claimed steps not started yet
  are handed back;
* it sweeps for steps nobody holds (a killed worker's, retries that are due, ready steps the
  broker lost) every ``sweep_interval`` seconds; for a lease after it could renew nothing for
  a lease because its store failed or did not answer, it takes back only the steps of workers that
  stopped or whose process is gone (:func:`framepipe.jobs.leases.sweep`'s ``spare_live``): in
  an outage of the database every worker's renewals fail alike, and a lease that lapsed then
  is no sign of a lost worker;
* it takes over the deliveries a dead worker took and left unsettled, once a lease;
* it has the broker forget stopped workers' consumers, every ``_FORGET_EVERY`` seconds.

A lost connection on the way is retried at the next beat, said once when the beats start
failing (or a lease passes without an answer) and once when the store answers again; any other
error ends the worker.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from framepipe.config import Settings
from framepipe.errors import BrokerError
from framepipe.jobs import leases
from framepipe.jobs.worker.connections import Connections, is_transient
from framepipe.jobs.worker.intake import Intake
from framepipe.jobs.worker.runs import Attempt, Runs
from framepipe.jobs.worker.window import ClaimWindow
from framepipe.logs import get_logger
from framepipe.outage import Outage

__all__ = ["Upkeep"]

T = TypeVar("T")
_log = get_logger("jobs.worker")
_FORGET_EVERY = 600.0  # seconds between two looks for stopped workers' consumers
_FORGET_IDLE = 3600.0  # a consumer idle this long with nothing pending is a stopped worker


class Upkeep:
    """The heartbeat of the worker ``worker_id`` (:meth:`run`) and its row in the workers
    table (:meth:`report`), with ``output_tail`` (the process's last output, if kept)."""

    def __init__(
        self,
        *,
        connections: Connections,
        runs: Runs,
        window: ClaimWindow,
        intake: Intake,
        settings: Settings,
        worker_id: str,
        lease: float,
        stopping: threading.Event,
        output_tail: Callable[[], str] | None,
    ) -> None:
        self._connections = connections
        self._runs = runs
        self._window = window
        self._intake = intake
        self._settings = settings
        self._id = worker_id
        self._lease = lease
        self._stopping = stopping
        self._output_tail = output_tail
        self._outage = Outage()
        self._spare_until = 0.0  # monotonic: the sweep spares live holders until then
        self._renewed_at = time.monotonic()  # the last renewal that worked
        self._hung = False  # a call waited a lease for the store since the last renewal

    def report(
        self, held: list[Attempt], *, status: str = "running"
    ) -> tuple[set[Attempt], set[str]]:
        """Write the worker's row (``status``, steps done, output tail) and renew the leases
        of ``held``; blocks. Returns the attempts whose lease was lost and the executions
        among them that were cancelled (:func:`framepipe.jobs.leases.renew`)."""
        return leases.renew(
            self._connections.store,
            self._id,
            held,
            lease=self._lease,
            concurrency=self._window.concurrency,
            output_tail=self._output_tail() if self._output_tail is not None else None,
            status=status,
            steps_done=self._runs.steps_done,
        )

    async def run(self) -> None:
        """Beat until cancelled."""
        renew_every = min(self._lease / 3, 1.0)
        sweep_every = self._settings.sweep_interval
        last_renew = last_sweep = last_claim = last_forget = time.monotonic()
        while True:
            await asyncio.sleep(min(renew_every, sweep_every, 0.5))
            now = time.monotonic()
            try:
                if now - last_renew >= renew_every:
                    last_renew = now
                    await self._renew()
                    if self._window.capacity <= self._window.concurrency:
                        self._runs.hand_back_queued()
                if now - last_sweep >= sweep_every and not self._stopping.is_set():
                    last_sweep = now
                    await self._sweep()
                if now - last_claim >= self._lease and not self._stopping.is_set():
                    last_claim = now
                    await asyncio.to_thread(self._intake.take_over)
                if now - last_forget >= _FORGET_EVERY and not self._stopping.is_set():
                    last_forget = now
                    await self._forget_consumers()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if isinstance(exc, BrokerError):  # taking over: tried again in a lease
                    _log.warning("Worker %s: %s; retrying", self._id, str(exc).splitlines()[0])
                    continue
                self._spare_until = float("inf")  # until a renewal works again
                if self._outage.failed(exc):
                    _log.warning(
                        "Worker %s: heartbeat failed (%s); retrying every beat, said again "
                        "when it works",
                        self._id,
                        str(exc).splitlines()[0],
                    )

    async def _watched(self, call: Awaitable[T], held: int | None = None) -> T:
        """Await ``call`` (the store's, or the broker's); one that has not returned within a
        lease (nothing failed, nothing answers: a frozen server, a network partition) is said
        once until a renewal works again, then awaited on."""
        task = asyncio.ensure_future(call)
        if not (await asyncio.wait({task}, timeout=self._lease))[0] and not self._hung:
            self._hung = True
            held = len(self._runs.held()) if held is None else held
            _log.warning(
                "Worker %s: the state store has not answered for %g s; the leases of the %d "
                "step(s) this worker holds lapse meanwhile; waiting for it",
                self._id,
                self._lease,
                held,
            )
        return await task

    async def _renew(self) -> None:
        held = self._runs.held()
        lost, stopped = await self._watched(
            self._connections.call(functools.partial(self.report, held)), len(held)
        )
        now = time.monotonic()
        unrenewed = now - self._renewed_at
        self._renewed_at = now
        failed = self._outage.attempts
        failing = self._outage.answered() is not None
        hung, self._hung = self._hung, False
        if hung or failing:
            # The store failed or did not answer: if this worker could renew nothing for a
            # lease, neither could the others, and their leases lapsed as its own did. (Not
            # so for a worker whose own event loop was blocked, or that was paused.)
            self._spare_until = now + self._lease if unrenewed > self._lease else 0.0
            _log.info(
                "Worker %s: the state store answered again after %.0f s%s%s",
                self._id,
                unrenewed,
                f" ({failed} heartbeat(s) failed)" if failed else "",
                f"; for {self._lease:g} s the sweep takes back only the steps of workers "
                "that are gone"
                if now < self._spare_until
                else "",
            )
        for ident in held:
            run = self._runs.get(ident)
            if run is None:
                continue
            if ident in lost:
                if self._runs.cut_off(run):
                    _log.warning(
                        "Worker %s: lost the lease of step %s of %s (attempt %d); stopping it",
                        self._id,
                        ident[1],
                        ident[0][:8],
                        ident[2],
                    )
            elif ident[0] in stopped:
                run.cancelled = True
                self._runs.stop(run)

    async def _sweep(self) -> None:
        settings = self._settings
        ready, _events = await self._watched(
            self._connections.call(
                functools.partial(
                    leases.sweep,
                    self._connections.store,
                    max_crashes=settings.max_step_crashes,
                    stale_after=max(self._lease / 2, 2.0),
                    republish_after=settings.republish_after,
                    lease=self._lease,
                    spare_live=time.monotonic() < self._spare_until,
                )
            )
        )
        if ready:
            self._connections.publish(ready)

    async def _forget_consumers(self) -> None:
        forgotten = await asyncio.to_thread(
            self._connections.broker.forget_consumers, _FORGET_IDLE, self._id
        )
        if forgotten:
            _log.info(
                "Worker %s: %d stopped worker(s) forgotten by the broker", self._id, forgotten
            )
