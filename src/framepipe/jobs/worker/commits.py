"""A worker's rounds (:class:`Committer`): what its steps reported since the last round
(progress, spawned steps, outcomes) is committed in one transaction, fenced by attempt
(:func:`framepipe.jobs.dispatch.commit_round`), which also claims ready steps for the claim
window's free slots, so tiny steps are claimed and committed in batches.

* when a step's last progress report and its outcome wait for the same round, the report is
  committed first, not dropped; a report or outcome of an attempt this worker no longer holds
  (its lease was taken over) is not written, a run still going is stopped, and that is said
  once per attempt;
* a round the store refuses for its data (not a lost connection) is committed piece by piece,
  and only the attempt a refused piece belongs to is failed, for good, saying why
  (:mod:`framepipe.jobs.refusals`);
* the steps a round made ready are published; a retry is released when it is due (the sweep
  would too, later).
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time

from framepipe.jobs import dispatch, leases
from framepipe.jobs.refusals import merge, piece_attempt, refused_outcome, round_pieces
from framepipe.jobs.rounds import Delivery, ProgressUpdate, Round, RoundResult
from framepipe.jobs.storable import brief_error
from framepipe.jobs.worker.connections import Connections, is_transient
from framepipe.jobs.worker.runs import Attempt, Run, Runs
from framepipe.jobs.worker.window import ClaimWindow
from framepipe.logs import get_logger

__all__ = ["Committer"]

_log = get_logger("jobs.worker")


class Committer:
    """Commits the rounds of ``runs`` through ``connections``, claiming for ``window``."""

    def __init__(
        self,
        *,
        connections: Connections,
        runs: Runs,
        window: ClaimWindow,
        worker_id: str,
        lease: float,
        stopping: threading.Event,
    ) -> None:
        self._connections = connections
        self._store = connections.store
        self._runs = runs
        self._window = window
        self._id = worker_id
        self._lease = lease
        self._stopping = stopping
        self.retry_timers: set[asyncio.TimerHandle] = set()  # pending ones only

    async def flush(self) -> None:
        """Commit what was reported since the last round, claiming steps for the free slots
        (none once stopping) and starting them; a lost connection is retried (raised if it
        stays lost while stopping: the leases lapse, others redo it)."""
        pending = self._runs.take_reports()
        if not pending:
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
        take = 0 if self._stopping.is_set() else self._window.take_free()
        result: RoundResult | None = None
        try:
            result = await self._connections.retrying(
                functools.partial(
                    dispatch.commit_round,
                    self._store,
                    work,
                    worker=self._id,
                    take=take,
                    lease=self._lease,
                ),
                what="committing step results",
            )
        except Exception as exc:
            if is_transient(exc):
                raise  # still unreachable while stopping: the leases lapse, others redo it
            result = await self._salvage(work, exc)
        finally:
            self._window.release(take - (len(result.claimed) if result is not None else 0))
        if result.claimed:
            self._runs.start_all(self._runs.prepare(result.claimed))
        ended = {run.ident: run for run, _outcome in pending.outcomes}
        for run, outcome in pending.outcomes:
            self._runs.committed(run, outcome)
        for ident in dict.fromkeys(result.fenced):
            self._taken_over(ident, ended.get(ident))
        if result.ready:
            self._connections.publish(result.ready)
        for at, delivery in result.retry_at:
            self._retry_later(at, delivery)

    def _taken_over(self, ident: Attempt, ended: Run | None) -> None:
        """Writes of attempt ``ident`` were fenced (another worker holds the step now): a run
        still going is cut off (told to stop, its slot freed, nothing more of it written).
        Said once per attempt: not for a run already cut off (its lost lease was said)."""
        if ended is None:
            run = self._runs.get(ident)
            if run is None or not self._runs.cut_off(run):
                return  # cut off already, by a renewal that found the lease lost
        elif ended.lost:
            return
        execution_id, key, attempt = ident
        _log.warning(
            "Worker %s: step %s of %s attempt %d no longer held by this worker "
            "(its lease was taken over); %sits late writes were discarded",
            self._id,
            key,
            execution_id[:8],
            attempt,
            "" if ended is not None else "stopping it; ",
        )

    async def _salvage(self, work: Round, exc: Exception) -> RoundResult:
        """Commit a round the store refused for its data (not a lost connection) piece by
        piece: each spawn, progress report and outcome in a transaction of its own (spawns
        first, as a spawn is fenced once its spawner's outcome is in). The attempt a refused
        piece belongs to is failed for good with an error that says why
        (:meth:`_fail_refused`); the rest is committed, and the worker goes on."""
        _log.warning(
            "Worker %s: the state store refused a round (%s); committing it piece by piece",
            self._id,
            brief_error(exc),
        )
        result = RoundResult()
        refused: set[Attempt] = set()  # attempts failed for a refused piece
        for piece in round_pieces(work):
            ident, weight, before = piece_attempt(piece, work, self._runs.weight_and_progress)
            if ident in refused:
                continue  # its attempt is failed already; this piece would be fenced
            try:
                part = await self._connections.retrying(
                    functools.partial(dispatch.commit_round, self._store, piece, worker=self._id),
                    what="committing step results",
                )
            except Exception as piece_exc:
                if is_transient(piece_exc):
                    raise
                refused.add(ident)
                part = await self._fail_refused(ident, weight, before, piece_exc)
            merge(result, part)
        return result

    async def _fail_refused(
        self, ident: Attempt, weight: float, before: float, exc: Exception
    ) -> RoundResult:
        """Fail attempt ``ident`` (no retry) because the store refused what it reported; a run
        still going is stopped and its slot freed (its later writes are fenced)."""
        execution_id, key, attempt = ident
        failed = refused_outcome(ident, weight, before, exc)
        _log.error(
            "Worker %s: step %s of %s (attempt %d): %s",
            self._id,
            key,
            execution_id[:8],
            attempt,
            failed.error,
        )
        run = self._runs.get(ident)
        if run is not None:
            self._runs.cut_off(run)
        try:
            return await self._connections.retrying(
                functools.partial(
                    dispatch.commit_round, self._store, Round(outcomes=[failed]), worker=self._id
                ),
                what="failing a step whose report was refused",
            )
        except Exception as again:
            if is_transient(again):
                raise
            _log.error(
                "Worker %s: the failure of step %s of %s could not be stored either (%s); "
                "it is run again once its lease lapses",
                self._id,
                key,
                execution_id[:8],
                brief_error(again),
            )
            return RoundResult()

    def _retry_later(self, at: float, delivery: Delivery) -> None:
        """Release the due retries at ``at`` (the sweep would too, later); the timer is kept
        only until it fires, to be cancelled at shutdown."""
        timers = self.retry_timers

        def due() -> None:
            timers.discard(handle)
            self._retry_due(delivery)

        handle = asyncio.get_running_loop().call_later(max(0.0, at - time.time()), due)
        timers.add(handle)

    def _retry_due(self, _delivery: Delivery) -> None:
        if not self._stopping.is_set():
            asyncio.get_running_loop().create_task(self._release_due())

    async def _release_due(self) -> None:
        ready = await self._connections.retrying(
            leases.release_due, self._store, what="releasing due retries"
        )
        self._connections.publish(ready)

    def cancel_retries(self) -> None:
        """Cancel the pending retry timers (the worker stops; any worker's sweep releases the
        retries once due)."""
        for timer in self.retry_timers:
            timer.cancel()
